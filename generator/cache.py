"""Token cache: a frozen tokenizer turns an image dataset into token sequences with labels.

Each image is tokenized as is and horizontally flipped (two sequences, as the official
pre-tokenisation). Layout of a finished cache directory::

    manifest.json   format, tokenizer identity (source, config, fingerprint), resolution,
                    image and sequence counts, class names
    tokens.npy      uint16 [M, L]  read with np.load(mmap_mode="r")
    labels.npy      int32  [M]

While it is being built, ``shards/shard_XXXXXX.npz`` hold one batch each, written
atomically: a kill loses at most the batch in flight and a rerun resumes. Shard i covers
dataset indices [i*S, (i+1)*S); rank r of W builds the shards with i % W == r, and rank 0
merges them into the flat arrays once all exist. ``manifest.json`` is written last, so a
directory with a manifest is complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from generator.device_decode import EncodedImages, collate_encoded, decode_batch
from tokenizer.checkpoints import atomic_path
from tokenizer.runtime import autocast

log = logging.getLogger(__name__)
FORMAT = "titok-gen-token-cache/1"


class CacheMismatchError(ValueError):
    """A cache made by another tokenizer or for another resolution; one-line message."""


def tokenizer_fingerprint(tokenizer: torch.nn.Module) -> str:
    """sha256 over the tokenizer config and every weight: two caches agree iff this agrees."""
    h = hashlib.sha256(json.dumps(tokenizer.config, sort_keys=True).encode())
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
    world_size: int = 1, decode: str = "pil", compile: bool = False,
) -> int:
    """Tokenize this rank's missing shards; returns how many images were skipped as unreadable.

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
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    batches = _ShardBatches(pending, batch_size, n)
    if decode == "device":
        loader = DataLoader(EncodedImages(dataset), batch_sampler=batches, num_workers=num_workers,
                            collate_fn=collate_encoded)
    else:
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=_collate,
                            pin_memory=device.type == "cuda")
    skipped = 0
    tokenizer = tokenizer.to(device).eval()
    if compile:
        tokenizer.encoder.compile()
    resolution = getattr(dataset, "resolution", tokenizer.image_size)
    bar = tqdm(zip(pending, loader), total=len(pending), desc=f"token cache (rank {rank})", unit="batch", disable=None)
    for index, batch in bar:
        if decode == "device":
            batch = _on_device(batch, dataset=dataset, resolution=resolution, device=device)
        images, labels, kept = batch
        size = min((index + 1) * batch_size, n) - index * batch_size
        skipped += size - kept
        if images is None:
            tokens = np.zeros((0, tokenizer.num_tokens), np.uint16)
            pair_labels = np.zeros((0,), np.int32)
        else:
            images = images.to(device, non_blocking=True)
            with torch.inference_mode(), autocast(device, dtype):
                both = tokenizer.encode(torch.cat([images, images.flip(-1)]))  # (2B, L)
            b = images.shape[0]
            # Interleave: row 2i is image i, row 2i+1 its mirror.
            tokens = torch.stack([both[:b], both[b:]], 1).reshape(2 * b, -1).cpu().numpy().astype(np.uint16)
            pair_labels = labels.repeat_interleave(2).numpy().astype(np.int32)
        with atomic_path(_shard_path(out_dir, index)) as tmp, open(tmp, "wb") as f:
            np.savez(f, tokens=tokens, labels=pair_labels, skipped=np.int64(size - kept))
    return skipped


def merge_shards(
    *, out_dir: str | os.PathLike, num_images: int, batch_size: int, manifest: dict
) -> dict:
    """Concatenate all shards into tokens.npy/labels.npy, write manifest.json, remove shards."""
    out_dir = Path(out_dir)
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
    manifest = dict(manifest, num_sequences=total, num_skipped=int(sum(int(p["skipped"]) for p in parts)))
    with atomic_path(out_dir / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out_dir / "shards", ignore_errors=True)
    return manifest


def cache_manifest(
    *, tokenizer: torch.nn.Module, tokenizer_source: str, dataset, resolution: int, decode: str = "pil"
) -> dict:
    """The identity a cache records and is checked against (``decode`` is recorded, not checked)."""
    return {
        "format": FORMAT,
        "tokenizer": {
            "source": tokenizer_source, "config": tokenizer.config, "fingerprint": tokenizer_fingerprint(tokenizer),
        },
        "resolution": resolution,
        "num_tokens": tokenizer.num_tokens,
        "codebook_size": tokenizer.codebook_size,
        "num_images": len(dataset),
        "classes": list(getattr(dataset, "classes", [])),
        "dataset_root": str(getattr(dataset, "root", "")),
        "flip": True,
        "decode": decode,
    }


def check_cache(out_dir: str | os.PathLike, *, fingerprint: str | None = None, resolution: int | None = None) -> dict:
    """Read a finished cache's manifest; refuse one made by another tokenizer or resolution."""
    out_dir = Path(out_dir)
    path = out_dir / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no finished token cache at {out_dir} (manifest.json missing)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise CacheMismatchError(f"{out_dir} is not a {FORMAT} cache (format {manifest.get('format')!r})")
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
    return manifest


def build_token_cache(
    *, tokenizer: torch.nn.Module, tokenizer_source: str, dataset: Dataset, out_dir: str | os.PathLike,
    batch_size: int = 64, device: torch.device | str = "cpu", dtype: str = "auto", num_workers: int = 0,
    fabric=None, decode: str = "pil", compile: bool = False,
) -> dict:
    """Build (or resume, or reuse) a cache; returns its manifest.

    With a launched ``lightning.Fabric``, every rank builds its own shards on its own device
    and rank 0 merges them; without one, this process does everything. decode, compile: see
    :func:`build_shards`.
    """
    rank, world_size = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    barrier = fabric.barrier if fabric is not None else (lambda: None)
    manifest = cache_manifest(
        tokenizer=tokenizer, tokenizer_source=tokenizer_source, dataset=dataset, resolution=tokenizer.image_size,
        decode=decode,
    )
    if (Path(out_dir) / "manifest.json").is_file():
        return check_cache(out_dir, fingerprint=manifest["tokenizer"]["fingerprint"], resolution=manifest["resolution"])
    if rank == 0:
        _check_partial(out_dir, manifest, batch_size)
    barrier()
    build_shards(
        tokenizer=tokenizer, dataset=dataset, out_dir=out_dir, batch_size=batch_size, device=device, dtype=dtype,
        num_workers=num_workers, rank=rank, world_size=world_size, decode=decode, compile=compile,
    )
    barrier()
    if rank == 0:
        merge_shards(out_dir=out_dir, num_images=len(dataset), batch_size=batch_size, manifest=manifest)
    barrier()
    return check_cache(out_dir)


def _check_partial(out_dir: str | os.PathLike, manifest: dict, batch_size: int) -> None:
    """A half-built cache may only be resumed by the same tokenizer, data and batch size."""
    out_dir = Path(out_dir)
    plan = dict(
        fingerprint=manifest["tokenizer"]["fingerprint"], resolution=manifest["resolution"],
        num_images=manifest["num_images"], batch_size=batch_size, decode=manifest["decode"],
    )
    path = out_dir / "shards" / "plan.json"
    if path.is_file():
        old = {"decode": "pil", **json.loads(path.read_text())}  # plans from before decode="device"
        if old != plan:
            diff = ", ".join(k for k in plan if old.get(k) != plan[k])
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


def _main(cfg) -> None:
    """``python -m generator.cache``: tokenize an image folder, across GPUs/processes with Lightning Fabric."""
    from lightning import Fabric

    from tokenizer import load_tokenizer
    from tokenizer.data import ImageFolderDataset
    from tokenizer.runtime import exit_on_user_error

    fabric = Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy)
    fabric.launch()
    with exit_on_user_error():
        tok = load_tokenizer(cfg.tokenizer, cfg.checkpoint)
        split = Path(cfg.data_root) / cfg.split
        if not split.is_dir():
            raise FileNotFoundError(f"no image folder at {split}")
        dataset = ImageFolderDataset(split, resolution=tok.image_size, train=False)
        out_dir = cfg.out_dir or Path("data/token_cache") / f"{Path(cfg.data_root).name}-{cfg.split}-{tokenizer_fingerprint(tok)}"
        manifest = build_token_cache(
            tokenizer=tok, tokenizer_source=str(cfg.tokenizer), dataset=dataset, out_dir=out_dir,
            batch_size=cfg.batch_size, device=fabric.device, dtype=cfg.dtype, num_workers=cfg.num_workers, fabric=fabric,
            decode=cfg.get("decode", "pil"), compile=cfg.get("compile", False),
        )
    if fabric.is_global_zero:
        print(
            f"token cache {out_dir}: {manifest['num_sequences']} sequences of {manifest['num_tokens']} tokens "
            f"from {manifest['num_images']} images ({manifest['num_skipped']} skipped)"
        )


if __name__ == "__main__":
    import hydra

    hydra.main(config_path="../conf/generator", config_name="cache", version_base="1.3")(_main)()
