"""ImageNet as users store it: the same images as a folder, a Hugging Face dataset (save_to_disk
and parquet shards) and WebDataset tar shards give the same token cache, token for token."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from generator.cache import build_stream_shards, build_token_cache, cache_manifest, merge_shards
from titok_core.formats import detect_format, has_split, open_split
from tokenizer import load_tokenizer

from conftest import CONF, FIXTURES

CLASSES = ["n01_cat", "n02_dog", "n03_eel"]


def _encoded(seed: int, fmt: str) -> bytes:
    """A smooth random RGB image of an odd size (so resizing and cropping matter) as file bytes."""
    g = torch.Generator().manual_seed(seed)
    w, h = (40, 52) if seed % 2 else (56, 36)
    low = torch.rand(1, 3, 3, 3, generator=g)
    arr = (torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear")[0] * 255).round().to(torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.permute(1, 2, 0).numpy()).save(buf, format=fmt)
    return buf.getvalue()


def _samples() -> list[tuple[str, int, str, bytes]]:
    """(class name, label, file name, bytes), in the folder's class-then-path order; one unreadable."""
    out = []
    for label, name in enumerate(CLASSES):
        for k in range(4):
            ext = "jpg" if k % 2 else "png"
            out.append((name, label, f"img{k}.{ext}", _encoded(10 * label + k, "JPEG" if ext == "jpg" else "PNG")))
    out.insert(5, (CLASSES[1], 1, "img0_broken.jpg", b"\xff\xd8 not really a jpeg"))
    return out


def write_folder(root: Path, split: str, samples) -> None:
    for cls, _, fname, data in samples:
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        (root / split / cls / fname).write_bytes(data)


def write_hf(root: Path, split: str, samples, *, parquet: bool) -> None:
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as HFImage

    features = Features({"image": HFImage(), "label": ClassLabel(names=CLASSES)})
    ds = Dataset.from_dict(
        {"image": [{"bytes": d, "path": None} for *_, d in samples], "label": [s[1] for s in samples]},
        features=features,
    )
    if not parquet:
        DatasetDict({split: ds}).save_to_disk(str(root))
        return
    (root / "data").mkdir(parents=True, exist_ok=True)
    half = len(ds) // 2
    for i, part in enumerate([ds.select(range(half)), ds.select(range(half, len(ds)))]):
        part.to_parquet(str(root / "data" / f"{split}-{i:05d}-of-00002.parquet"))


def write_webdataset(root: Path, split: str, samples, *, per_shard: int = 5) -> None:
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(samples), per_shard):
        with wds.TarWriter(str(root / f"{split}-{s // per_shard:04d}.tar")) as sink:
            for i, (_, label, fname, data) in enumerate(samples[s : s + per_shard]):
                sink.write({"__key__": f"{s + i:06d}", fname.rsplit(".", 1)[1]: data, "cls": str(label)})


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("stores")
    samples = _samples()
    write_folder(root / "folder", "train", samples)
    write_hf(root / "hf_disk", "train", samples, parquet=False)
    write_hf(root / "hf_parquet", "train", samples, parquet=True)
    write_webdataset(root / "wds", "train", samples)
    return {
        "folder": str(root / "folder"), "hf_disk": str(root / "hf_disk"), "hf_parquet": str(root / "hf_parquet"),
        "wds": str(root / "wds" / "train-{0000..0002}.tar"), "wds_folder": str(root / "wds"),
    }


@pytest.fixture(scope="module")
def tok():
    d = FIXTURES / "official_vq8k_tiny"
    return load_tokenizer(d / "config.yaml", checkpoint=d / "tokenizer.bin")


def test_detection_and_splits(stores):
    assert detect_format(stores["folder"]) == "folder"
    assert detect_format(stores["hf_disk"]) == "hf" and detect_format(stores["hf_parquet"]) == "hf"
    assert detect_format(stores["wds"]) == "webdataset" and detect_format(stores["wds_folder"]) == "webdataset"
    for key in ("folder", "hf_disk", "hf_parquet", "wds_folder"):
        assert has_split(stores[key], "train") and not has_split(stores[key], "val"), key
    hf = open_split(stores["hf_disk"], "train", resolution=32)
    assert hf.classes == CLASSES and len(hf) == 13
    pq = open_split(stores["hf_parquet"], "train", resolution=32)
    assert pq.classes == CLASSES and len(pq) == 13
    wds = open_split(stores["wds_folder"], "train", resolution=32)
    assert len(wds) == 3 and wds.urls == open_split(stores["wds"], "ignored", resolution=32).urls
    with pytest.raises(FileNotFoundError, match="has no split 'val' \\(splits: train\\)"):
        open_split(stores["hf_disk"], "val", resolution=32)
    with pytest.raises(FileNotFoundError, match="no parquet files of split 'val'"):
        open_split(stores["hf_parquet"], "val", resolution=32)
    with pytest.raises(FileNotFoundError, match="not found"):
        open_split(stores["wds"].replace("0002", "0009"), None, resolution=32)
    with pytest.raises(ValueError, match="data.format must be"):
        open_split(stores["folder"], "train", format="lmdb", resolution=32)
    # data.format overrides the detection: a folder read as parquet has no parquet files.
    with pytest.raises(FileNotFoundError, match="no parquet files"):
        open_split(stores["folder"], "train", format="hf", resolution=32)


def test_same_images_give_the_same_tensors(stores):
    folder = open_split(stores["folder"], "train", resolution=32)
    for key in ("hf_disk", "hf_parquet"):
        other = open_split(stores[key], "train", resolution=32)
        for i in range(len(folder)):
            a, b = folder[i], other[i]
            assert (a is None) == (b is None), (key, i)
            if a is not None:
                assert torch.equal(a[0], b[0]) and a[1] == b[1], (key, i)
        assert other.num_skipped == folder.num_skipped == 1


def _cache(tok, dataset, out: Path, **kw) -> tuple[np.ndarray, np.ndarray, dict]:
    manifest = build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=dataset, out_dir=out, batch_size=4,
                                 dtype="fp32", **kw)
    return np.load(out / "tokens.npy"), np.load(out / "labels.npy"), manifest


def test_every_format_gives_the_folder_cache(stores, tok, tmp_path):
    want_tokens, want_labels, want = _cache(tok, open_split(stores["folder"], "train", resolution=32), tmp_path / "folder")
    assert want["num_images"] == 13 and want["num_skipped"] == 1 and want["num_sequences"] == 24
    assert len(np.unique(want_tokens, axis=0)) > 12  # the images give different sequences
    for key in ("hf_disk", "hf_parquet", "wds"):
        tokens, labels, manifest = _cache(tok, open_split(stores[key], "train", resolution=32), tmp_path / key,
                                          num_workers=2 if key == "wds" else 0)
        assert np.array_equal(tokens, want_tokens) and np.array_equal(labels, want_labels), key
        assert (manifest["num_images"], manifest["num_skipped"]) == (13, 1), key
        assert manifest["classes"] == (CLASSES if key != "wds" else []), key
        assert manifest["data_format"] == ("webdataset" if key == "wds" else "hf"), key


def test_webdataset_cache_resumes_and_ranks_share_shards(stores, tok, tmp_path):
    shards = open_split(stores["wds"], None, resolution=32)
    out = tmp_path / "killed"
    encode, calls = tok.encode, []

    def dies_on_third_batch(x):
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return encode(x)

    tok.encode = dies_on_third_batch
    try:
        with pytest.raises(KeyboardInterrupt):
            build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=shards, out_dir=out, batch_size=4, dtype="fp32")
        done = sorted(p.name for p in (out / "shards").iterdir() if p.name.startswith("tar_"))
        assert done == ["tar_000000.done", "tar_000000_000000.npz", "tar_000000_000001.npz"]
        calls.clear()
        tok.encode = lambda x: calls.append(len(x)) or encode(x)
        manifest = build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=shards, out_dir=out, batch_size=4,
                                     dtype="fp32")
    finally:
        tok.encode = encode
    assert len(calls) == 3  # the two batches of each of the two unfinished tars, one of them a single image
    assert manifest["num_images"] == 13 and manifest["num_sequences"] == 24

    # Ranks: each streams its own tars (i % W == r); rank 0 merges; the result is the one-process cache.
    ranked = tmp_path / "ranked"
    build_stream_shards(tokenizer=tok, shards=shards, out_dir=ranked, batch_size=4, dtype="fp32", rank=1, world_size=2)
    assert sorted(p.name for p in (ranked / "shards").glob("*.done")) == ["tar_000001.done"]
    base = cache_manifest(tokenizer=tok, tokenizer_source="tiny", dataset=shards, resolution=32)
    with pytest.raises(RuntimeError, match="unfinished"):
        merge_shards(out_dir=ranked, num_images=None, batch_size=4, manifest=base, num_tars=3)
    build_stream_shards(tokenizer=tok, shards=shards, out_dir=ranked, batch_size=4, dtype="fp32", rank=0, world_size=2)
    merged = merge_shards(out_dir=ranked, num_images=None, batch_size=4, manifest=base, num_tars=3)
    assert merged["num_images"] == 13 and merged["num_skipped"] == 1
    assert np.array_equal(np.load(ranked / "tokens.npy"), np.load(out / "tokens.npy"))
    assert np.array_equal(np.load(ranked / "labels.npy"), np.load(out / "labels.npy"))


def test_vae_tokenizer_is_refused_by_the_cache(stores, tmp_path):
    d = FIXTURES / "official_vae_tiny"
    vae = load_tokenizer(d / "config.yaml", checkpoint=d / "tokenizer.bin")
    from tokenizer import CheckpointError

    with pytest.raises(CheckpointError, match="needs a VQ tokenizer with discrete tokens; .* is a continuous"):
        build_token_cache(tokenizer=vae, tokenizer_source="vae", dataset=open_split(stores["folder"], "train", resolution=32),
                          out_dir=tmp_path / "c", batch_size=4)
    assert not (tmp_path / "c").exists()
    json.dumps(vae.config.to_dict())  # the VAE config is plain JSON (codebook_size None)


# ---------------------------------------------------------------- rFID and reconstruction, every tokenizer kind


def _rfid_cfg(tokenizer: str, root: str, inception_weights, tmp_path, **extra):
    from hydra import compose, initialize_config_dir

    conf = str(CONF / "eval")
    # Quoted, as on a command line: braces are Hydra syntax.
    overrides = [f"{k}={v}" for k, v in {
        "mode": "rfid", "tokenizer.spec": tokenizer, "data.root": f"'{root}'", "num_samples": 9, "batch_size": 4,
        "inception_weights": inception_weights, "state_dir": tmp_path / "state", "out": "null",
        "trainer.accelerator": "cpu", "dtype": "fp32", **extra,
    }.items()]
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return compose(config_name="gfid", overrides=overrides)


@pytest.mark.parametrize("case, store, split", [
    ("official_vae_tiny", "wds", "null"), ("official_vq8k_tiny", "hf_parquet", "train"),
])
def test_rfid_reads_every_format_with_every_kind(case, store, split, stores, inception_weights, tmp_path):
    from eval.gfid import run

    d = FIXTURES / case
    cfg = _rfid_cfg(d / "config.yaml", stores[store], inception_weights, tmp_path,
                    **{"data.split": split, "tokenizer.checkpoint": d / "tokenizer.bin"})
    result = run(cfg)
    # The first 9 images, one of them unreadable: 8 measured, as from the folder.
    assert result["num_images"] == 8 and result["num_skipped"] == 1
    assert np.isfinite(result["fid"]) and 0 < result["psnr"] < 100
    if store != "wds":
        return
    folder = run(_rfid_cfg(d / "config.yaml", stores["folder"], inception_weights, tmp_path / "f",
                           **{"data.split": "train", "tokenizer.checkpoint": d / "tokenizer.bin"}))
    assert folder["num_images"] == 8
    assert folder["psnr"] == pytest.approx(result["psnr"], abs=1e-6) and folder["fid"] == pytest.approx(result["fid"], rel=1e-6)


@pytest.mark.parametrize("case", ["official_vq8k_tiny", "official_vae_tiny"])
def test_reconstruct_every_kind(case, stores, tmp_path):
    from tokenizer.reconstruct import reconstruct

    d = FIXTURES / case
    records = reconstruct(tokenizer=str(d / "config.yaml"), checkpoint=str(d / "tokenizer.bin"),
                          inputs=str(Path(stores["folder"]) / "train" / CLASSES[0]), out_dir=str(tmp_path), device="cpu")
    assert len(records) == 4 and all(Path(r["output"]).is_file() and r["psnr"] > 0 for r in records)
    if case == "official_vae_tiny":
        assert all(r["latents"]["shape"] == [8, 16] and "tokens" not in r for r in records)
    else:
        assert all(len(r["tokens"]) == 8 and "latents" not in r for r in records)


# ---------------------------------------------------------------- tokenizer training reads the formats


@pytest.mark.parametrize("store", ["hf_parquet", "wds_folder"])
def test_tokenizer_training_reads_formats(store, stores, tmp_path):
    from test_tokenizer_train import _cfg

    from tokenizer.train import train
    from tokenizer.train_data import build_datasets

    cfg = _cfg(tmp_path, "trainer.max_steps=3", "trainer.val_check_interval=3", "batch_size=2")
    cfg.data.root = stores[store]
    cfg.model = {**cfg.model, "image_size": 32, "patch_size": 8}
    train_set, val_set = build_datasets(cfg.data, image_size=32, seed=cfg.seed)
    # No val split: held out of the training images (map-style: a tenth, at most val_images; streams: val_images).
    assert len(val_set) == (1 if store == "hf_parquet" else 4)
    if store == "wds_folder":
        first = next(iter(train_set))
        assert first is None or first[0].shape == (3, 32, 32)
    result = train(cfg)
    assert result["global_step"] == 3 and Path(result["checkpoint"]).is_file()


def test_the_held_out_line_says_how_many_images_are_held_out(tmp_path, caplog):
    """40 training images and no val split: a tenth (4) is held out, and the line says 4, not val_images."""
    import logging

    from test_tokenizer_train import _cfg

    from tokenizer.train_data import build_datasets

    rng = np.random.default_rng(0)
    for i in range(40):
        folder = tmp_path / "data" / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = _cfg(tmp_path, "data.val_images=256", "data.in_memory=false")
    with caplog.at_level(logging.WARNING, logger="tokenizer.train_data"):
        train_set, val_set = build_datasets(cfg.data, image_size=16, seed=0)
    assert (len(train_set), len(val_set)) == (36, 4)
    assert "holding out 4 training images for validation" in caplog.text
    assert "256" not in caplog.text
