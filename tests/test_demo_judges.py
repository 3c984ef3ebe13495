"""The honest demo judges: the colour-blind classifier and precision/recall."""
import numpy as np
import pytest
import torch
from PIL import Image

from eval.gfid import precision_recall
from titok_core import judges as demo


def _shape_images(n: int, size: int = 32, seed: int = 0):
    """Class 0: a filled square; class 1: a hollow square (same area of outline colour, roughly).
    Each image gets a random colour pair, so colour says nothing about the class."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % 2
        bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        img = np.empty((size, size, 3), np.uint8)
        img[:] = bg
        s = int(rng.integers(size // 3, size // 2))
        y, x = rng.integers(0, size - s, 2)
        img[y : y + s, x : x + s] = fg
        if label == 1:
            img[y + 3 : y + s - 3, x + 3 : x + s - 3] = bg
        images.append(img)
        labels.append(label)
    return np.stack(images), np.array(labels)


def test_colour_blind_view_removes_colour_and_brightness():
    x = torch.zeros(1, 3, 16, 16)
    x[:, 0] = 0.2  # dark red ground
    x[:, 0, 4:12, 4:12] = 0.9  # a bright red square
    recoloured = x[:, [2, 0, 1]] * 0.5 + 0.3  # the same picture in another hue, dimmer and brighter ground
    a = demo.colour_blind(x, generator=torch.Generator().manual_seed(3))
    b = demo.colour_blind(recoloured, generator=torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a[:, 0], a[:, 1]) and torch.equal(a[:, 0], a[:, 2])
    # Only the shape survives: the two views agree up to which side is brighter.
    assert min((a - b).abs().max(), (a - (1 - b)).abs().max()) < 1e-4
    assert (a[0, 0, 4:12, 4:12].mean() - a[0, 0, :4].mean()).abs() > 0.5  # the square stays visible
    # Intensity maps differ per image and per draw: brightness carries nothing.
    many = demo.colour_blind(x.expand(64, -1, -1, -1), generator=torch.Generator().manual_seed(0))
    square = many[:, 0, 4:12, 4:12].mean((1, 2))
    assert square.min() < 0.05 and square.max() > 0.95


def test_colour_blind_classifier_learns_shape_not_colour(tmp_path):
    images, labels = _shape_images(240)
    for split, sl in (("train", slice(0, 200)), ("val", slice(200, 240))):
        for i in range(sl.start, sl.stop):
            folder = tmp_path / split / f"class_{labels[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:03d}.png")
    clf = demo.train_demo_classifier(tmp_path, resolution=32, width=16, steps=150, batch_size=32, colour_blind=True)
    assert clf.colour_blind and clf.config["colour_blind"] is True
    assert clf.config["val_accuracy"] >= 0.9
    val, val_labels = demo.load_split(tmp_path, "val", resolution=32, classes=clf.classes)
    # The same verdicts every call (maps drawn from a fixed seed), whatever the hue.
    x = val.float() / 255
    assert torch.equal(clf.classify(x), clf.classify(x))
    assert clf.class_accuracy(x[:, [1, 2, 0]], val_labels) >= 0.85


def test_precision_recall_tell_coverage_from_realism():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=g)
    same = torch.randn(400, 8, generator=g)
    p, r = precision_recall(same, real)
    assert p > 0.75 and r > 0.75  # k=3 balls in 8-D: about 0.85 for two draws of one law
    # Mode collapse: realistic samples that cover a sliver of the real data -> high precision, low recall.
    collapsed = real[:20].repeat(20, 1) + 0.01 * torch.randn(400, 8, generator=g)
    p, r = precision_recall(collapsed, real)
    assert p > 0.95 and r < 0.3
    # Far away samples: neither.
    p, r = precision_recall(same + 10, real)
    assert p == 0.0 and r == 0.0


def test_without_a_val_split_the_judges_hold_out_part_of_train(tmp_path):
    """The held-out rule: val when it has images; else a fixed tenth of every train class, which the
    classifier never trains on (and whose cache key says so)."""
    images, labels = _shape_images(60)
    for i in range(60):
        folder = tmp_path / "train" / f"class_{labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i:03d}.png")
    split = demo.judge_files(tmp_path)
    assert split["heldout_from"] == "train" and "excluded from the judges' training" in demo.heldout_description(split)
    assert [y for _, y in split["heldout"]] == [0, 0, 0, 1, 1, 1]  # 10% of each class
    assert not {f for f, _ in split["heldout"]} & {f for f, _ in split["train"]} and len(split["train"]) == 54
    assert demo.judge_files(tmp_path) == split  # the same files on every call
    held, held_labels = demo.load_judge_part(split, "heldout", resolution=32)
    assert held.shape == (6, 3, 32, 32) and held.dtype == torch.uint8
    key_without_val = demo.cache_key(tmp_path, seed=0)
    for i in (0, 1):  # a val split appears: it judges now, all of train trains, and the cache key changes
        (tmp_path / "val" / f"class_{i}").mkdir(parents=True)
        Image.fromarray(images[i]).save(tmp_path / "val" / f"class_{i}" / "v.png")
    split = demo.judge_files(tmp_path)
    assert split["heldout_from"] == "val" and len(split["heldout"]) == 2 and len(split["train"]) == 60
    assert demo.cache_key(tmp_path, seed=0) != key_without_val
    (tmp_path / "val").rename(tmp_path / "v")
    (tmp_path / "train" / "class_2").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "train" / "class_2" / "only.png")
    with pytest.raises(ValueError, match="class_2 has 1 image.*no val/"):
        demo.judge_files(tmp_path)
