"""Benchmark the two routes of ``titok_core.attention``: PyTorch's fused kernel and the written-out softmax.

    python -m titok_bench.attention --dtype bf16 [--shape 64,4,33,64 ...]
Prints one JSON line: for each [B, H, L, Dh] shape, milliseconds per call of each route with and
without gradients (forward + backward, forward alone), and the route ``attention`` takes in each
case. The default shapes are the small recipe's generator (64 sequences of 33 tokens) and
tokenizer (16 images: 64 patches + 32 latent tokens), and TiTok-L-32's encoder (289 tokens).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from titok_bench.timing import time_call
from titok_core.attention import written_out, written_out_is_faster
from titok_core.runtime import DTYPES, pick_device

DEFAULT_SHAPES = ("64,4,33,64", "16,4,97,32", "8,16,289,64")


def shape_arg(text: str) -> tuple[int, int, int, int]:
    """'B,H,L,Dh' -> four positive ints (argparse reports anything else in one line)."""
    try:
        shape = tuple(int(n) for n in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not B,H,L,Dh (four positive integers)")
    return shape


def time_route(fn, shape, *, dtype, device, grad: bool, warmup: int, iters: int) -> float:
    """Milliseconds per call of fn(q, k, v): forward + backward when grad, else forward under no_grad."""
    q, k, v = (torch.randn(shape, dtype=dtype, device=device, requires_grad=grad) for _ in range(3))

    def call():
        if grad:
            fn(q, k, v).sum().backward()
        else:
            with torch.no_grad():
                fn(q, k, v)

    return 1000 * time_call(call, device=device, warmup=warmup, iters=iters)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", type=shape_arg,
                   help="B,H,L,Dh (repeatable; default: %s)" % " ".join(DEFAULT_SHAPES))
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--device", default="auto")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    device, dtype = pick_device(args.device), DTYPES[args.dtype]
    rows = []
    for shape in args.shape or [shape_arg(text) for text in DEFAULT_SHAPES]:
        row = {"shape": list(shape)}
        for grad in (True, False):
            kind = "train" if grad else "forward"
            for name, fn in (("fused", F.scaled_dot_product_attention), ("written_out", written_out)):
                ms = time_route(fn, shape, dtype=dtype, device=device, grad=grad, warmup=args.warmup, iters=args.iters)
                row[f"{kind}_{name}_ms"] = round(ms, 3)
            probe = torch.zeros(shape, device=device, dtype=dtype, requires_grad=grad)
            with torch.set_grad_enabled(grad):
                row[f"{kind}_route"] = "written_out" if written_out_is_faster(probe) else "fused"
        rows.append(row)
    result = {"benchmark": "attention", "device": str(device), "dtype": args.dtype,
              "threads": torch.get_num_threads(), "shapes": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
