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
from titok_core.runs import dataset_identity, urls_fingerprint

FORMAT = "titok-gen-token-cache/1"


def _identity_of(dataset) -> dict | None:
    """The identity of a dataset opened by :func:`titok_core.formats.open_split` without a known split
    (its root is then the split itself); None for one that is not read from files."""
    root, fmt = getattr(dataset, "root", None), getattr(dataset, "format", None)
    if fmt is None and isinstance(dataset, ImageFolderDataset):
        fmt = "folder"
    if root is None or fmt is None:
        return None
    if isinstance(dataset, WebDatasetShards):
        text = os.fspath(root)
        return {"root": text if "://" in text else os.path.abspath(text), "split": None, "format": fmt,
                **urls_fingerprint(list(dataset.urls))}
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

    data: the dataset's :func:`titok_core.runs.dataset_identity` (root, split, format, files); None: taken from
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
        "data_format": getattr(dataset, "format", "folder" if isinstance(dataset, ImageFolderDataset) else None),
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
