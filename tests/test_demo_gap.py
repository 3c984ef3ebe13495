"""eval.gfid mode=demo reports the tokenizer's ceiling beside the samples, and the ratios between
them; it judges any image folder, with val/ or without (a fixed tenth of each class of train/
held out, never trained on)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_eval import _demo_folder

from eval.demo_mode import gap_ratios
from titok_core import judges as demo

from commands import assert_one_line_error, json_line, tiny_args, tiny_models
from conftest import REPO


def run_gfid(*args: str, cwd, cache) -> subprocess.CompletedProcess:
    """``python -m eval.gfid args`` with the demo classifiers cached under ``cache``."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "eval.gfid", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_judges_hold_out_a_fixed_tenth_of_train_without_val(tmp_path):
    root = _demo_folder(tmp_path / "d", {"train": 25})
    split = demo.judge_files(root)
    assert split["heldout_from"] == "train" and split["classes"][0] == "class_0"
    held, kept = split["heldout"], split["train"]
    assert len(held) == 10 * 2 and len(kept) == 10 * 23  # round(0.1 * 25) = 2 of each class
    assert not {p for p, _ in held} & {p for p, _ in kept}
    assert sorted(p for p, _ in held + kept) == sorted(demo.list_image_files(root / "train"))
    assert [y for _, y in held] == [c for c in range(10) for _ in range(2)]
    assert demo.judge_files(root) == split  # the same files every time
    assert "20 images of train/" in demo.heldout_description(split)

    (root / "val" / "class_0").mkdir(parents=True)
    shutil.copy(held[0][0], root / "val" / "class_0" / "x.png")
    with_val = demo.judge_files(root)
    assert with_val["heldout_from"] == "val" and len(with_val["heldout"]) == 1 and len(with_val["train"]) == 250
    assert demo.heldout_description(with_val) == "held out: the 1 images of val/"


def test_classifier_trains_without_the_heldout_images(tmp_path, monkeypatch):
    root = _demo_folder(tmp_path / "d", {"train": 10})
    seen = []
    real_read = demo._read_images
    monkeypatch.setattr(demo, "_read_images", lambda files, res: seen.append(list(files)) or real_read(files, res))
    clf = demo.train_demo_classifier(root, resolution=32, width=8, steps=3, batch_size=8)
    split = demo.judge_files(root)
    assert seen[0] == [p for p, _ in split["train"]] and seen[1] == [p for p, _ in split["heldout"]]
    assert clf.config["heldout_from"] == "train" and 0.0 <= clf.config["val_accuracy"] <= 1.0
    # The classifier cache tells the two splits apart: adding val/ later trains anew.
    key = demo.cache_key(root, steps=3)
    (root / "val" / "class_0").mkdir(parents=True)
    shutil.copy(split["heldout"][0][0], root / "val" / "class_0" / "x.png")
    assert demo.cache_key(root, steps=3) != key


def test_gap_ratios():
    r = gap_ratios({"classifier_fid": 6.0, "ceiling_classifier_fid": 2.0, "class_accuracy": 0.45,
                    "reconstruction_class_accuracy": 0.9, "colour_blind_accuracy": 0.3,
                    "reconstruction_colour_blind_accuracy": 0.0})
    assert r == {"fid_ratio": 3.0, "accuracy_ratio": 0.5, "colour_blind_ratio": None}


@pytest.fixture(scope="module")
def tiny(official_tiny) -> dict:
    return tiny_models(official_tiny)


def _demo_args(tiny, root, tmp_path) -> list[str]:
    return ["mode=demo", *tiny_args(tiny), f"data.root={root}", "demo_per_class=3", "classifier_steps=5",
            "colour_blind_steps=5", "batch_size=10", f"out={tmp_path / 'result.json'}", "trainer.accelerator=cpu",
            "dtype=fp32"]


@pytest.mark.parametrize("splits", [pytest.param({"train": 8, "val": 3}, marks=pytest.mark.slow), {"train": 10}])
def test_gfid_demo_reports_the_ceiling_and_the_ratios(tiny, tmp_path, splits):
    root = _demo_folder(tmp_path / "d", splits)
    proc = run_gfid(*_demo_args(tiny, root, tmp_path), cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json_line(proc)
    heldout = 30 if "val" in splits else 10  # val/: 3 a class; else round(0.1 * 10) = 1 a class of train/
    assert r["heldout_images"] == heldout and r["num_samples"] == 30 and r["ceiling_images"] == 30
    assert r["heldout"].startswith("held out: the") == ("val" in splits)
    for key in ("ceiling_classifier_fid", "ceiling_precision", "ceiling_recall", "ceiling_train_class_accuracy"):
        assert isinstance(r[key], float), key
    assert r["ceiling_classifier_fid"] > 0
    assert r["fid_ratio"] == pytest.approx(r["classifier_fid"] / r["ceiling_classifier_fid"])
    if r["reconstruction_class_accuracy"]:
        assert r["accuracy_ratio"] == pytest.approx(r["class_accuracy"] / r["reconstruction_class_accuracy"])
    assert "ceiling" in proc.stdout and "classifier-FID" in proc.stdout and r["heldout"] in proc.stdout


def test_gfid_demo_refuses_a_dataset_it_cannot_hold_out_at_once(tiny, tmp_path):
    root = _demo_folder(tmp_path / "d", {"train": 1})
    proc = run_gfid(*_demo_args(tiny, root, tmp_path), cwd=tmp_path, cache=tmp_path / "cache")
    assert_one_line_error(proc, "class_0", "no val/", "at least 2")
    assert not (tmp_path / "cache").exists()  # refused before any classifier trained


def test_strided_ceiling_index():
    from eval.demo_mode import _strided

    assert _strided(torch.arange(10), 3).tolist() == [0, 4, 9]  # linspace 0, 4.5, 9 rounded half to even
    assert _strided(torch.tensor([4, 7]), 5).tolist() == [4, 7, 4, 7, 4]


def test_real_reference_takes_every_class_as_often_as_it_is_held_out():
    from eval.demo_mode import real_reference_index

    # The digits' sizes: 1,528 training images against 269 held out, ordered by class. A stride over the
    # whole split (1528 // 269 = 5, the first 269 of 306) left class 9 out entirely.
    train = torch.arange(10).repeat_interleave(torch.tensor([151, 155, 150, 156, 154, 155, 154, 152, 148, 153]))
    heldout = torch.arange(10).repeat_interleave(torch.tensor([27, 27, 27, 27, 27, 27, 27, 27, 26, 27]))
    index = real_reference_index(train, heldout)
    assert len(index) == len(heldout) == 269
    assert torch.equal(torch.bincount(train[index], minlength=10), torch.bincount(heldout, minlength=10))
    assert len(set(index.tolist())) == len(index)  # no image twice where the class has enough
    first9 = int(torch.nonzero(train == 9)[0])
    assert int(index[train[index] == 9].min()) == first9 and int(index.max()) == len(train) - 1  # spread over the class
