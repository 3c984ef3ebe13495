"""Writing a cache's shards: each rank tokenizes its own batches into ``shards/*.npz`` (one
batch a file, written atomically, skipped when it exists), and rank 0 merges them into
tokens.npy, labels.npy and manifest.json."""
from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm import tqdm

from titok_core.checkpoints import atomic_path
from titok_core.data import preprocess
from titok_core.errors import UsageError
from titok_core.formats import decode_sample
from titok_core.runtime import autocast


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
        raise UsageError(f"decode must be one of {', '.join(DECODERS)}, got {decode!r}")
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
    with at_safe_points():  # a stop waits for the shard in hand, never lands while a worker hands a batch over
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
    with at_safe_points():  # a stop waits for the batch in hand, never lands while a worker hands one over
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
        unfinished = [_stream_done_path(out_dir, i).name for i in range(num_tars)
                      if not _stream_done_path(out_dir, i).exists()]
        if unfinished:
            raise RuntimeError(f"cannot merge the token cache: {len(unfinished)} tar shard(s) unfinished, "
                               f"e.g. {unfinished[0]}")
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
    num_tokens = manifest["num_tokens"]
    with atomic_path(out_dir / "tokens.npy") as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=(total, num_tokens))
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
