"""Benchmark TiTok encode/decode throughput (random weights are fine).

    python -m titok_bench.tokenizer --tokenizer-spec titok_l32 --batch-size 32 --dtype bf16 [--compile]
Prints one JSON line: images/s for encode and decode, peak memory.
"""
from __future__ import annotations

import argparse
import json

import torch

from titok_bench.flags import renamed_flags
from titok_bench.timing import peak_memory_mb, time_call
from titok_core.runtime import autocast, pick_device
from tokenizer import PRESETS, load_tokenizer


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer-spec", default="titok_l32", help=f"tokenizer spec ({', '.join(PRESETS)}, or a file)")
    renamed_flags(p, {"--preset": "--tokenizer-spec"})
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile encoder and decoder")
    args = p.parse_args(argv)

    device = pick_device(args.device)
    torch.manual_seed(0)
    tok = load_tokenizer(args.tokenizer_spec, random_weights=True).to(device)  # speed only: weights do not matter
    if args.compile:
        tok.encoder = torch.compile(tok.encoder)
        tok.decoder = torch.compile(tok.decoder)
        if hasattr(tok, "pixel_decoder"):
            tok.pixel_decoder = torch.compile(tok.pixel_decoder)
    x = torch.rand(args.batch_size, 3, tok.image_size, tok.image_size, device=device)
    if not tok.is_discrete:  # continuous latents instead of token ids
        tokens = torch.randn(args.batch_size, tok.num_tokens, tok.token_size, device=device)
    else:
        tokens = torch.randint(0, tok.codebook_size, (args.batch_size, tok.num_tokens), device=device)

    def encode():
        with torch.inference_mode(), autocast(device, args.dtype):
            tok.encode(x)

    def decode():
        with torch.inference_mode(), autocast(device, args.dtype):
            tok.decode(tokens)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_enc = time_call(encode, device=device, warmup=args.warmup, iters=args.iters)
    t_dec = time_call(decode, device=device, warmup=args.warmup, iters=args.iters)
    result = {
        "benchmark": "tokenizer", "tokenizer": args.tokenizer_spec, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "batch_size": args.batch_size, "compile": args.compile,
        "encode_images_per_s": round(args.batch_size / t_enc, 2),
        "decode_images_per_s": round(args.batch_size / t_dec, 2),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
