"""What a token cache records of what made it: the tokenizer's fingerprint, the dataset's
identity, the manifest, and where a cache lives by default."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from titok_core.data import ImageFolderDataset
from titok_core.formats import WebDatasetShards

FORMAT = "titok-gen-token-cache/1"


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
            "source": tokenizer_source, "config": tokenizer.config.to_dict(),
            "fingerprint": tokenizer_fingerprint(tokenizer),
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
