"""After `pip install .` (not editable), the demo chain runs from an empty directory.

The project is built into a wheel and installed (without dependencies, which the test venv has)
into a folder put first on PYTHONPATH; the commands then run in an empty temporary directory, so
every shipped file (configs, the demo tokenizer and generator) must come from the package.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("wheel")
    target = tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(build), str(REPO)], check=True,
                   capture_output=True, timeout=300, cwd=build)
    wheel = next(build.glob("titok_gen-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    return target


def _run(site: Path, cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "XDG_CACHE_HOME": str(cwd / ".cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_demo_chain_from_an_empty_directory(installed, tmp_path):
    cwd = tmp_path / "empty"
    cwd.mkdir()
    where = _run(installed, cwd, "-c", "import tokenizer, generator, conf; print(tokenizer.__file__, conf.__file__)")
    assert all(p.startswith(str(installed)) for p in where.stdout.split()), where.stdout

    # Sampling with nothing trained here: the shipped demo generator and tokenizer.
    _run(installed, cwd, "-m", "sampling.generate", "class=3", "n=4", "batch_size=4")
    grid = cwd / "outputs" / "samples" / "grid.png"
    assert len(list(grid.parent.glob("sample_*_class3.png"))) == 4
    with Image.open(grid.parent / "sample_00000_class3.png") as im:
        assert im.size == (64, 64)

    # Reconstruction with the shipped tokenizer.
    _run(installed, cwd, "-m", "tokenizer.reconstruct", f"inputs={grid.parent / 'sample_00000_class3.png'}",
         "out_dir=recon")  # the default tokenizer: the shipped titok_demo
    assert list((cwd / "recon").glob("*.png"))

    # The main job, shrunk: demo data and token cache are made here, then a few steps.
    _run(installed, cwd, "-m", "generator.train", "data.demo_train_per_class=8", "data.demo_val_per_class=4",
         "trainer.max_steps=3", "trainer.max_time=null", "batch_size=8", "sample_every_n_steps=0",
         "trainer.val_check_interval=2", "cache.batch_size=64")
    checkpoint = cwd / "runs" / "generator" / "demo" / "generator.safetensors"
    assert checkpoint.is_file()

    # Now sampling and evaluation take the local run.
    out = _run(installed, cwd, "-m", "eval.gfid", "demo_per_class=4", "classifier_steps=20", "colour_blind_steps=20",
               "batch_size=20", "out=result.json")
    result = json.loads((cwd / "result.json").read_text())
    assert result["num_samples"] == 40 and result["model"] == str(Path("runs/generator/demo/generator.safetensors"))
    assert 0.0 <= result["colour_blind_accuracy"] <= 1.0 and 0.0 <= result["recall"] <= 1.0
    # The tokenizer's ceiling, judged on its reconstructions of the 40 real val images.
    assert len(result["reconstruction_colour_blind_per_class_accuracy"]) == 10
    assert 0.0 <= result["reconstruction_colour_blind_accuracy"] <= 1.0 and result["reconstruction_psnr"] > 10
    assert "colour-blind" in out.stdout
