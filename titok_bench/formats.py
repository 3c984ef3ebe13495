"""Benchmark building a token cache from a dataset in any format (folder, Hugging Face, WebDataset).

    python -m titok_bench.formats --data-root data/demo_shapes --data-split val \
        --tokenizer-spec titok_demo [--data-format auto] [--batch-size 64] [--num-workers 0]
Prints one JSON line: images/s of the whole build (reading, decoding, preprocessing, encoding
each image and its mirror, writing and merging the shards) into a fresh temporary directory,
and images per CPU-second of this process (with --num-workers 0 that is all the work; it does
not move when other jobs share the cores).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from generator.cache.build import build_token_cache
from titok_bench.flags import renamed_flags
from titok_core.formats import FORMATS, open_split
from titok_core.runtime import pick_device
from tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--data-split", default=None, help="the split (default: the root is the split)")
    p.add_argument("--data-format", default="auto", choices=["auto", *FORMATS])
    p.add_argument("--tokenizer-spec", default="titok_demo", help="tokenizer spec (a preset, a file, ...)")
    p.add_argument("--tokenizer-checkpoint", default=None, help="tokenizer weights (a preset without them: random)")
    renamed_flags(p, {"--split": "--data-split", "--tokenizer": "--tokenizer-spec", "--checkpoint": "--tokenizer-checkpoint"})
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args(argv)

    device = pick_device(args.device)
    tok = load_tokenizer(args.tokenizer_spec, args.tokenizer_checkpoint, random_weights=True)  # speed only
    t0, c0 = time.perf_counter(), time.process_time()
    dataset = open_split(args.data_root, args.data_split, format=args.data_format, resolution=tok.image_size)
    with tempfile.TemporaryDirectory() as out:
        manifest = build_token_cache(
            tokenizer=tok, tokenizer_source=args.tokenizer_spec, dataset=dataset, out_dir=out, batch_size=args.batch_size,
            device=device, dtype=args.dtype, num_workers=args.num_workers,
        )
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    result = {
        "benchmark": "token_cache", "data": {"root": args.data_root, "split": args.data_split,
                                             "format": manifest["data_format"]},
        "tokenizer": args.tokenizer_spec, "device": str(device),
        "threads": torch.get_num_threads(), "num_workers": args.num_workers, "batch_size": args.batch_size,
        "images": manifest["num_images"], "skipped": manifest["num_skipped"], "seconds": round(seconds, 2),
        "images_per_s": round(manifest["num_images"] / seconds, 1), "cpu_seconds": round(cpu_seconds, 2),
        "images_per_cpu_s": round(manifest["num_images"] / cpu_seconds, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
