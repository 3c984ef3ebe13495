"""scripts/make_official_fixtures.py, the script that regenerates tests/fixtures from the official code.

It needs an official checkout (and transformers) to run, which tests do not have; what can be
checked without them is checked here: it imports, it explains itself, it refuses a checkout that is
not at the pinned commit before touching anything, and its recipes (synthetic images, generator
inputs, re-randomised weights, manifests) give exactly the committed fixtures.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import FIXTURES, REPO

SCRIPT = REPO / "scripts" / "make_official_fixtures.py"
PINNED = "942a96fbdd873780179d1b78d5462911528bf8c8"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_official_fixtures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_it_imports_without_the_official_code(script):
    assert script.PINNED_COMMIT == PINNED
    assert set(script.PARTS) == {"official_tiny", "official_training", "official_vq8k_tiny", "official_vae_tiny",
                                 "shapes"}
    assert "modeling" not in sys.modules  # nothing official is imported until it runs
    args = script.parse_args(["--official", "somewhere", "--only", "shapes,official_vae_tiny"])
    assert args.only == ["shapes", "official_vae_tiny"] and Path(args.out) == FIXTURES


def test_help():
    out = _run("--help")
    assert out.returncode == 0, out.stderr
    assert "--official" in out.stdout and PINNED in out.stdout and "--only" in out.stdout


def test_unknown_part_is_refused():
    out = _run("--official", ".", "--only", "official_tiny,everything")
    assert out.returncode == 2 and "everything" in out.stderr


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(cwd), *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_refuses_a_checkout_at_another_commit(tmp_path, script):
    fake = tmp_path / "1d-tokenizer"
    (fake / "modeling").mkdir(parents=True)
    (fake / "modeling" / "titok.py").write_text("raise SystemExit('the official code must not be imported')\n")
    _git(fake, "init", "-q")
    _git(fake, "add", ".")
    _git(fake, "commit", "-q", "-m", "not the official code")
    commit = _git(fake, "rev-parse", "HEAD")
    out_dir = tmp_path / "out"
    out = _run("--official", str(fake), "--out", str(out_dir))
    assert out.returncode != 0
    assert commit in out.stderr and PINNED in out.stderr and "not the pinned" in out.stderr
    assert not out_dir.exists()  # refused before anything was written
    with pytest.raises(SystemExit, match="not the pinned"):
        script.check_checkout(fake)


def test_refuses_what_is_not_a_checkout(tmp_path, script):
    out = _run("--official", str(tmp_path), "--out", str(tmp_path / "out"))
    assert out.returncode != 0 and "not a git checkout" in out.stderr
    with pytest.raises(SystemExit, match="no such directory"):
        script.check_checkout(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# The recipes give the committed fixtures.


def test_synthetic_images_are_the_committed_inputs(script):
    tiny = torch.load(FIXTURES / "official_tiny" / "tokenizer" / "inputs.pt", weights_only=True)["x"]
    assert torch.equal(script.synthetic_image_tiny(64), tiny[0])
    for case in ("official_vq8k_tiny", "official_vae_tiny"):
        x = torch.load(FIXTURES / case / "inputs.pt", weights_only=True)["x"]
        assert torch.equal(script.synthetic_image_single_stage(32), x[0]), case


@pytest.mark.parametrize("part, seed", [("generator_imagebert", 1001), ("generator_uvit", 1002)])
def test_generator_inputs_are_the_committed_ones(script, part, seed):
    want = torch.load(FIXTURES / "official_tiny" / part / "inputs.pt", weights_only=True)
    got = script.generator_inputs(seed + script.TINY_INPUT_OFFSET, batch=4, num_tokens=8, codebook_size=64,
                                  num_classes=10)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def _reinit_like(script, state_dict: dict, **kwargs) -> dict:
    """reinit_scaled_ on parameters named and shaped as ``state_dict`` (the kept ones copied)."""
    keep = set(kwargs.get("keep", ()))
    params = {k: nn.Parameter(v.clone() if k in keep else torch.zeros_like(v)) for k, v in state_dict.items()}
    model = SimpleNamespace(named_parameters=lambda: iter(params.items()))
    script.reinit_scaled_(model, **kwargs)
    return {k: p.detach() for k, p in params.items()}


def _case_weights(script, name: str):
    s = script
    if name == "official_tiny/tokenizer":
        return "tokenizer.bin", dict(generator=torch.Generator().manual_seed(1000 + s.TINY_REINIT_OFFSET),
                                     keep=s.KEPT_TITOK, qk=s._qk_mha, unit_normal=("pixel_quantize.embedding.weight",))
    if name == "official_tiny/generator_imagebert":
        return "generator.bin", dict(generator=torch.Generator().manual_seed(1001 + s.TINY_REINIT_OFFSET),
                                     qk=s._qk_bert)
    if name == "official_tiny/generator_uvit":
        return "generator.bin", dict(generator=torch.Generator().manual_seed(1002 + s.TINY_REINIT_OFFSET),
                                     keep=["pos_embed"], qk=s._qk_uvit)
    seed = s.SINGLE_STAGE_SEEDS[name]
    kwargs = dict(generator=torch.Generator().manual_seed(seed), keep=s.KEPT_TITOK, qk=s._qk_mha,
                  unit_normal=("quantize.embedding.weight",))
    if name == "official_vae_tiny":
        kwargs["extra_gain"] = lambda n: (slice(16, None), s.VAE_LOGVAR_GAIN) if n.startswith("encoder.conv_out.") else None
    return "tokenizer.bin", kwargs


@pytest.mark.parametrize("name", ["official_tiny/tokenizer", "official_tiny/generator_imagebert",
                                  "official_tiny/generator_uvit", "official_vq8k_tiny", "official_vae_tiny"])
def test_reinit_gives_the_committed_weights(script, name):
    """Every re-randomised tensor is bit for bit the committed one (the rest is the official init)."""
    file, kwargs = _case_weights(script, name)
    committed = torch.load(FIXTURES / name / file, weights_only=True)
    got = _reinit_like(script, committed, **kwargs)
    assert list(got) == list(committed)
    wrong = [k for k in committed if not torch.equal(got[k], committed[k])]
    assert not wrong, wrong


@pytest.mark.parametrize("part, file", [("tokenizer", "tokenizer.bin"), ("generator_imagebert", "generator.bin"),
                                        ("generator_uvit", "generator.bin")])
def test_manifest_is_the_committed_one(script, part, file):
    d = FIXTURES / "official_tiny" / part
    want = json.loads((d / "manifest.json").read_text())
    got = script.manifest(torch.load(d / file, weights_only=True), file=file, cls=want["class"])
    assert got == want


def test_recorded_qk_rows_are_what_the_script_scales(script):
    """The names the committed metadata lists as scaled are those reinit_scaled_ reports."""
    meta = json.loads((FIXTURES / "official_tiny" / "meta.json").read_text())
    for part in ("tokenizer", "generator_imagebert", "generator_uvit"):
        name = f"official_tiny/{part}"
        file, kwargs = _case_weights(script, name)
        committed = torch.load(FIXTURES / name / file, weights_only=True)
        params = {k: nn.Parameter(torch.zeros_like(v)) for k, v in committed.items()}
        done = script.reinit_scaled_(SimpleNamespace(named_parameters=lambda: iter(params.items())), **kwargs)
        recorded = meta["parts"][f"official_tiny/{part}"]["init"]
        assert script._init_record(done, kwargs.get("keep", [])) == recorded, part


def test_training_parts_are_recorded_with_the_script_recipes(script):
    """The training fixtures were made with the seeds, loss groups and discriminator variants the
    script holds now (the parity tests rebuild their inputs and weights from these)."""
    meta = json.loads((FIXTURES / "official_tiny" / "meta.json").read_text())
    assert meta["official_training"]["seeds"] == script.TRAINING_SEEDS
    assert meta["official_training"]["official_commit"] == PINNED
    for part in ("discriminator", "perceptual", "losses", "clustering_vq"):
        assert meta["parts"][f"official_tiny/{part}"]["script_part"] == "official_training", part
    losses = json.loads((FIXTURES / "official_tiny" / "losses" / "expected.json").read_text())["cases"]
    for case, group in script.LOSS_CASES.items():
        assert script._plain(script.loss_config(case)) == losses[case]["config"], case
    discriminator = json.loads((FIXTURES / "official_tiny" / "discriminator" / "expected.json").read_text())
    assert discriminator["cases"] == script.DISCRIMINATOR_CASES
    a, b = script.training_images(7, 1), script.training_images(7, 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and 0 <= float(a[1].min()) and float(a[1].max()) <= 1
