"""Image data: the demo domain, image folders (ImageNet layout), bad files, official preprocessing."""
import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from titok_core import demo_shapes
from titok_core.data import (
    ImageFolderDataset,
    collate_skip_bad,
    list_image_files,
    list_images,
    load_image_rgb,
    preprocess,
    to_rgb,
)
from titok_core.demo_shapes import CLASS_NAMES, image_rng, make_demo_dataset, render_demo_image, render_demo_sample


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).copy()


def asymmetric(w: int = 40, h: int = 30) -> Image.Image:
    """Left half dark, right half bright, with a vertical ramp: no symmetry to hide a flip or crop."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, w // 2 :] = 220
    a[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    return Image.fromarray(a, "RGB")


# ---------------------------------------------------------------- demo domain


def test_demo_image_is_a_function_of_its_seed():
    a = render_demo_image(3, image_rng(0, "train", 3, 7))
    assert a.mode == "RGB" and a.size == (64, 64)
    assert np.array_equal(pixels(a), pixels(render_demo_image(3, image_rng(0, "train", 3, 7))))
    for other in [image_rng(1, "train", 3, 7), image_rng(0, "val", 3, 7), image_rng(0, "train", 3, 8)]:
        assert not np.array_equal(pixels(a), pixels(render_demo_image(3, other)))
    assert render_demo_image(0, image_rng(0, "train", 0, 0), size=32).size == (32, 32)


def test_demo_classes_differ_in_colour_and_shape():
    assert len(CLASS_NAMES) == 10 and CLASS_NAMES == sorted(CLASS_NAMES)
    colours, coverage = [], []
    for c in range(10):
        samples = [render_demo_sample(c, image_rng(0, "train", c, i)) for i in range(8)]
        colours.append(np.concatenate([pixels(img)[mask > 0.99] for img, mask in samples]).mean(0))
        coverage.append(np.mean([mask.mean() for _, mask in samples]))
    colours = np.array(colours)
    dist = np.linalg.norm(colours[:, None] - colours[None], axis=-1)  # (10, 10), RGB 0..255
    assert dist[~np.eye(10, dtype=bool)].min() > 60
    assert min(coverage) > 0.05  # objects are big enough to learn

    # One generator state gives every class the same position, scale and angle: only the shape differs.
    for k in range(5):
        masks = [render_demo_sample(c, np.random.default_rng(k))[1] > 0.5 for c in range(10)]
        for a in range(10):
            for b in range(a + 1, 10):
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.9, (CLASS_NAMES[a], CLASS_NAMES[b], iou)


def test_make_demo_dataset_tree_idempotence_and_class_order(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", num_train_per_class=3, num_val_per_class=2, size=32, seed=5)
    assert sorted(p.name for p in root.iterdir()) == ["classes.json", "train", "val"]
    manifest = json.loads((root / "classes.json").read_text())
    assert manifest["classes"] == CLASS_NAMES and manifest["seed"] == 5 and manifest["size"] == 32
    for split, n in [("train", 3), ("val", 2)]:
        assert sorted(p.name for p in (root / split).iterdir()) == CLASS_NAMES
        for name in CLASS_NAMES:
            assert sorted(p.name for p in (root / split / name).iterdir()) == [f"{i:05d}.png" for i in range(n)]
    # Any file is reproducible alone (PNG is lossless).
    img = Image.open(root / "train" / CLASS_NAMES[4] / "00002.png")
    assert np.array_equal(pixels(img), pixels(render_demo_image(4, image_rng(5, "train", 4, 2), size=32)))

    ds = ImageFolderDataset(root / "train", resolution=32, train=False)
    assert ds.classes == CLASS_NAMES and len(ds) == 30
    assert [label for _, label in ds.samples] == [c for c in range(10) for _ in range(3)]

    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert make_demo_dataset(root, num_train_per_class=3, num_val_per_class=2, size=32, seed=5) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    with pytest.raises(FileExistsError):
        make_demo_dataset(root, num_train_per_class=3, num_val_per_class=2, size=32, seed=6)
    assert not list(tmp_path.glob(".demo.tmp-*"))

    no_val = make_demo_dataset(tmp_path / "no_val", num_train_per_class=1, num_val_per_class=0, size=16)
    assert not (no_val / "val").exists()


def test_make_demo_dataset_parallel_matches_serial(tmp_path):
    a = make_demo_dataset(tmp_path / "a", num_train_per_class=2, num_val_per_class=1, size=16, num_workers=0)
    b = make_demo_dataset(tmp_path / "b", num_train_per_class=2, num_val_per_class=1, size=16, num_workers=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 30 and files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_killed_demo_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    calls = []

    def dies(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(*args, **kwargs)

    real = demo_shapes._write_images
    monkeypatch.setattr(demo_shapes, "_write_images", dies)
    with pytest.raises(KeyboardInterrupt):
        make_demo_dataset(tmp_path / "demo", num_train_per_class=2, num_val_per_class=0, size=16, num_workers=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setattr(demo_shapes, "_write_images", real)
    root = make_demo_dataset(tmp_path / "demo", num_train_per_class=2, num_val_per_class=0, size=16, num_workers=0)
    assert len(list(root.rglob("*.png"))) == 20


# ---------------------------------------------------------------- image folders


def test_imagenet_layout_sorted_wnids_are_labels(tmp_path):
    wnids = ["n01530575", "n01440764", "n01443537"]  # not in sorted order on purpose
    for k, wnid in enumerate(wnids):
        d = tmp_path / "train" / wnid
        d.mkdir(parents=True)
        for j in range(k + 1):
            asymmetric().save(d / f"{wnid}_{j}.JPEG")
    (tmp_path / "train" / "n01440764" / "nested").mkdir()
    asymmetric().save(tmp_path / "train" / "n01440764" / "nested" / "extra.PNG")
    (tmp_path / "train" / "n01440764" / "._n01440764_0.JPEG").write_bytes(b"AppleDouble")  # hidden: ignored
    (tmp_path / "train" / "n01440764" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "LICENSE").write_text("a file next to the class folders")

    ds = ImageFolderDataset(tmp_path / "train", resolution=16, train=False)
    assert ds.classes == sorted(wnids)
    assert [(p.rsplit("/", 1)[1], y) for p, y in ds.samples] == [
        ("n01440764_0.JPEG", 0), ("n01440764_1.JPEG", 0), ("extra.PNG", 0),
        ("n01443537_0.JPEG", 1), ("n01443537_1.JPEG", 1), ("n01443537_2.JPEG", 1), ("n01530575_0.JPEG", 2),
    ]
    x, y = ds[6]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 2
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "missing", resolution=16, train=False)


def _bad_images(folder):
    """Every awkward file the loader must convert, plus three it must skip; returns the skipped names."""
    folder.mkdir(parents=True)
    rgb = asymmetric(64, 48)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    rgb.convert("L").save(folder / "gray.jpg")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: must come out white
    rgba.save(folder / "transparent.png")
    rgb.convert("LA").save(folder / "la.png")
    rgb.quantize(8).save(folder / "palette.png")
    Image.fromarray(np.full((20, 24), 32768, np.uint16)).save(folder / "sixteen_bit.png")  # mode I;16
    rgb.resize((10, 10)).save(folder / "tiny.bmp")
    rgb.save(folder / "ok.webp")
    rgb.save(folder / "ok.TIFF")
    (folder / "not_an_image.jpg").write_bytes(b"this is text, not a JPEG")
    (folder / "empty.png").write_bytes(b"")
    return {"not_an_image.jpg", "empty.png", "truncated.jpg"}


def test_bad_images_are_converted_or_skipped(tmp_path, caplog):
    skipped = _bad_images(tmp_path / "train" / "cls")
    ds = ImageFolderDataset(tmp_path / "train", resolution=32, train=False)
    assert len(ds) == 12
    with caplog.at_level(logging.WARNING, logger="titok_core.data"):
        out = {p.rsplit("/", 1)[1]: ds[i] for i, (p, _) in enumerate(ds.samples)}
        again = [ds[i] for i in range(len(ds))]  # known-bad files are not re-read nor re-warned
    assert {name for name, item in out.items() if item is None} == skipped
    assert sum(item is None for item in again) == 3 and ds.num_skipped == 3
    for name, item in out.items():
        if item is not None:
            x, y = item
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0, name
            assert 0.0 <= x.min() and x.max() <= 1.0, name
    assert torch.all(out["transparent.png"][0] == 1.0)  # composited on white
    assert torch.allclose(out["sixteen_bit.png"][0], torch.tensor(128 / 255))  # 32768 / 257, not clipped to white
    assert out["gray.jpg"][0][0].equal(out["gray.jpg"][0][2])
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 3 and sum("truncated" in m for m in warned) == 1  # one line per file
    assert all(any(name in m for m in warned) for name in skipped)


def test_dataloader_over_bad_folder_runs_to_the_end(tmp_path):
    _bad_images(tmp_path / "train" / "a")
    asymmetric().save(tmp_path / "train" / "b.png")  # a stray file beside the class folders
    ds = ImageFolderDataset(tmp_path / "train", resolution=16, train=True, random_crop=True)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_skip_bad)
    batches = [b for b in loader if b is not None]
    assert sum(len(labels) for _, labels in batches) == 9
    assert all(x.shape[1:] == (3, 16, 16) and labels.dtype == torch.int64 for x, labels in batches)
    assert ds.num_skipped == 3  # counted across the worker processes
    assert collate_skip_bad([None, None]) is None


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGBA", "LA", "CMYK", "YCbCr", "I", "I;16", "F"])
def test_to_rgb_handles_every_mode(mode):
    base = asymmetric(8, 6)
    if mode in ("I", "I;16"):
        grey16 = np.asarray(base.convert("L")).astype(np.uint16) * 257
        img = Image.fromarray(grey16).convert(mode)
    elif mode == "F":
        img = Image.fromarray(np.asarray(base.convert("L")).astype(np.float32) / 255)
    else:
        img = base.convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (8, 6)
    if mode in ("L", "I", "I;16", "F"):  # exact grey levels survive 16-bit / float scaling
        assert np.array_equal(pixels(out)[..., 0], np.asarray(base.convert("L")))


def test_p_image_with_transparent_colour_goes_on_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0
    out = pixels(to_rgb(img))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (255, 0, 0)


def test_load_image_rgb(tmp_path):
    asymmetric().convert("L").save(tmp_path / "g.png")
    img = load_image_rgb(tmp_path / "g.png")
    assert img.mode == "RGB" and img.size == (40, 30)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 nope")
    assert load_image_rgb(tmp_path / "bad.jpg") is None
    assert load_image_rgb(tmp_path / "missing.png") is None


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size", [(40, 30), (30, 40), (17, 33), (64, 64), (10, 10), (101, 50)])
def test_eval_preprocess_equals_the_official_transform(size):
    img = asymmetric(*size)
    official = transforms.Compose([
        transforms.Resize(16, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(16), transforms.ToTensor(),
    ])
    x = preprocess(img, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, official(img))


@pytest.mark.parametrize("seed", range(6))
def test_train_preprocess_equals_the_official_transform(seed):
    img = asymmetric(53, 31)
    official = transforms.Compose([
        transforms.Resize(16, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.RandomCrop(16), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
    ])
    torch.manual_seed(seed)
    want = official(img)
    torch.manual_seed(seed)
    assert torch.equal(preprocess(img, 16, train=True, random_crop=True), want)


def test_horizontal_flip_only_when_training(tmp_path):
    img = asymmetric(16, 16)
    plain = preprocess(img, 16)
    assert not torch.equal(plain, plain.flip(-1))
    g = torch.Generator().manual_seed(0)
    train = [preprocess(img, 16, train=True, generator=g) for _ in range(32)]
    assert any(torch.equal(x, plain) for x in train) and any(torch.equal(x, plain.flip(-1)) for x in train)
    no_flip = [preprocess(img, 16, train=True, random_flip=False, generator=g) for _ in range(8)]
    assert all(torch.equal(x, plain) for x in no_flip)
    with pytest.raises(ValueError):
        preprocess(img, 16, train=False, random_flip=True)

    (tmp_path / "cls").mkdir()
    img.save(tmp_path / "cls" / "x.png")
    eval_set = ImageFolderDataset(tmp_path, resolution=16, train=False)
    assert eval_set.random_flip is False and all(torch.equal(eval_set[0][0], plain) for _ in range(8))
    train_set = ImageFolderDataset(tmp_path, resolution=16, train=True)
    assert train_set.random_flip is True and train_set.random_crop is False
    with pytest.raises(ValueError):
        ImageFolderDataset(tmp_path, resolution=16, train=False, random_crop=True)


# ---------------------------------------------------------------- listing inputs


def test_list_images_expands_files_folders_and_globs(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for rel in ["a/2.png", "a/10.JPG", "a/deep/1.webp", "b.jpeg"]:
        asymmetric().save(tmp_path / rel, format="PNG")
    (tmp_path / "a" / "notes.md").write_text("x")
    (tmp_path / "weird.dat").write_bytes(b"named explicitly")
    got = list_images([tmp_path / "b.jpeg", tmp_path / "a", str(tmp_path / "weird.dat"), tmp_path / "b.jpeg"])
    want = ["b.jpeg", "a/10.JPG", "a/2.png", "a/deep/1.webp", "weird.dat"]  # given order, folders sorted, no repeats
    assert [p.relative_to(tmp_path).as_posix() for p in got] == want
    assert list_images(str(tmp_path / "a" / "*.png")) == [tmp_path / "a" / "2.png"]
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "nothing_here")


def test_every_reader_of_a_folder_skips_hidden_files_and_folders(tmp_path):
    """One rule (list_image_files) for the training data, tokenizer.reconstruct's inputs and rFID:
    image extensions in any case, nothing whose name starts with "." (macOS's ._x.png resource
    forks do not decode; .ipynb_checkpoints holds copies)."""
    from omegaconf import OmegaConf

    from eval.rfid_mode import rfid_images

    cls = tmp_path / "train" / "cls"
    (cls / ".ipynb_checkpoints").mkdir(parents=True)
    (cls / "deep").mkdir()
    for rel in ["a.png", "b.TIF", "deep/c.jpeg", ".hidden.png", ".ipynb_checkpoints/a-checkpoint.png"]:
        asymmetric().save(cls / rel, format="PNG")
    (cls / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (cls / "notes.txt").write_text("not an image")

    want = [cls / "a.png", cls / "b.TIF", cls / "deep" / "c.jpeg"]
    assert list_image_files(cls) == want
    assert list_image_files(tmp_path / "train") == want
    assert list_images(cls) == want
    data = ImageFolderDataset(tmp_path / "train", resolution=16, train=False)
    assert [path for path, _ in data.samples] == [str(p) for p in want] and len(data) == 3
    rfid = rfid_images(OmegaConf.create({"root": str(tmp_path), "split": "train", "format": "folder"}), 16)
    assert len(rfid) == 3 and rfid[0][0].shape == (3, 16, 16) and rfid[0][0].dtype == torch.uint8
