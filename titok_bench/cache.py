"""Benchmark building the token cache from JPEG files, decoding included (random tokenizer weights are fine).

    python -m titok_bench.cache --tokenizer-spec titok_l32 --images 4096 --batch-size 256 --dtype bf16
    python -m titok_bench.cache --folder /data/imagenet/val --images 8192 --compile
Prints one JSON line. For each decode path (``--decode``; see ``generator.cache.shards.build_shards``):
images/s of building the shards (read, decode, resize + crop, encode the image and its mirror,
write; the manifest and merge are not timed), images/s of reading + decoding + preprocessing
alone, and peak memory. Then how far the device path agrees with the PIL path: the share of
equal tokens and of differing pixels. And the largest batch whose encoding fits (probed on CUDA).

Without ``--folder`` the images are synthetic JPEGs (quality 90) in a mix of ImageNet's common
sizes (500x375, 375x500, 500x333, 500x500, ...), written to a temporary folder first.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from generator.cache.shards import _collate, _on_device, _ShardBatches, build_shards
from generator.device_decode import EncodedImages, collate_encoded, decode_batch
from titok_bench.flags import renamed_flags
from titok_bench.timing import largest_batch, peak_memory_mb
from titok_core.data import ImageFolderDataset
from titok_core.runtime import autocast, pick_device
from tokenizer import PRESETS, load_tokenizer

IMAGENET_SIZES = [(500, 375), (375, 500), (500, 333), (500, 500), (333, 500), (500, 400), (640, 480), (400, 300)]


def _write_jpegs(args: tuple[Path, int, int, int]) -> None:
    folder, start, stop, seed = args
    rng = np.random.default_rng(seed + start)
    for i in range(start, stop):
        w, h = IMAGENET_SIZES[i % len(IMAGENET_SIZES)]
        low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        pixels = np.asarray(low, dtype=np.int16) + rng.integers(-24, 25, (h, w, 3), dtype=np.int16)  # texture
        out = folder / f"class{i % 10:02d}"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out / f"img{i:07d}.JPEG", quality=90)


def synthetic_jpegs(folder: Path, n: int, *, workers: int, seed: int = 0) -> Path:
    """n JPEGs in 10 class folders, ImageNet-like sizes and file sizes."""
    chunks = [(folder, s, min(s + 256, n), seed) for s in range(0, n, 256)]
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(_write_jpegs, chunks))
    return folder


def _subset(data: ImageFolderDataset, n: int) -> ImageFolderDataset:
    sub = copy.copy(data)
    sub.samples, sub._bad = data.samples[:n], data._bad[:n].clone()
    sub.records = type(data.records)(sub.samples)  # len() and items come from the records
    return sub


def _decode_only(data, *, decode: str, batch_size: int, workers: int, device: torch.device) -> float:
    """Images/s of reading, decoding and preprocessing alone (what feeds the encoder)."""
    n = len(data)
    batches = _ShardBatches(list(range((n + batch_size - 1) // batch_size)), batch_size, n)
    if decode == "device":
        loader = DataLoader(EncodedImages(data), batch_sampler=batches, num_workers=workers, collate_fn=collate_encoded)
    else:
        loader = DataLoader(data, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                            pin_memory=device.type == "cuda")
    start = time.perf_counter()
    for batch in loader:
        if decode == "device":
            _on_device(batch, dataset=data, resolution=data.resolution, device=device)
        elif batch[0] is not None:
            batch[0].to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer-spec", default="titok_l32", help=f"tokenizer spec ({', '.join(PRESETS)}, or a file)")
    p.add_argument("--tokenizer-checkpoint", default=None)
    renamed_flags(p, {"--tokenizer": "--tokenizer-spec"})
    p.add_argument("--folder", default=None, help="an image folder (<folder>/<class>/<image>); default: synthetic")
    p.add_argument("--images", type=int, default=4096, help="images to tokenize (the first ones of --folder)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--decode", default="pil,device", help="comma-separated decode paths: pil, device")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument("--warmup-batches", type=int, default=2, help="an untimed build of this many batches first")
    p.add_argument("--probe", default="auto", choices=["auto", "yes", "no"],
                   help="probe the largest encoding batch that fits (auto: on CUDA)")
    p.add_argument("--max-batch", type=int, default=4096)
    args = p.parse_args(argv)
    paths = [d for d in args.decode.split(",") if d]
    if args.images < 1 or args.batch_size < 1 or not paths or not set(paths) <= {"pil", "device"}:
        p.error("--images and --batch-size must be >= 1, --decode from pil,device")
    device = pick_device(args.device)
    probe = args.probe == "yes" or (args.probe == "auto" and device.type == "cuda")
    torch.manual_seed(0)
    tok = load_tokenizer(args.tokenizer_spec, args.tokenizer_checkpoint, random_weights=True).to(device).eval()  # speed only

    tmp = Path(tempfile.mkdtemp(prefix="cache_benchmark_"))
    try:
        folder = Path(args.folder) if args.folder else synthetic_jpegs(tmp / "images", args.images,
                                                                         workers=args.num_workers)
        data = _subset(ImageFolderDataset(folder, resolution=tok.image_size, train=False), args.images)
        n = len(data.samples)
        result = {
            "benchmark": "token_cache", "tokenizer": tok.source, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "images": n, "folder": args.folder or "synthetic",
            "mean_file_kb": round(sum(os.path.getsize(s[0]) for s in data.samples) / n / 1024, 1),
            "batch_size": args.batch_size, "dtype": args.dtype, "compile": args.compile,
            "num_workers": args.num_workers, "paths": {},
        }
        kw = dict(tokenizer=tok, batch_size=args.batch_size, device=device, dtype=args.dtype,
                  num_workers=args.num_workers, compile=args.compile)
        for decode in paths:
            if args.warmup_batches:
                build_shards(dataset=_subset(data, args.warmup_batches * args.batch_size), out_dir=tmp / f"warm_{decode}",
                             decode=decode, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            skipped = build_shards(dataset=data, out_dir=tmp / decode, decode=decode, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            result["paths"][decode] = {
                "images_per_s": round(n / seconds, 1), "seconds": round(seconds, 2), "skipped": skipped,
                "peak_memory_mb": round(peak_memory_mb(device), 1),
                "decode_only_images_per_s": round(_decode_only(
                    data, decode=decode, batch_size=args.batch_size, workers=args.num_workers, device=device), 1),
            }
        if len(paths) == 2:
            result["agreement"] = _agreement(tmp, data, device)
        result.update(_probe(tok, args, device) if probe else {"largest_batch": None, "largest_batch_limited": False})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))
    return result


def _agreement(tmp: Path, data: ImageFolderDataset, device: torch.device, n: int = 64) -> dict:
    tokens = {}
    for decode in ("pil", "device"):
        shards = sorted((tmp / decode / "shards").glob("shard_*.npz"))
        tokens[decode] = np.concatenate([np.load(s)["tokens"] for s in shards])
    sub = _subset(data, n)
    encoded = [EncodedImages(sub)[i][0] for i in range(len(sub))]
    fast = decode_batch(encoded, resolution=sub.resolution, device=device,
                        fallback=lambda i: None if sub[i] is None else sub[i][0])
    diffs = [((a.cpu() - b[0]).abs() * 255).round() for a, b in zip(fast, map(sub.__getitem__, range(len(sub))))
             if a is not None and b is not None]
    diffs = torch.stack(diffs)
    same_shape = tokens["pil"].shape == tokens["device"].shape
    return {
        "tokens_equal_share": round(float((tokens["pil"] == tokens["device"]).mean()), 5) if same_shape else None,
        "pixels_differing_share": round(float((diffs > 0).float().mean()), 5),
        "pixels_max_abs_diff_uint8": int(diffs.max()),
    }


def _probe(tok, args, device: torch.device) -> dict:
    def encode(b: int) -> None:
        x = torch.rand(2 * b, 3, tok.image_size, tok.image_size, device=device)  # each image and its mirror
        with torch.inference_mode(), autocast(device, args.dtype):
            tok.encode(x)

    return largest_batch(encode, start=args.batch_size, limit=args.max_batch, device=device)


if __name__ == "__main__":
    main()
