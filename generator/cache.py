"""Token cache: a frozen tokenizer turns an image dataset into token sequences with labels.

Each image is tokenized as is and horizontally flipped (two sequences, as the official
pre-tokenisation), or as is only (``flip=False``: data whose mirror is another thing). Layout of a finished cache directory::

    manifest.json   format, tokenizer identity (source, config, fingerprint), dataset identity
                    (absolute root, split, format, a fingerprint of its files), resolution,
                    image and sequence counts, class names
    tokens.npy      uint16 [M, L]  read with np.load(mmap_mode="r")
    labels.npy      int32  [M]

While it is being built, ``shards/shard_XXXXXX.npz`` hold one batch each, written
atomically: a kill loses at most the batch in flight and a rerun resumes. Shard i covers
dataset indices [i*S, (i+1)*S); rank r of W builds the shards with i % W == r, and rank 0
merges them into the flat arrays once all exist. ``manifest.json`` is written last, so a
directory with a manifest is complete. ``shards/plan.json`` records what the half-built cache is
made of (tokenizer, dataset, batch size, flips): a rerun with anything else stops instead of
mixing two caches.

Reading a cache checks it against what asks for it (:func:`check_cache`): another tokenizer,
resolution, flip setting or dataset stops with one line (CacheMismatchError), and so does a
tokens.npy / labels.npy that is missing, truncated, or of another length or dtype than the
manifest says. A manifest written before caches recorded their dataset is checked for the rest
only (a warning says so).

Streamed WebDataset shards (:class:`titok_core.formats.WebDatasetShards`) have no index:
rank r of W streams the tar shards with i % W == r, and batch c of tar i (its samples
[c*S, (c+1)*S) in stream order) becomes ``shards/tar_IIIIII_CCCCCC.npz``; ``tar_IIIIII.done``
records how many batches tar i had. A rerun skips the batches that exist without decoding
them. The merged arrays follow tar order, then stream order: the same images stored as a
folder (in its class-then-path order) give the same cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm import tqdm

from titok_core.checkpoints import atomic_path
from titok_core.data import ImageFolderDataset, preprocess
from titok_core.formats import WebDatasetShards, decode_sample
from titok_core.runtime import autocast

log = logging.getLogger(__name__)
FORMAT = "titok-gen-token-cache/1"


class CacheMismatchError(ValueError):
    """A cache made by another tokenizer, for another resolution or from another dataset, or whose
    files do not match its manifest; one-line message."""


def _files_fingerprint(paths: list[str]) -> dict:
    """How many files and a hash of their names and sizes (remote URLs: the whole URL, size -1), as
    :func:`titok_core.runs.dataset_fingerprint` does for a folder."""
    from titok_core.runs import names_and_sizes_fingerprint

    entries = []
    for path in paths:
        local = "://" not in path and not path.startswith("pipe:")
        size = os.path.getsize(path) if local and os.path.isfile(path) else -1
        entries.append((os.path.basename(path) if local else path, size))
    return names_and_sizes_fingerprint(entries)


def dataset_identity(root: str | os.PathLike, split: str | None, data_format: str = "auto") -> dict:
    """What a cache records of its dataset: absolute root, split, format and a cheap fingerprint of
    the files the split is read from (names and sizes, no contents; see
    :func:`titok_core.runs.dataset_fingerprint`). Two caches of the same split of the same files agree."""
    from titok_core.formats import _check_format, is_saved_dataset, parquet_files, webdataset_urls
    from titok_core.runs import dataset_fingerprint

    fmt = _check_format(data_format, root)
    text = os.fspath(root)
    absolute = text if "://" in text else os.path.abspath(text)
    if fmt == "webdataset":
        files = _files_fingerprint(webdataset_urls(root, split))
    elif fmt == "hf" and not is_saved_dataset(text):  # parquet: the split's own files, as the dataset reads them
        files = _files_fingerprint([str(p) for p in parquet_files(text, split)])
    else:
        files = dataset_fingerprint(root, split)
    return {"root": absolute, "split": split, "format": fmt, **files}


def _identity_of(dataset) -> dict | None:
    """The identity of a dataset opened by :func:`titok_core.formats.open_split` without a known split
    (its root is then the split itself); None for one that is not read from files."""
    root, fmt = getattr(dataset, "root", None), getattr(dataset, "data_format", None)
    if fmt is None and isinstance(dataset, ImageFolderDataset):
        fmt = "folder"
    if root is None or fmt is None:
        return None
    if isinstance(dataset, WebDatasetShards):
        text = os.fspath(root)
        return {"root": text if "://" in text else os.path.abspath(text), "split": None, "format": fmt,
                **_files_fingerprint(list(dataset.urls))}
    return dataset_identity(root, None, fmt)


def tokenizer_fingerprint(tokenizer: torch.nn.Module) -> str:
    """sha256 over the tokenizer config and every weight: two caches agree iff this agrees.

    The config is hashed in its complete, canonical form (TiTokConfig, every field, sorted keys),
    so the same weights give the same fingerprint however the config was spelt (a preset, an
    official config, a file written before a key was renamed, one saved today)."""
    h = hashlib.sha256(json.dumps(tokenizer.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(tokenizer.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _collate(batch):
    """Drop unreadable images (None) and stack the rest; returns (images, labels, kept)."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return None, None, 0
    return torch.stack([b[0] for b in kept]), torch.tensor([int(b[1]) for b in kept]), len(kept)


class _ShardBatches:
    """Batch sampler: one batch = one pending shard's index range."""

    def __init__(self, shards: list[int], shard_size: int, n: int):
        self.ranges = [list(range(i * shard_size, min((i + 1) * shard_size, n))) for i in shards]

    def __iter__(self):
        return iter(self.ranges)

    def __len__(self):
        return len(self.ranges)


def _shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / "shards" / f"shard_{index:06d}.npz"


DECODERS = ("pil", "device")


def _on_device(batch, *, dataset, resolution: int, device: torch.device):
    """A batch of file bytes (decode="device") -> (images on the device, labels, kept), as _collate."""
    from generator.device_decode import decode_batch  # torchvision: imported only when asked for

    encoded, labels, indices = batch

    def pil_path(j: int):
        item = dataset[indices[j]]
        return None if item is None else item[0]

    images = decode_batch(encoded, resolution=resolution, device=device, fallback=pil_path)
    keep = [j for j, image in enumerate(images) if image is not None]
    if not keep:
        return None, None, 0
    return torch.stack([images[j] for j in keep]), labels[keep], len(keep)


def build_shards(
    *, tokenizer: torch.nn.Module, dataset: Dataset, out_dir: str | os.PathLike, batch_size: int = 64,
    device: torch.device | str = "cpu", dtype: str = "auto", num_workers: int = 0, rank: int = 0,
    world_size: int = 1, flip: bool = True, decode: str = "pil", compile: bool = False,
) -> int:
    """Tokenize this rank's missing shards; returns how many images were skipped as unreadable.

    ``flip``: each image and its mirror (two sequences an image, as official); False: the image only.
    decode: "pil" (decode and resize in DataLoader workers with PIL: the reference) or "device"
    (workers read bytes; JPEGs are decoded, resized and cropped on ``device``, see
    :mod:`generator.device_decode`; needs ``dataset.samples``). compile: torch.compile the
    tokenizer's encoder in place (its state dict is unchanged).
    """
    if decode not in DECODERS:
        raise ValueError(f"decode must be one of {', '.join(DECODERS)}, got {decode!r}")
    out_dir, device = Path(out_dir), torch.device(device)
    n = len(dataset)
    num_shards = (n + batch_size - 1) // batch_size
    pending = [i for i in range(rank, num_shards, world_size) if not _shard_path(out_dir, i).exists()]
    if not pending:
        return 0
    from titok_core.stopping import at_safe_points, ignore_stop_signals, stop_point

    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    batches = _ShardBatches(pending, batch_size, n)
    if decode == "device":
        from generator.device_decode import EncodedImages, collate_encoded

        loader = DataLoader(EncodedImages(dataset), batch_sampler=batches, num_workers=num_workers,
                            collate_fn=collate_encoded, worker_init_fn=ignore_stop_signals)
    else:
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=_collate,
                            pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    skipped = 0
    tokenizer = tokenizer.to(device).eval()
    if compile:
        tokenizer.encoder.compile()
    resolution = getattr(dataset, "resolution", tokenizer.image_size)
    bar = tqdm(zip(pending, loader), total=len(pending), desc=f"token cache (rank {rank})", unit="batch", disable=None)
    with at_safe_points():  # SIGTERM stops between shards, never while a batch comes from a DataLoader worker
        for index, batch in bar:
            if decode == "device":
                batch = _on_device(batch, dataset=dataset, resolution=resolution, device=device)
            images, labels, kept = batch
            size = min((index + 1) * batch_size, n) - index * batch_size
            skipped += size - kept
            tokens, pair_labels = _encode_pairs(tokenizer, images, labels, device, dtype, flip=flip)
            _write_shard(_shard_path(out_dir, index), tokens, pair_labels, size - kept)
            stop_point()
    return skipped


class _StreamBatches(IterableDataset):
    """This rank's pending tar shards as batches: dicts with shard, chunk, images, labels, size, kept;
    and one ``{"shard": i, "chunks": k}`` after each shard. DataLoader workers split the shards."""

    def __init__(self, shards, pending: list[int], batch_size: int, out_dir: Path, resolution: int):
        self.shards, self.pending, self.batch_size = shards, pending, batch_size
        self.out_dir, self.resolution = out_dir, resolution

    def _batch(self, shard: int, chunk: int, samples: list) -> dict:
        transform = partial(preprocess, resolution=self.resolution)
        decoded = [decode_sample(image, label, name, transform) for image, label, name in samples]
        kept = [d for d in decoded if d is not None]
        return {
            "shard": shard, "chunk": chunk, "size": len(samples), "kept": len(kept),
            "images": torch.stack([d[0] for d in kept]) if kept else None,
            "labels": torch.tensor([d[1] for d in kept], dtype=torch.long),
        }

    def __iter__(self):
        info = get_worker_info()
        mine = self.pending[info.id :: info.num_workers] if info is not None else self.pending
        for shard in mine:
            chunk, samples = 0, []
            for sample in self.shards.samples(shard):
                samples.append(sample)
                if len(samples) == self.batch_size:
                    if not _stream_shard_path(self.out_dir, shard, chunk).exists():
                        yield self._batch(shard, chunk, samples)
                    chunk, samples = chunk + 1, []
            if samples:
                if not _stream_shard_path(self.out_dir, shard, chunk).exists():
                    yield self._batch(shard, chunk, samples)
                chunk += 1
            yield {"shard": shard, "chunks": chunk}


def _stream_shard_path(out_dir: Path, shard: int, chunk: int) -> Path:
    return out_dir / "shards" / f"tar_{shard:06d}_{chunk:06d}.npz"


def _stream_done_path(out_dir: Path, shard: int) -> Path:
    return out_dir / "shards" / f"tar_{shard:06d}.done"


def _write_shard(path: Path, tokens: np.ndarray, labels: np.ndarray, skipped: int) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, tokens=tokens, labels=labels, skipped=np.int64(skipped))


def _encode_pairs(tokenizer, images: torch.Tensor | None, labels: torch.Tensor, device, dtype, *, flip: bool = True):
    """Images and their mirrors -> (tokens uint16 [2B, L] interleaved, labels int32 [2B]);
    ``flip`` False: the images only ([B, L], [B])."""
    if images is None:
        return np.zeros((0, tokenizer.num_tokens), np.uint16), np.zeros((0,), np.int32)
    images = images.to(device, non_blocking=True)
    views = torch.cat([images, images.flip(-1)]) if flip else images
    with torch.inference_mode(), autocast(device, dtype):
        encoded = tokenizer.encode(views)  # (2B or B, L)
    b, copies = images.shape[0], 2 if flip else 1
    # Interleave: row 2i is image i, row 2i+1 its mirror.
    tokens = encoded.view(copies, b, -1).transpose(0, 1).reshape(copies * b, -1).cpu().numpy().astype(np.uint16)
    return tokens, labels.repeat_interleave(copies).numpy().astype(np.int32)


def build_stream_shards(
    *, tokenizer: torch.nn.Module, shards, out_dir: str | os.PathLike, batch_size: int = 64,
    device: torch.device | str = "cpu", dtype: str = "auto", num_workers: int = 0, rank: int = 0, world_size: int = 1,
    flip: bool = True,
) -> int:
    """Tokenize this rank's unfinished tar shards (streamed); returns how many images were skipped."""
    out_dir, device = Path(out_dir), torch.device(device)
    pending = [i for i in range(rank, len(shards), world_size) if not _stream_done_path(out_dir, i).exists()]
    if not pending:
        return 0
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    from titok_core.stopping import at_safe_points, ignore_stop_signals, stop_point

    stream = _StreamBatches(shards, pending, batch_size, out_dir, tokenizer.image_size)
    loader = DataLoader(stream, batch_size=None, num_workers=min(num_workers, len(pending)),
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    tokenizer = tokenizer.to(device).eval()
    skipped = 0
    bar = tqdm(total=len(pending), desc=f"token cache (rank {rank})", unit="tar", disable=None)
    with at_safe_points():  # SIGTERM stops between batches, never while one comes from a DataLoader worker
        for item in loader:
            if "chunks" in item:
                with atomic_path(_stream_done_path(out_dir, item["shard"])) as tmp:
                    tmp.write_text(json.dumps({"chunks": int(item["chunks"])}))
                bar.update(1)
            else:
                tokens, labels = _encode_pairs(tokenizer, item["images"], item["labels"], device, dtype, flip=flip)
                skipped += int(item["size"]) - int(item["kept"])
                _write_shard(_stream_shard_path(out_dir, item["shard"], item["chunk"]), tokens, labels,
                             int(item["size"]) - int(item["kept"]))
            stop_point()
    bar.close()
    return skipped


def merge_shards(
    *, out_dir: str | os.PathLike, num_images: int | None, batch_size: int, manifest: dict,
    num_tars: int | None = None,
) -> dict:
    """Concatenate all shards into tokens.npy/labels.npy, write manifest.json, remove shards.

    ``num_tars``: the cache was built from that many streamed tar shards (``num_images`` is then
    counted from the shards)."""
    out_dir = Path(out_dir)
    if num_tars is not None:
        unfinished = [_stream_done_path(out_dir, i).name for i in range(num_tars) if not _stream_done_path(out_dir, i).exists()]
        if unfinished:
            raise RuntimeError(f"cannot merge the token cache: {len(unfinished)} tar shard(s) unfinished, e.g. {unfinished[0]}")
        paths = [
            _stream_shard_path(out_dir, i, c) for i in range(num_tars)
            for c in range(json.loads(_stream_done_path(out_dir, i).read_text())["chunks"])
        ]
    else:
        num_shards = (num_images + batch_size - 1) // batch_size
        paths = [_shard_path(out_dir, i) for i in range(num_shards)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise RuntimeError(f"cannot merge the token cache: {len(missing)} shard(s) missing, e.g. {missing[0]}")
    parts = [np.load(p) for p in paths]
    total = sum(int(p["tokens"].shape[0]) for p in parts)
    seq_len = manifest["num_tokens"]
    with atomic_path(out_dir / "tokens.npy") as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=(total, seq_len))
        start = 0
        for p in parts:
            t = p["tokens"]
            arr[start : start + len(t)] = t
            start += len(t)
        arr.flush()
        del arr
    with atomic_path(out_dir / "labels.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.concatenate([p["labels"] for p in parts]).astype(np.int32))
    num_skipped = int(sum(int(p["skipped"]) for p in parts))
    manifest = dict(manifest, num_sequences=total, num_skipped=num_skipped)
    if num_tars is not None:
        manifest["num_images"] = total // (2 if manifest.get("flip", True) else 1) + num_skipped
    with atomic_path(out_dir / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out_dir / "shards", ignore_errors=True)
    return manifest


def cache_manifest(
    *, tokenizer: torch.nn.Module, tokenizer_source: str, dataset, resolution: int, flip: bool = True,
    decode: str = "pil", data: dict | None = None,
) -> dict:
    """The identity a cache records and is checked against (``decode`` is recorded, not checked).

    data: the dataset's :func:`dataset_identity` (root, split, format, files); None: taken from
    ``dataset`` itself (its root and format, no split), or none for data not read from files."""
    stream = isinstance(dataset, WebDatasetShards)
    return {
        "format": FORMAT,
        "tokenizer": {
            "source": tokenizer_source, "config": tokenizer.config.to_dict(), "fingerprint": tokenizer_fingerprint(tokenizer),
        },
        "resolution": resolution,
        "num_tokens": tokenizer.num_tokens,
        "codebook_size": tokenizer.codebook_size,
        "num_images": None if stream else len(dataset),  # streams: counted when merged
        "classes": list(getattr(dataset, "classes", [])),
        "dataset_root": str(getattr(dataset, "root", "")),
        "data_format": getattr(dataset, "data_format", "folder" if isinstance(dataset, ImageFolderDataset) else None),
        "data": data if data is not None else _identity_of(dataset),
        "flip": bool(flip),
        "decode": decode,
    }


def _read_npy_header(path: Path) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, bytes the array should take in the file) of a .npy file, reading its header only."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unknown .npy version {version}")
        offset = f.tell()
    return shape, dtype, offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _check_array(path: Path, *, dtype, shape: tuple) -> None:
    """CacheMismatchError (one line naming ``path``) unless it is a whole .npy of ``dtype`` and ``shape``."""
    if not path.is_file():
        raise CacheMismatchError(f"token cache file {path} is missing (the manifest says the cache is finished); "
                                 "delete the cache directory and build it again")
    try:
        got_shape, got_dtype, want_size = _read_npy_header(path)
    except Exception as exc:  # noqa: BLE001 - any header the reader refuses is a bad file
        raise CacheMismatchError(f"token cache file {path} is not a readable .npy ({exc}); "
                                 "delete the cache directory and build it again") from None
    problems = []
    if got_dtype != np.dtype(dtype):
        problems.append(f"dtype {got_dtype}, the manifest says {np.dtype(dtype)}")
    if tuple(got_shape) != tuple(shape):
        problems.append(f"shape {tuple(got_shape)}, the manifest says {tuple(shape)}")
    size = path.stat().st_size
    if not problems and size != want_size:
        problems.append(f"{size} bytes, its header says {want_size}" + (" (truncated)" if size < want_size else ""))
    if problems:
        raise CacheMismatchError(f"token cache file {path} does not match its manifest: {'; '.join(problems)}; "
                                 "delete the cache directory and build it again")


def check_cache(
    out_dir: str | os.PathLike, *, fingerprint: str | None = None, resolution: int | None = None,
    flip: bool | None = None, data: dict | None = None,
) -> dict:
    """Read a finished cache's manifest; refuse one made by another tokenizer, resolution, flip
    setting or dataset (``data``: a :func:`dataset_identity`), and one whose tokens.npy / labels.npy
    are missing, truncated, or of another shape or dtype than the manifest says. Returns the manifest."""
    out_dir = Path(out_dir)
    path = out_dir / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no finished token cache at {out_dir} (manifest.json missing)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CacheMismatchError(f"token cache manifest {path} is not readable JSON ({exc}); "
                                 "delete the cache directory and build it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise CacheMismatchError(f"{out_dir} is not a {FORMAT} cache (format {got!r})")
    made_by = manifest["tokenizer"]["fingerprint"]
    if fingerprint is not None and made_by != fingerprint:
        raise CacheMismatchError(
            f"token cache {out_dir} was made by another tokenizer ({manifest['tokenizer']['source']}, "
            f"fingerprint {made_by}, this one {fingerprint}); use another cache_dir or delete it"
        )
    if resolution is not None and manifest["resolution"] != resolution:
        raise CacheMismatchError(
            f"token cache {out_dir} was made at resolution {manifest['resolution']}, not {resolution}"
        )
    if flip is not None and manifest.get("flip", True) != flip:
        raise CacheMismatchError(
            f"token cache {out_dir} was made with flip={manifest.get('flip', True)}, not flip={flip}"
        )
    if data is not None:
        made_from = manifest.get("data")
        if made_from is None:
            log.warning("token cache %s does not record its dataset (made before caches did, or from data not read "
                        "from files): it is checked for the tokenizer, resolution and flips only", out_dir)
        else:
            _refuse_other_dataset(made_from, data, where=f"token cache {path} was made from another dataset")
    _check_array(out_dir / "tokens.npy", dtype=np.uint16,
                 shape=(manifest["num_sequences"], manifest["num_tokens"]))
    _check_array(out_dir / "labels.npy", dtype=np.int32, shape=(manifest["num_sequences"],))
    return manifest


def _refuse_other_dataset(old: dict, new: dict, *, where: str) -> None:
    """CacheMismatchError naming every field of two dataset identities that differs (paths whole)."""
    diff = [f"{k} (was {old.get(k)}, now {new.get(k)})" for k in ("root", "split", "format", "files", "sha256")
            if old.get(k) != new.get(k)]
    diff += [f"{k} (was {old.get(k)}, now {new.get(k)})" for k in sorted(set(old) | set(new))
             if k not in ("root", "split", "format", "files", "sha256") and old.get(k) != new.get(k)]
    if diff:
        raise CacheMismatchError(f"{where}: {'; '.join(diff)}; delete it or use another cache.dir")


def _remove_leftovers(out_dir: Path) -> None:
    """Temporary files a killed write left behind (``.<name>.*.tmp`` of atomic_path); they are never read."""
    for folder in (out_dir, out_dir / "shards"):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


def build_token_cache(
    *, tokenizer: torch.nn.Module, tokenizer_source: str, dataset: Dataset, out_dir: str | os.PathLike,
    batch_size: int = 64, device: torch.device | str = "cpu", dtype: str = "auto", num_workers: int = 0,
    fabric=None, flip: bool = True, decode: str = "pil", compile: bool = False, data: dict | None = None,
) -> dict:
    """Build (or resume, or reuse) a cache; returns its manifest.

    data: the dataset's :func:`dataset_identity` (what ``dataset`` was opened from: root, split,
    format), recorded in the manifest and checked when the cache exists; None: taken from the
    dataset object (see :func:`cache_manifest`).

    With a launched ``lightning.Fabric``, every rank builds its own shards on its own device
    and rank 0 merges them; without one, this process does everything. decode, compile: see
    :func:`build_shards`.
    """
    from tokenizer import require_discrete
    from titok_core.runtime import resolve_workers

    require_discrete(tokenizer, "a token cache for MaskGIT training")
    num_workers = resolve_workers(num_workers)
    rank, world_size = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    barrier = fabric.barrier if fabric is not None else (lambda: None)
    manifest = cache_manifest(
        tokenizer=tokenizer, tokenizer_source=tokenizer_source, dataset=dataset, resolution=tokenizer.image_size,
        flip=flip, decode=decode, data=data,
    )
    fingerprint = manifest["tokenizer"]["fingerprint"]
    check = partial(check_cache, out_dir, fingerprint=fingerprint, resolution=manifest["resolution"], flip=flip,
                    data=manifest["data"])
    if (Path(out_dir) / "manifest.json").is_file():
        found = check()
        # A kill after the manifest was written but before the shards were removed leaves them: drop them.
        shutil.rmtree(Path(out_dir) / "shards", ignore_errors=True)
        return found
    # Another job may be building this very cache (a sweep started at once): wait for it, then take
    # its result or resume what it left. The ranks of one Fabric job share out the work instead.
    # The lock file lives in the cache folder and goes once the cache is finished: from then on
    # nobody builds it (whoever gets the lock checks manifest.json first), so removing the file
    # under a process that waits for it is harmless.
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    locked = fabric is None
    with FileLock(_lock_path(out_dir)) if locked else contextlib.nullcontext():
        if (Path(out_dir) / "manifest.json").is_file():
            if locked:
                _lock_path(out_dir).unlink(missing_ok=True)
            return check()
        stream = isinstance(dataset, WebDatasetShards)
        if rank == 0:
            images = "streamed images" if stream else f"{manifest['num_images']} images"
            log.info("token cache %s: building it from %s (a rerun resumes it)", out_dir, images)
            _check_partial(out_dir, manifest, batch_size, shards=dataset.urls if stream else None)
            _remove_leftovers(Path(out_dir))  # the other ranks wait at the barrier: nothing is being written
        barrier()
        if stream:
            build_stream_shards(
                tokenizer=tokenizer, shards=dataset, out_dir=out_dir, batch_size=batch_size, device=device,
                dtype=dtype, num_workers=num_workers, rank=rank, world_size=world_size, flip=flip,
            )
        else:
            build_shards(
                tokenizer=tokenizer, dataset=dataset, out_dir=out_dir, batch_size=batch_size, device=device,
                dtype=dtype, num_workers=num_workers, rank=rank, world_size=world_size, flip=flip, decode=decode,
                compile=compile,
            )
        barrier()
        if rank == 0:
            merge_shards(out_dir=out_dir, num_images=manifest["num_images"], batch_size=batch_size,
                         manifest=manifest, num_tars=len(dataset) if stream else None)
        barrier()
        if locked:
            _lock_path(out_dir).unlink(missing_ok=True)
    return check()


def _lock_path(out_dir: str | os.PathLike) -> Path:
    """The lock of a cache being built: a hidden file in its folder, removed when the cache is finished."""
    return Path(out_dir) / ".lock"


def _check_partial(out_dir: str | os.PathLike, manifest: dict, batch_size: int, shards: list[str] | None = None) -> None:
    """A half-built cache may only be resumed by the same tokenizer, data, batch size and flip setting.

    Plans written before they recorded the dataset or the flip setting are checked for the rest."""
    out_dir = Path(out_dir)
    plan = dict(
        fingerprint=manifest["tokenizer"]["fingerprint"], resolution=manifest["resolution"],
        num_images=manifest["num_images"], batch_size=batch_size, decode=manifest["decode"],
        flip=manifest.get("flip", True), data=manifest.get("data"),
    )
    if shards is not None:
        plan["shards"] = list(shards)
    path = out_dir / "shards" / "plan.json"
    if path.is_file():
        try:
            old = {"decode": "pil", **json.loads(path.read_text())}  # plans from before decode="device"
        except ValueError as exc:
            raise CacheMismatchError(f"half-built token cache plan {path} is not readable JSON ({exc}); "
                                     "delete the cache directory and build it again") from None
        for key in ("flip", "data"):  # plans from before these were recorded
            if key not in old:
                log.warning("half-built token cache %s does not record its %s: resuming it checks the rest only",
                            out_dir, "dataset" if key == "data" else "flip setting")
                old[key] = plan[key]
        if old["data"] is not None and plan["data"] is not None:
            _refuse_other_dataset(old["data"], plan["data"],
                                  where=f"half-built token cache {out_dir} ({path}) was started from another dataset")
        old["data"] = plan["data"]
        if old != plan:
            diff = ", ".join(f"{k} (was {old.get(k)}, now {plan[k]})" if k != "shards" else k
                             for k in plan if old.get(k) != plan[k])
            raise CacheMismatchError(f"half-built token cache {out_dir} differs in {diff}; delete it or use another cache_dir")
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(plan))


class TokenDataset(Dataset):
    """A finished cache as (tokens int64 [L], label int64) pairs, memory-mapped."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.manifest = check_cache(cache_dir)
        self.tokens = np.load(Path(cache_dir) / "tokens.npy", mmap_mode="r")
        self.labels = np.load(Path(cache_dir) / "labels.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.tokens[i].astype(np.int64)), torch.tensor(int(self.labels[i]))


def default_cache_dir(*, root: str | os.PathLike, split: str, tokenizer: torch.nn.Module, flip: bool) -> Path:
    """Where a cache lives unless ``cache.dir`` says:
    data/token_cache/<dataset folder>-<root hash>-<split>-<tokenizer fingerprint>[-noflip].

    <root hash>: 8 hex digits of the dataset's absolute root, so two datasets whose folders share a
    name (/a/train and /b/train) never share a cache."""
    from titok_core.formats import dataset_name

    text = os.fspath(root)
    where = hashlib.sha256((text if "://" in text else os.path.abspath(text)).encode()).hexdigest()[:8]
    suffix = "" if flip else "-noflip"
    return Path("data/token_cache") / f"{dataset_name(root)}-{where}-{split}-{tokenizer_fingerprint(tokenizer)}{suffix}"


def _main(cfg) -> None:
    """``python -m generator.cache``: tokenize a dataset (any format of titok_core.formats), across
    GPUs/processes with Lightning Fabric."""
    from titok_core.stopping import stop_cleanly

    with stop_cleanly(INTERRUPTED):
        _build(cfg)


def _build(cfg) -> None:
    from lightning import Fabric

    from tokenizer import load_tokenizer
    from titok_core.formats import open_split
    from titok_core.runtime import exit_on_user_error
    from titok_core.stopping import forward_signals

    # Only the keys Fabric takes: the group is named trainer as in generator.train, whose experiments
    # (experiment=small ...) set training keys there too.
    fabric = Fabric(**{k: cfg.trainer[k] for k in FABRIC_KEYS if k in cfg.trainer})
    fabric.launch()
    launcher = fabric.strategy.launcher
    if launcher is not None and getattr(launcher, "procs", None):  # this process started the other ranks
        forward_signals(lambda signum: [proc.send_signal(signum) for proc in launcher.procs])
    with exit_on_user_error():
        tok = load_tokenizer(cfg.tokenizer.spec, cfg.tokenizer.checkpoint)
        dataset = open_split(cfg.data.root, cfg.data.split, data_format=cfg.data.format, resolution=tok.image_size)
        out_dir = Path(cfg.cache.dir or default_cache_dir(root=cfg.data.root, split=cfg.data.split, tokenizer=tok,
                                                         flip=cfg.cache.flip))
        manifest = build_token_cache(
            tokenizer=tok, tokenizer_source=str(cfg.tokenizer.spec), dataset=dataset, out_dir=out_dir,
            device=fabric.device, fabric=fabric, data=dataset_identity(cfg.data.root, cfg.data.split, cfg.data.format),
            **{k: v for k, v in cfg.cache.items() if k != "dir"},
        )
    if fabric.is_global_zero:
        print(
            f"token cache {out_dir}: {manifest['num_sequences']} sequences of {manifest['num_tokens']} tokens "
            f"from {manifest['num_images']} images ({manifest['num_skipped']} skipped)"
        )


INTERRUPTED = "interrupted: the finished shards are kept; run the same command to resume"
FABRIC_KEYS = ("accelerator", "devices", "num_nodes", "strategy")
RENAMED = {
    "data_root": "data.root", "split": "data.split", "data_format": "data.format", "checkpoint": "tokenizer.checkpoint",
    "out_dir": "cache.dir", "batch_size": "cache.batch_size", "dtype": "cache.dtype", "num_workers": "cache.num_workers",
    "decode": "cache.decode", "compile": "cache.compile", "accelerator": "trainer.accelerator",
    "devices": "trainer.devices", "num_nodes": "trainer.num_nodes", "strategy": "trainer.strategy",
}


def main() -> None:
    from titok_core.cli import hydra_entry
    from titok_core.quiet import quiet_libraries

    quiet_libraries()
    entry = hydra_entry(config="generator/cache", description=__doc__, renamed=RENAMED,
                        scalar_groups={"tokenizer": "tokenizer.spec"}, on_interrupt=INTERRUPTED)
    entry(_main)()


if __name__ == "__main__":
    main()
