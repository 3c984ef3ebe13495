"""What the sampling, evaluation and reconstruction commands write, run as a user runs them: a
subprocess per call, on the tiny official fixtures. (Their mistakes, and every other entry point's:
tests/test_command_line.py.)

Each call pays ~5 s of imports; the file takes about a minute and a half on an idle 2-core machine.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from commands import PAD, json_line, png_size, tiny_args, tiny_generator_file, tiny_models, write_pngs
from commands import run_module as run_cli


@pytest.fixture(scope="module")
def tiny(official_tiny) -> dict:
    return tiny_models(official_tiny)


# ---------------------------------------------------------------- sampling.generate


def test_generate_one_class_reproducible(tiny, tmp_path):
    """class=3 n=4: four 64x64 PNGs and a grid, paths printed; the seed fixes every byte."""
    # The fixture config decodes with randomize_temperature 0 (deterministic); turn the noise on.
    args = [*tiny_args(tiny), "class=3", "n=4", "sampling.randomize_temperature=3.0"]
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / name
        proc = run_cli("sampling.generate", *args, f"seed={seed}", f"out_dir={out}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        pngs = sorted(out.glob("sample_*.png"))
        assert [p.name for p in pngs] == [f"sample_{i:05d}_class3.png" for i in range(4)]
        assert all(png_size(p) == (64, 64) for p in pngs)
        assert png_size(out / "grid.png") == (4 * 64 + 5 * PAD, 64 + 2 * PAD)  # one row of 4
        assert proc.stdout.splitlines() == [*map(str, pngs), f"grid: {out / 'grid.png'}"]
        runs[name] = [p.read_bytes() for p in [*pngs, out / "grid.png"]]
    assert len(set(runs["a"][:4])) > 1  # the noise makes samples of one class differ
    assert runs["a"] == runs["b"]
    assert all(a != c for a, c in zip(runs["a"], runs["c"]))


def test_generate_class_list_and_random(tiny, tmp_path):
    out = tmp_path / "list"
    proc = run_cli(
        "sampling.generate", *tiny_args(tiny), "class=[1,2]", "n=3", "dtype=fp32", f"out_dir={out}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.glob("sample_*.png"))
    assert names == ["sample_00000_class1.png", "sample_00001_class2.png", "sample_00002_class1.png"]
    assert png_size(out / "grid.png") == (3 * 64 + 4 * PAD, 64 + 2 * PAD)

    out = tmp_path / "random"
    proc = run_cli(
        "sampling.generate", *tiny_args(tiny), "class=random", "n=5", "dtype=fp32", f"out_dir={out}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    pngs = sorted(out.glob("sample_*.png"))
    assert len(pngs) == 5 and all(png_size(p) == (64, 64) for p in pngs)
    assert all(0 <= int(p.stem.rsplit("class", 1)[1]) < 10 for p in pngs)
    assert (out / "grid.png").is_file() and len(proc.stdout.splitlines()) == 6


def test_generate_demo_run_default(tiny, tmp_path):
    """No arguments: the demo run in ./runs, else the shipped demo generator."""
    proc = run_cli("sampling.generate", "n=2", "class=1", f"out_dir={tmp_path / 'shipped'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "generator: maskgit_demo" in proc.stderr  # logged, on stderr: stdout holds only the paths
    assert png_size(tmp_path / "shipped" / "sample_00000_class1.png") == (64, 64)

    # A demo checkpoint records its tokenizer, so it needs nothing else.
    tiny_generator_file(
        tmp_path / "runs/generator/demo/generator.safetensors", codebook_size=64,
        tokenizer={"spec": str(tiny["tokenizer.spec"]), "checkpoint": str(tiny["tokenizer.checkpoint"])},
    )
    proc = run_cli("sampling.generate", "n=2", "class=4", f"out_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "grid.png", "sample_00000_class4.png", "sample_00001_class4.png",
    ]


# ---------------------------------------------------------------- eval.gfid


def test_gfid_inception_and_resume(tiny, tmp_path, inception_weights, reference_npz):
    state = tmp_path / "state"
    args = [
        "mode=inception", *tiny_args(tiny), f"reference={reference_npz}", f"inception_weights={inception_weights}",
        "num_samples=10", "batch_size=5", f"state_dir={state}", "trainer.accelerator=cpu", "dtype=fp32",
    ]
    proc = run_cli("eval.gfid", *args, f"out={tmp_path / 'result.json'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json_line(proc)
    assert result["metric"] == "gFID" and result["num_samples"] == 10 and result["seed"] == 0
    assert np.isfinite(result["fid"]) and result["fid"] > 0 and result["is_mean"] >= 1.0
    assert result["model"] == str(tiny["generator.spec"]) and result["sampling"]["num_steps"] == 8
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert len(list(state.glob("gfid-*-rank0.pt"))) == 1

    # Same state_dir: every batch is already done, so nothing is sampled and the figures are those saved.
    again = run_cli("eval.gfid", *args, f"out={tmp_path / 'again.json'}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "2 batches done" in again.stdout + again.stderr
    assert json_line(again)["fid"] == result["fid"] and json_line(again)["is_mean"] == result["is_mean"]


def test_gfid_rfid(tiny, tmp_path, inception_weights):
    write_pngs(tmp_path / "val", 6)
    proc = run_cli(
        "eval.gfid", "mode=rfid", f"tokenizer.spec={tiny['tokenizer.spec']}",
        f"tokenizer.checkpoint={tiny['tokenizer.checkpoint']}",
        f"data.root={tmp_path / 'val'}", "num_samples=6", "batch_size=3", f"inception_weights={inception_weights}",
        f"state_dir={tmp_path / 'state'}", f"out={tmp_path / 'rfid.json'}", "trainer.accelerator=cpu", "dtype=fp32", cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    result = json_line(proc)
    assert result["metric"] == "rFID" and result["num_images"] == 6
    assert np.isfinite(result["fid"]) and result["fid"] >= 0
    assert 0 < result["psnr"] < 100 and -1 <= result["ssim"] <= 1


# ---------------------------------------------------------------- tokenizer.reconstruct


def test_reconstruct_skips_unreadable(tiny, tmp_path):
    pytest.importorskip("titok_core.data")
    inputs = tmp_path / "photos"
    write_pngs(inputs, 3)
    (inputs / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "recon"
    proc = run_cli(
        "tokenizer.reconstruct", f"inputs={inputs}", f"tokenizer.spec={tiny['tokenizer.spec']}",
        f"tokenizer.checkpoint={tiny['tokenizer.checkpoint']}", f"out_dir={out}", cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    written = sorted(out.glob("*_recon.png"))
    assert [p.name for p in written] == [f"img{i}_recon.png" for i in range(3)]
    assert all(png_size(p) == (2 * 64 + 3 * PAD, 64 + 2 * PAD) for p in written)  # input | reconstruction
    assert proc.stdout.count("tokens [") == 3
    assert "skipped 1 unreadable image" in proc.stdout + proc.stderr
