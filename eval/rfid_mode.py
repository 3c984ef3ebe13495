"""``eval.gfid mode=rfid``: a tokenizer's rFID (reconstructions vs the originals), PSNR and SSIM.

The images come from ``data.root`` in any format (a folder, a Hugging Face dataset, WebDataset
shards); each process takes every W-th batch, and every ``state_every`` batches saves its state
(eval.state), so a killed run resumes where it stopped.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from eval.fidelity import InceptionFeatures
from eval.reference import center_crop_uint8
from eval.state import Progress, fingerprint
from titok_core.data import list_image_files
from titok_core.errors import MissingFileError, UsageError
from titok_core.images import to_uint8
from titok_core.metrics import fid_from_stats, psnr, ssim
from titok_core.runs import dataset_identity, file_identity
from titok_core.runtime import autocast
from tokenizer import CheckpointError, load_tokenizer


def rfid_images(data: DictConfig, resolution: int):
    """The rFID images of eval.gfid's ``data`` group (root, split, format) in any format: a
    map-style dataset of (uint8 [3,R,R], label) or None per unreadable image, or streamed
    WebDataset shards. A folder is read recursively (class subfolders or not); the ADM centre
    crop (``center_crop_uint8``) prepares each image."""
    from titok_core.data import ImageRecordsDataset
    from titok_core.formats import open_split, resolve_format

    fmt = resolve_format(data.format, data.root)
    transform = partial(center_crop_uint8, resolution=resolution)
    split = data.split
    if fmt == "folder":
        root = Path(data.root) / split if split else Path(data.root)
        paths = list_image_files(root)
        if not paths:
            raise MissingFileError(f"no images under {root}")
        records = [(str(p), 0, str(p)) for p in paths]
        return ImageRecordsDataset(records, classes=[], resolution=resolution, train=False, transform=transform)
    source = open_split(data.root, split, format=fmt, resolution=resolution, transform=transform)
    if fmt == "webdataset":
        source.transform = transform  # the streamed samples are decoded by _rfid_batches
    return source


def _rfid_batches(source, *, batch_size: int, limit: int | None, rank: int, world: int, start: int):
    """This rank's batches (b % world == rank) from its ``start``-th on: (uint8 [B',3,R,R] or None, skipped).

    Streamed shards are read in order by every rank; only its own batches are decoded."""
    from titok_core.formats import WebDatasetShards, decode_sample

    def stack(items):
        kept = [it[0] for it in items if it is not None]
        return (torch.stack(kept) if kept else None), len(items) - len(kept)

    if not isinstance(source, WebDatasetShards):
        n = min(len(source), limit) if limit else len(source)
        mine = list(range(0, n, batch_size))[rank::world]
        for s in mine[start:]:
            yield stack([source[i] for i in range(s, min(s + batch_size, n))])
        return
    transform = source.transform
    b, seen, pending = 0, 0, []

    def flush():
        nonlocal b
        batch, b = pending[:], b + 1
        pending.clear()
        if (b - 1) % world == rank and (b - 1) // world >= start:
            return stack([decode_sample(*sample, transform) for sample in batch])
        return None

    for shard in range(len(source)):
        if limit and seen >= limit:
            break
        for sample in source.samples(shard):
            if limit and seen >= limit:
                break
            pending.append(sample)
            seen += 1
            if len(pending) == batch_size and (out := flush()) is not None:
                yield out
    if pending and (out := flush()) is not None:
        yield out


def evaluate_tokenizer(cfg: DictConfig, fabric) -> dict:
    """rFID (reconstructions vs the originals), PSNR and SSIM over a dataset in any format."""
    if not cfg.data.root:
        raise UsageError("mode=rfid needs data.root=... (e.g. the ImageNet val folder)")
    if not cfg.tokenizer.spec:
        raise CheckpointError("mode=rfid needs tokenizer.spec=... (and tokenizer.checkpoint=...)")
    device = fabric.device
    tok = load_tokenizer(cfg.tokenizer.spec, cfg.tokenizer.checkpoint,
                         random_weights=bool(cfg.get("random_weights", False))).to(device)
    source = rfid_images(cfg.data, tok.image_size)
    if hasattr(source, "urls"):
        total = None  # a stream: its length is known once read
    else:
        total = min(len(source), cfg.num_samples) if cfg.num_samples else len(source)
    mine_total = None if total is None else len(list(range(0, total, cfg.batch_size))[fabric.global_rank :: fabric.world_size])
    real = InceptionFeatures(cfg.inception_weights, device=device, keep_logits=False, extractor=None)
    fake = InceptionFeatures(cfg.inception_weights, device=device, keep_logits=False, extractor=real.extractor)
    data = dataset_identity(cfg.data.root, cfg.data.split, cfg.data.format)  # as runs and token caches record it
    fp = fingerprint(tok=tok.source, n=total or cfg.num_samples, bs=cfg.batch_size, world=fabric.world_size,
                     dtype=cfg.dtype, inception=cfg.inception_weights,
                     files=[file_identity(tok.source), file_identity(cfg.inception_weights)], data=data)
    state_dir = Path(cfg.state_dir) if cfg.state_dir else None
    progress = Progress(state_dir / f"rfid-{fp}-rank{fabric.global_rank}.pt" if state_dir else None, fp)
    progress.restore([real, fake])
    sums = progress.sums or {"psnr": 0.0, "ssim": 0.0, "n": 0.0}
    sums.setdefault("skipped", 0.0)
    batches = _rfid_batches(source, batch_size=cfg.batch_size, limit=cfg.num_samples or None,
                            rank=fabric.global_rank, world=fabric.world_size, start=progress.done)
    from titok_core.stopping import at_safe_points

    # SIGTERM waits for the end of a batch, whose state is then saved (titok_core.stopping).
    with at_safe_points():
        _run_batches(batches, progress=progress, sums=sums, real=real, fake=fake, tok=tok, device=device, cfg=cfg,
                     total=mine_total)
    progress.save([real, fake])
    totals = torch.tensor([sums["psnr"], sums["ssim"], sums["n"], sums["skipped"]], dtype=torch.float64, device=device)
    totals = fabric.all_reduce(totals, reduce_op="sum") if fabric.world_size > 1 else totals
    n = float(totals[2])
    if n == 0:
        raise MissingFileError(f"no readable images in {cfg.data.root}")
    mu_r, sigma_r = real.fid_stats()
    mu_f, sigma_f = fake.fid_stats()
    return {
        "metric": "rFID", "fid": fid_from_stats(mu_f, sigma_f, mu_r, sigma_r), "psnr": float(totals[0]) / n,
        "ssim": float(totals[1]) / n, "num_images": int(n), "num_skipped": int(totals[3]), "tokenizer": tok.source,
        "data": {k: data[k] for k in ("root", "split", "format")},
        "inception_weights": cfg.inception_weights or "torch-fidelity default", "dtype": cfg.dtype,
    }


def _run_batches(batches, *, progress, sums: dict, real, fake, tok, device, cfg: DictConfig, total) -> None:
    """Reconstruct each batch, add it to the statistics, and save the state every ``state_every`` batches."""
    from titok_core.stopping import stop_point

    for k, (x_u8, skipped) in enumerate(tqdm(batches, desc="rFID", unit="batch", initial=progress.done,
                                             total=total, disable=None), start=progress.done):
        stop_point(lambda: progress.save([real, fake]))  # batches before k are counted: a whole state
        sums["skipped"] += skipped
        progress.done, progress.sums = k + 1, sums
        if x_u8 is None:
            continue
        x_u8 = x_u8.to(device)
        x = x_u8.float() / 255
        with torch.inference_mode(), autocast(device, cfg.dtype):
            recon = tok.decode(tok.encode(x)).float()
        recon_u8 = to_uint8(recon)
        real.update(x_u8)
        fake.update(recon_u8)
        sums["psnr"] += float(psnr(x, recon_u8.float() / 255).sum())
        sums["ssim"] += float(ssim(x, recon_u8.float() / 255).sum())
        sums["n"] += len(x)
        if progress.done % cfg.state_every == 0:
            progress.save([real, fake])
