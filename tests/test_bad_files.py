"""Bad files in a user's hands: each gets one line naming it, and the job goes on or stops as a
user would expect. Images that cannot be read are skipped and counted (in the token cache's
manifest, in what tokenizer training logs, in rFID's result); damaged shards stop the jobs that
must read every sample (skipped to their end by the training stream); model files of the wrong
kind, made for another config or disagreeing with themselves stop with one line."""
from __future__ import annotations

import gc
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from generator import load_generator
from generator.cache import build_token_cache
from titok_core.checkpoints import CheckpointError, save_model_file
from titok_core.data import ImageFolderDataset, count_skipped
from titok_core.formats import ShardError, WebDatasetTrainStream, open_split
from tokenizer import load_tokenizer

from conftest import FIXTURES, REPO

VQ8K = FIXTURES / "official_vq8k_tiny"  # a 32 px tokenizer
CLASSES = ["a_red", "b_green", "c_blue"]
BAD = {"cut.jpg": "the file is truncated or damaged", "cut.png": "the file is truncated or damaged",
       "junk.jpg": "not an image file"}


def _image(seed: int, fmt: str, size: tuple[int, int] = (40, 36)) -> bytes:
    """A smooth random RGB image as file bytes."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 3, 3, generator=g)
    x = torch.nn.functional.interpolate(low, size=size[::-1], mode="bilinear")[0]
    buf = io.BytesIO()
    Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy()).save(buf, format=fmt)
    return buf.getvalue()


def _samples() -> list[tuple[str, int, str, bytes]]:
    """(class, label, file name, bytes): three good images a class, and one bad file in each class."""
    out = []
    for label, cls in enumerate(CLASSES):
        for k in range(3):
            fmt = "JPEG" if k % 2 else "PNG"
            out.append((cls, label, f"img{k}.{fmt.lower().replace('jpeg', 'jpg')}", _image(10 * label + k, fmt)))
    jpeg, png = _image(98, "JPEG"), _image(99, "PNG")
    out.insert(1, (CLASSES[0], 0, "cut.jpg", jpeg[: len(jpeg) // 2]))
    out.insert(6, (CLASSES[1], 1, "cut.png", png[: len(png) // 2]))
    out.append((CLASSES[2], 2, "junk.jpg", b"these bytes are no JPEG"))
    return out


def _write_folder(root: Path, samples) -> Path:
    for cls, _, name, data in samples:
        (root / "train" / cls).mkdir(parents=True, exist_ok=True)
        (root / "train" / cls / name).write_bytes(data)
    return root


def _write_parquet(root: Path, parts: list[list]) -> list[Path]:
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as HFImage

    features = Features({"image": HFImage(), "label": ClassLabel(names=CLASSES)})
    (root / "data").mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(parts):
        ds = Dataset.from_dict({"image": [{"bytes": s[3], "path": None} for s in part], "label": [s[1] for s in part]},
                               features=features)
        paths.append(root / "data" / f"train-{i:05d}-of-{len(parts):05d}.parquet")
        ds.to_parquet(str(paths[-1]))
    return paths


def _write_tars(root: Path, parts: list[list]) -> list[Path]:
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    paths, n = [], 0
    for i, part in enumerate(parts):
        paths.append(root / f"train-{i:04d}.tar")
        with wds.TarWriter(str(paths[-1])) as sink:
            for _, label, name, data in part:
                sink.write({"__key__": f"{n:06d}", name.rsplit(".", 1)[1]: data, "cls": str(label)})
                n += 1
    return paths


def _cut(path: Path, fraction: float = 0.5) -> None:
    """Keep ``fraction`` of the file's content (trailing zero padding, as tar writes it, not counted)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data.rstrip(b"\0")) * fraction)])


def _warnings(caplog) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert all("\n" not in line for line in lines), lines
    return lines


def _one_line(exc: pytest.ExceptionInfo, *fragments: str) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text
    return text


def _cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The one line on stderr of a failed run, without a traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(VQ8K / "config.yaml", checkpoint=VQ8K / "tokenizer.bin")


# ---------------------------------------------------------------- images: skipped, one line each, counted


@pytest.mark.parametrize("fmt", ["folder", "parquet", "webdataset"])
def test_bad_images_are_skipped_named_once_and_counted_in_the_cache(fmt, tok, tmp_path, caplog):
    samples = _samples()
    if fmt == "folder":
        root = _write_folder(tmp_path / "folder", samples)
        names = {name: str(root / "train" / cls / name) for cls, _, name, _ in samples}
    elif fmt == "parquet":
        [shard] = _write_parquet(tmp_path / "hf", [samples])
        root, names = tmp_path / "hf", {s[2]: f"{shard}[{i}]" for i, s in enumerate(samples)}
    else:
        [shard] = _write_tars(tmp_path / "wds", [samples])
        root, names = tmp_path / "wds", {s[2]: f"{shard}:{i:06d}" for i, s in enumerate(samples)}
    dataset = open_split(root, "train", resolution=tok.image_size)
    with caplog.at_level(logging.WARNING):
        manifest = build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=dataset,
                                     out_dir=tmp_path / "cache", batch_size=4, dtype="fp32")
    assert (manifest["num_images"], manifest["num_skipped"], manifest["num_sequences"]) == (12, 3, 18)
    lines = _warnings(caplog)
    assert len(lines) == 3, lines
    for bad, why in BAD.items():
        [line] = [line for line in lines if names[bad] in line]  # the file, or the shard and the sample
        assert line.startswith(f"skipping unreadable image {names[bad]}: {why}"), line


def test_rfid_and_tokenizer_training_count_the_skipped(tmp_path, caplog):
    from omegaconf import OmegaConf
    from test_tokenizer_train import _cfg

    from eval.rfid_mode import _rfid_batches, rfid_images
    from tokenizer.train import train

    root = _write_folder(tmp_path / "data", _samples())
    source = rfid_images(OmegaConf.create({"root": str(root), "split": "train", "format": "auto"}), 32)
    batches = list(_rfid_batches(source, batch_size=4, limit=None, rank=0, world=1, start=0))
    assert sum(skipped for _, skipped in batches) == 3 and sum(len(x) for x, _ in batches if x is not None) == 9

    cfg = _cfg(tmp_path, "trainer.max_steps=1", "trainer.val_check_interval=1", "data.in_memory=true", "logger=null")
    with caplog.at_level(logging.INFO, logger="tokenizer.train"):
        result = train(cfg)
    assert result["num_skipped"] == 3
    assert "3 unreadable training image(s) skipped" in [r.getMessage() for r in caplog.records]


def test_an_empty_class_folder_keeps_its_label(tmp_path, caplog):
    root = _write_folder(tmp_path, [s for s in _samples() if s[2] not in BAD and s[0] != CLASSES[1]])
    (root / "train" / CLASSES[1]).mkdir()
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(root / "train", resolution=16, train=False)
        ImageFolderDataset(root / "train", resolution=16, train=False)  # once per process
    assert ds.classes == CLASSES and [label for _, label in ds.samples] == [0, 0, 0, 2, 2, 2]
    assert _warnings(caplog) == [f"class folder {root / 'train' / CLASSES[1]} has no images; it keeps its label 1 "
                                 "(of 3 classes)"]


# ---------------------------------------------------------------- damaged shards


def test_a_cut_tar_stops_the_cache_and_is_skipped_by_training(tmp_path, caplog, capsys, compose):
    good = [s for s in _samples() if s[2] not in BAD]
    first, cut = _write_tars(tmp_path / "wds", [good[:4], good[4:]])
    _cut(cut, 0.6)
    shards = open_split(tmp_path / "wds", "train", resolution=16)

    with pytest.raises(ShardError) as stop:
        list(shards.samples(1))
    _one_line(stop, f"WebDataset shard {cut} is truncated or damaged", "stopping rather than going on")

    with caplog.at_level(logging.WARNING):
        partial = list(shards.samples(1, damaged="skip"))
        stream = iter(WebDatasetTrainStream(shards, resolution=16, buffer_size=2, seed=0))
        items = [next(stream) for _ in range(20)]  # several passes over both shards
    assert 0 < len(partial) < 5 and all(image is not None for image, _, _ in partial)
    assert all(item is not None and item[0].shape == (3, 16, 16) for item in items)
    [line] = _warnings(caplog)  # once, however many passes
    assert line.startswith(f"WebDataset shard {cut} is truncated or damaged in or after sample 0000")
    assert line.endswith("; skipping the rest of this shard")

    # generator.cache stops with one line on stderr (exit 2), also when a DataLoader worker reads the
    # shards (the worker's error comes back as its whole traceback: cut back to the line). (PyTorch
    # then waits 5 s for each worker at shutdown, so one worker here.)
    from generator.cache import _main

    cfg = compose("generator.cache", [
        f"data.root={tmp_path / 'wds'}", f"tokenizer.spec={VQ8K / 'config.yaml'}",
        f"tokenizer.checkpoint={VQ8K / 'tokenizer.bin'}",
        f"cache.dir={tmp_path / 'cache'}", "cache.batch_size=2", "cache.num_workers=1", "cache.dtype=fp32",
        "trainer.accelerator=cpu"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        _main(cfg)
    assert exit_.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: WebDataset shard {cut} is truncated or damaged in or after sample 0000"), line
    assert line.endswith("stopping rather than going on with a silently shorter dataset "
                         "(fetch or write the shard again)")
    assert not (tmp_path / "cache" / "manifest.json").exists()
    del exit_  # its traceback holds the DataLoader: let its worker go now, not in a later test
    gc.collect()


def test_a_cut_parquet_shard_stops_at_once(tmp_path):
    good = [s for s in _samples() if s[2] not in BAD]
    _, cut = _write_parquet(tmp_path / "hf", [good[:4], good[4:]])
    _cut(cut)
    with pytest.raises(ShardError) as stop:
        open_split(tmp_path / "hf", "train", resolution=16)
    _one_line(stop, f"parquet shard {cut} cannot be opened, it is truncated or not a parquet file", "stopping")


# ---------------------------------------------------------------- model files


@pytest.fixture(scope="module")
def files(official_tiny, tmp_path_factory) -> dict[str, Path]:
    """Our tokenizer and generator files (64 px, from the tiny official weights) and bad files of every kind."""
    d = tmp_path_factory.mktemp("models")
    tok = load_tokenizer(official_tiny / "tokenizer" / "config.yaml",
                         checkpoint=official_tiny / "tokenizer" / "tokenizer.bin")
    gen = load_generator(official_tiny / "generator_imagebert" / "config.yaml",
                         checkpoint=official_tiny / "generator_imagebert" / "generator.bin")
    save_model_file(d / "tokenizer.safetensors", kind="tokenizer", config=tok.config.to_dict(),
                    state_dict=tok.state_dict())
    save_model_file(d / "generator.safetensors", kind="generator", config=gen.config, state_dict=gen.state_dict())
    lightning = {"epoch": 0, "global_step": 5, "pytorch-lightning_version": "2.5.0", "loops": {}, "callbacks": {},
                 "optimizer_states": [], "lr_schedulers": [], "hyper_parameters": {"lr": 1e-3},
                 "state_dict": {f"model.{k}": v for k, v in tok.state_dict().items()}}
    torch.save(lightning, d / "last.ckpt")
    (d / "notes.bin").write_text("lr=1e-3, 300k steps\n")
    data = (d / "generator.safetensors").read_bytes()
    (d / "cut.safetensors").write_bytes(data[: len(data) // 2])
    state = tok.state_dict()
    state["decoder.norm_pre.weight"] = torch.ones(65)
    save_model_file(d / "edited.safetensors", kind="tokenizer", config=tok.config.to_dict(), state_dict=state)
    return {"dir": d, "tok_config": official_tiny / "tokenizer" / "config.yaml",
            "gen_config": official_tiny / "generator_imagebert" / "config.yaml",
            "tok_bin": official_tiny / "tokenizer" / "tokenizer.bin",
            "gen_bin": official_tiny / "generator_imagebert" / "generator.bin"}


@pytest.mark.parametrize("load, spec, checkpoint, says", [
    ("tokenizer", "generator.safetensors", None, "generator.safetensors is a generator model file, not a tokenizer"),
    ("generator", "tokenizer.safetensors", None, "tokenizer.safetensors is a tokenizer model file, not a generator"),
    ("tokenizer", "tok_config", "gen_bin", "generator.bin holds generator weights, not tokenizer weights"),
    ("generator", "gen_config", "tok_bin", "tokenizer.bin holds tokenizer weights, not generator weights"),
    ("tokenizer", "tok_config", "last.ckpt", "last.ckpt is a Lightning training checkpoint"),
    ("generator", "last.ckpt", None, "last.ckpt is a Lightning training checkpoint"),
    ("tokenizer", "tok_config", "notes.bin", "notes.bin: not a model file (neither safetensors nor a PyTorch file"),
    ("generator", "gen_config", "cut.safetensors", "cut.safetensors: the safetensors file is truncated or damaged"),
    ("tokenizer", "edited.safetensors", None,
     "edited.safetensors does not match its own config metadata (titok_gen.config; the file is damaged or was edited): "
     "1 shape mismatch(es) e.g. decoder.norm_pre.weight (65,) vs config (64,)"),
])
def test_a_wrong_model_file_is_one_line_naming_it(files, load, spec, checkpoint, says):
    def path(name):
        return None if name is None else files.get(name, files["dir"] / name)

    loader = load_tokenizer if load == "tokenizer" else load_generator
    with pytest.raises(CheckpointError) as exc:
        loader(path(spec), path(checkpoint))
    _one_line(exc, says)


def test_a_tokenizer_made_for_another_image_size_is_refused(files, tmp_path, compose):
    from generator.train import train

    # generator.train: the experiment asks for the 256 px titok_l32; the file is a 64 px tokenizer.
    cfg = compose("generator.train", ["experiment=imagenet_l32", f"data.root={tmp_path}", f"run_dir={tmp_path / 'run'}",
                                      f"tokenizer.checkpoint={files['dir'] / 'tokenizer.safetensors'}"])
    with pytest.raises(CheckpointError) as exc:
        train(cfg)
    _one_line(exc, "tokenizer.safetensors was made for another tokenizer config",
              "image_size 64 in the file, 256 expected")
    assert not (tmp_path / "run").exists()

    # tokenizer.reconstruct: the spec is a 32 px config, the weights a 64 px tokenizer.
    Image.open(io.BytesIO(_image(0, "PNG"))).save(tmp_path / "photo.png")
    proc = _cli("tokenizer.reconstruct", f"inputs={tmp_path / 'photo.png'}", f"tokenizer.spec={VQ8K / 'config.yaml'}",
                f"tokenizer.checkpoint={files['dir'] / 'tokenizer.safetensors'}", f"out_dir={tmp_path / 'out'}",
                cwd=tmp_path)
    _error_line(proc, "error: ", "tokenizer.safetensors was made for another tokenizer config",
                "image_size 64 in the file, 32 expected")


def test_count_skipped_looks_through_subsets(tmp_path):
    root = _write_folder(tmp_path, _samples())
    ds = ImageFolderDataset(root / "train", resolution=16, train=False)
    subset = torch.utils.data.Subset(ds, range(6))
    assert [ds[i] is None for i in range(6)].count(True) == 2
    assert count_skipped(subset) == 2 and count_skipped(torch.utils.data.TensorDataset(torch.zeros(1))) is None
