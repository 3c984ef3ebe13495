"""A run knows what it is: run.json records the dataset, tokenizer, model and recipe; a rerun resumes
only the same run; data is written only where the user asked for it."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from titok_core.runs import (
    RunMismatchError,
    builtin_for,
    dataset_fingerprint,
    default_run_dir,
    require_dataset,
    start_run,
)

from conftest import REPO, compose_config

TINY = {  # a 16x16 FSQ TiTok that trains in seconds
    "image_size": 16, "patch_size": 4, "enc_width": 32, "enc_depth": 1, "enc_heads": 2, "dec_width": 32,
    "dec_depth": 1, "dec_heads": 2, "num_tokens": 4, "quantizer": "fsq", "fsq_levels": [4, 4],
    "decoder_output": "rgb", "legacy_layout": False,
}


def _images(root: Path, n: int = 6, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = (torch.rand(16, 16, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


def _tokenizer_cfg(run_dir: Path, data: Path, *overrides: str):
    cfg = compose_config("tokenizer.train", [
        "experiment=small", "name=tiny", f"run_dir={run_dir}", f"data.root={data}", "data.val_images=2",
        "batch_size=4", "trainer.max_steps=2", "trainer.max_time=null", "trainer.accelerator=cpu",
        "trainer.devices=1", "checkpoint_every_n_steps=1", "trainer.val_check_interval=2",
        "codebook.quantizer_warmup_steps=0", "logger=null", *overrides,
    ])
    OmegaConf.set_struct(cfg, False)
    cfg.model = dict(TINY)
    return cfg


def test_record_resume_and_refuse(tmp_path):
    identity = {"dataset": {"root": "/d", "files": 3}, "model": {"width": 8}, "recipe": {"lr": 1e-3}}
    run = tmp_path / "run"
    assert start_run(run, identity) is False
    assert json.loads((run / "run.json").read_text()) == identity
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert start_run(run, identity) is True  # the same run: resume

    other = {**identity, "dataset": {"root": "/e", "files": 3}}
    with pytest.raises(RunMismatchError) as info:
        start_run(run, other)
    message = str(info.value)
    assert "\n" not in message and "dataset.root (was /d, now /e)" in message
    assert "name=" in message and "resume=false" in message

    assert start_run(run, other, resume=False) is False  # moved aside, never deleted
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "last.ckpt").read_bytes() == b"x"
    assert json.loads((run / "run.json").read_text())["dataset"]["root"] == "/e"


def test_a_record_from_before_an_option_was_added_resumes_at_its_old_value(tmp_path):
    old = {"dataset": {"root": "/d"}, "recipe": {"optim": {"lr": 1e-3}}}
    run = tmp_path / "run"
    start_run(run, old)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    added = {"recipe.optim.loss_weighting": "official"}
    same = {"dataset": {"root": "/d"}, "recipe": {"optim": {"lr": 1e-3, "loss_weighting": "official"}}}
    assert start_run(run, same, added=added) is True
    changed = {"dataset": {"root": "/d"}, "recipe": {"optim": {"lr": 1e-3, "loss_weighting": "elbo"}}}
    with pytest.raises(RunMismatchError, match=r"recipe.optim.loss_weighting \(was official, now elbo\)"):
        start_run(run, changed, added=added)
    with pytest.raises(RunMismatchError):  # without the rule, the new key alone is a difference
        start_run(run, same)


def test_a_run_without_a_record_is_not_resumed_blindly(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(RunMismatchError, match="no record of what it trained"):
        start_run(tmp_path / "run", {"a": 1})


def test_default_run_dir_follows_the_experiment_and_the_dataset(tmp_path):
    assert default_run_dir(package="generator", name="demo", root="data/demo_shapes", builtin="demo") == \
        Path("runs/generator/demo")
    a = default_run_dir(package="generator", name="small", root=tmp_path / "digits", builtin=None)
    b = default_run_dir(package="generator", name="small", root=tmp_path / "letters", builtin=None)
    assert (a, b) == (Path("runs/generator/small-digits"), Path("runs/generator/small-letters"))
    # The demo recipe on other data is another run, too.
    assert default_run_dir(package="generator", name="demo", root=tmp_path / "x", builtin="demo") == \
        Path("runs/generator/demo-x")


def test_dataset_fingerprint_sees_files_come_and_go(tmp_path):
    root = _images(tmp_path / "d", n=2)
    first = dataset_fingerprint(root, "train")
    assert first["files"] == 4 and dataset_fingerprint(root, "train") == first
    (root / "train" / "a" / "extra.png").write_bytes(b"12")
    assert dataset_fingerprint(root, "train")["files"] == 5
    assert dataset_fingerprint(root, "train")["sha256"] != first["sha256"]


def test_tokenizer_training_on_a_second_dataset_is_not_a_resume(tmp_path):
    from tokenizer.train import train

    a, b = _images(tmp_path / "a", seed=0), _images(tmp_path / "b", n=5, seed=1)
    run = tmp_path / "run"
    assert train(_tokenizer_cfg(run, a))["global_step"] == 2
    # A larger budget is a continuation of the same run.
    again = train(_tokenizer_cfg(run, a, "trainer.max_steps=3"))
    assert again["resumed_from_step"] == 2 and again["global_step"] == 3
    # Another dataset under the same run directory: one line, nothing trained.
    with pytest.raises(RunMismatchError, match=r"differs in dataset\.(files|root|sha256)"):
        train(_tokenizer_cfg(run, b, "trainer.max_steps=4"))
    # Another recipe: the same.
    with pytest.raises(RunMismatchError, match=r"recipe\.optim\.lr"):
        train(_tokenizer_cfg(run, a, "trainer.max_steps=4", "optim.lr=0.5"))
    for key in ("loss.gan.factor=0.5", "loss.gan.lecam_ema_decay=0.99", "loss.gan.schedule_processes=8",
                "loss.kl_weight=0.1"):  # the official recipe's keys are part of it
        with pytest.raises(RunMismatchError, match=re.escape(f"recipe.{key.partition('=')[0]}")):
            train(_tokenizer_cfg(run, a, "trainer.max_steps=4", key))
    fresh = train(_tokenizer_cfg(run, b, "resume=false"))
    assert fresh["resumed_from_step"] is None and fresh["global_step"] == 2
    assert len(list(tmp_path.glob("run.old-*"))) == 1


def test_data_is_written_only_where_asked(tmp_path):
    assert builtin_for("data/demo_shapes", None) == "demo"  # the default place: written when missing
    assert builtin_for(tmp_path / "typo", None) is None  # anywhere else only when asked
    assert builtin_for(tmp_path / "mine", "digits") == "digits"
    with pytest.raises(FileNotFoundError, match=f"no dataset at {tmp_path / 'typo'}: expected an image folder"):
        require_dataset(tmp_path / "typo")
    with pytest.raises(ValueError, match="data.builtin must be one of demo, digits"):
        builtin_for(tmp_path, "shapes")


def test_a_typo_in_data_root_writes_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "generator.train", f"data.root={tmp_path / 'some' / 'typo'}", "logger=null"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert f"no dataset at {tmp_path / 'some' / 'typo'}" in errors[0] and "WebDataset" in errors[0]
    assert not (tmp_path / "some").exists()
