"""generator.train end to end on a tiny demo: cache -> training -> export -> resume; and DDP."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from generator import load_generator
from generator.train import train
from titok_core.checkpoints import read_model_extra

from conftest import REPO, compose_config


def _overrides(fx, tmp_path, steps):
    tok = fx / "tokenizer"
    return [
        "experiment=demo", f"run_dir={tmp_path}/run", f"data.root={tmp_path}/demo", "data.builtin=demo",
        "data.demo_train_per_class=12", "data.demo_val_per_class=2", f"tokenizer.spec={tok}/config.yaml",
        f"tokenizer.checkpoint={tok}/tokenizer.bin", f"cache.dir={tmp_path}/cache", "cache.batch_size=32",
        "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.mlp_dim=64", "batch_size=16",
        f"trainer.max_steps={steps}", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.val_check_interval=4",
        "checkpoint_every_n_steps=2", "sample_every_n_steps=4", "sampling.num_steps=4",
        "fit_sampling.enabled=false",
    ]


def test_demo_training_end_to_end_and_resume(official_tiny, tmp_path):
    cfg = compose_config("generator.train", _overrides(official_tiny, tmp_path, 6))
    result = train(cfg)
    assert result["global_step"] == 6
    ckpt = Path(result["checkpoint"])
    gen = load_generator(ckpt)
    assert (gen.num_tokens, gen.codebook_size, gen.num_classes) == (8, 64, 10)
    extra = read_model_extra(ckpt)
    assert extra["sampling"]["num_steps"] == 4 and extra["tokenizer"]["spec"].endswith("config.yaml")
    assert len(extra["classes"]) == 10 and extra["global_step"] == 6
    assert Path(result["samples"]).is_file() and (tmp_path / "run" / "samples" / "samples_step0000004.png").is_file()
    assert (tmp_path / "cache" / "manifest.json").is_file()
    assert "train/loss" in result["metrics"]

    # A rerun with a larger budget resumes from last.ckpt instead of starting over.
    cfg = compose_config("generator.train", _overrides(official_tiny, tmp_path, 9))
    assert train(cfg)["global_step"] == 9


@pytest.mark.parametrize("on_device", ["false", "true"])  # a DataLoader + DistributedSampler; the cache on the device
def test_ddp_two_cpu_processes(official_tiny, tmp_path, on_device):
    args = _overrides(official_tiny, tmp_path, 4)
    args = [a for a in args if not a.startswith("trainer.devices")] + [
        "trainer.devices=2", "trainer.strategy=ddp", f"data_on_device={on_device}",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run(
        [sys.executable, "-m", "generator.train", *args], cwd=REPO,
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trained 4 steps" in out.stdout
    assert "world_size: 2" in out.stderr or "distributed_backend=gloo" in out.stderr
    assert (tmp_path / "run" / "generator.safetensors").is_file()


def test_the_tokenizer_is_recorded_so_the_file_works_from_anywhere(tmp_path, monkeypatch):
    from generator.train import _recorded_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tokenizer.safetensors").write_bytes(b"")
    assert _recorded_path("runs/tokenizer.safetensors") == str(tmp_path / "runs" / "tokenizer.safetensors")
    assert _recorded_path("titok_demo") == "titok_demo" and _recorded_path(None) is None
    assert _recorded_path("yucornetto/tokenizer_titok_l32_imagenet") == "yucornetto/tokenizer_titok_l32_imagenet"
