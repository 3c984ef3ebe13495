"""Benchmark end-to-end sampling: class labels -> tokens -> uint8 images on the device (random weights are fine).

    python -m titok_bench.sampling --generator-spec maskgit_l32 --batch-size 125 --dtype bf16
    python -m titok_bench.sampling --generator-spec uvit_s128 --paths fast --sampler-compile reduce-overhead
Prints one JSON line. For each path (``--paths``):

* eager: ``sample_tokens`` + ``TiTok.decode`` one batch after the other (what sampling.generate does);
* fast: :class:`sampling.fast.StaticSampler` (step compiled, CUDA graphs by default) +
  :class:`sampling.fast.FastDecoder` (compiled, channels_last pixel decoder, uint8 out),
  the two overlapped on CUDA streams.

Per path: samples/s end to end over ``--batches`` batches after ``--warmup`` untimed ones
(compilation and graph capture happen there), the generator and decoder alone per batch, peak
memory, and the largest batch that fits (probed on CUDA). With both paths: the fast path's
agreement with the eager one on the same labels and seed: the share of equal ids (with the
preset's settings, and at temperature 0) and the decoder's largest pixel difference on the same
tokens. The paper reports 101.6 samples/s for TiTok-L-32 on an A100.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch

from generator.presets import PRESETS
from generator.sampler import sample_tokens
from sampling.fast import COMPILE_MODES, FastDecoder, StaticSampler, pipelined, to_uint8
from sampling.pipeline import load_pipeline
from titok_bench.flags import pipeline_flags
from titok_bench.timing import largest_batch, peak_memory_mb, time_call
from titok_core.runtime import autocast, pick_device

PAPER_REFERENCE = "TiTok-L-32 101.6 samples/s on A100"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EndToEnd:
    """One way of turning labels into uint8 images: sample(labels, rng) -> tokens, decode(tokens) -> uint8."""

    def __init__(self, sample, decode, *, overlap: bool, device: torch.device, dtype: str):
        self.sample, self.decode, self.overlap, self.device, self.dtype = sample, decode, overlap, device, dtype

    def run(self, batches: list[tuple[torch.Tensor, torch.Generator]]) -> list[torch.Tensor]:
        """(labels int64 [B], rng) per batch -> uint8 images [B,3,H,W] per batch, on the device."""
        with torch.inference_mode(), autocast(self.device, self.dtype):
            stages = [lambda item: self.sample(*item), self.decode]
            return list(pipelined(batches, stages, device=self.device, overlap=self.overlap))


def _batches(n: int, batch_size: int, num_classes: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, num_classes, (batch_size,), generator=g).to(device),
         torch.Generator(device=device).manual_seed(seed + i))
        for i in range(n)
    ]


def measure(path: "EndToEnd", *, batch_size: int, num_classes: int, batches: int, warmup: int, probe: bool,
            limit: int) -> dict:
    device = path.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if warmup:
        path.run(_batches(warmup, batch_size, num_classes, device, seed=1000))
    _sync(device)
    work = _batches(batches, batch_size, num_classes, device)
    start = time.perf_counter()
    path.run(work)
    _sync(device)
    t = time.perf_counter() - start
    # The two stages alone, one batch after the other (no overlap).
    labels, rng = work[0]
    with torch.inference_mode(), autocast(device, path.dtype):
        tokens = path.sample(labels, rng)
        t_gen = time_call(lambda: path.sample(labels, rng), device=device, warmup=0, iters=1)
        t_dec = time_call(lambda: path.decode(tokens), device=device, warmup=0, iters=1)
    result = {
        "samples_per_s": round(batch_size * batches / t, 2), "s_per_batch": round(t / batches, 4),
        "generator_s_per_batch": round(t_gen, 4), "decoder_s_per_batch": round(t_dec, 4),
        "overlap": path.overlap, "peak_memory_mb": round(peak_memory_mb(device), 1),
    }
    result.update(largest_batch(
        lambda b: path.run(_batches(1, b, num_classes, device, seed=2000)), start=batch_size, limit=limit,
        device=device,
    ) if probe else {"largest_batch": None, "largest_batch_limited": False})
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pipeline_flags(p, presets=list(PRESETS))
    p.add_argument("--batch-size", type=int, default=125)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls and convolutions (for --dtype fp32)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batches", type=int, default=4, help="timed batches per path")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (compilation, CUDA graph capture)")
    p.add_argument("--paths", default="eager,fast", help="comma-separated: eager, fast")
    p.add_argument("--sampler-compile", default="reduce-overhead", choices=COMPILE_MODES)
    p.add_argument("--decoder-compile", default="default", choices=COMPILE_MODES)
    p.add_argument("--no-channels-last", action="store_true", help="fast path: keep the pixel decoder NCHW")
    p.add_argument("--no-overlap", action="store_true", help="fast path: decode after sampling, on one stream")
    p.add_argument("--probe", default="auto", choices=["auto", "yes", "no"],
                   help="probe the largest batch that fits (auto: on CUDA)")
    p.add_argument("--max-batch", type=int, default=4096, help="probe no further than this batch size")
    args = p.parse_args(argv)
    paths = [s for s in args.paths.split(",") if s]
    if args.batches < 1 or args.warmup < 0 or args.batch_size < 1 or not set(paths) <= {"eager", "fast"} or not paths:
        p.error("--batches and --batch-size must be >= 1, --warmup >= 0, --paths from eager,fast")

    device = pick_device(args.device)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    probe = args.probe == "yes" or (args.probe == "auto" and device.type == "cuda")
    torch.manual_seed(0)
    pipe = load_pipeline(
        generator={"spec": args.generator_spec, "checkpoint": args.generator_checkpoint},
        tokenizer={"spec": args.tokenizer_spec, "checkpoint": args.tokenizer_checkpoint},
        random_weights=True,  # speed: the figures do not depend on the weights
    ).to(device)
    gen, tok = pipe.generator, pipe.tokenizer
    num_classes = gen.num_classes
    result = {
        "benchmark": "sampling", "generator": args.generator_spec, "tokenizer": tok.source, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": args.dtype, "tf32": args.tf32, "batch_size": args.batch_size,
        "batches": args.batches, "sampling": pipe.sampling, "paths": {},
    }
    kw = dict(batch_size=args.batch_size, num_classes=num_classes, batches=args.batches, warmup=args.warmup,
              probe=probe, limit=args.max_batch)
    labels, rng_seed = _batches(1, args.batch_size, num_classes, device, seed=7)[0][0], 7
    t0 = {**pipe.sampling, "randomize_temperature": 0.0}
    reference = {}

    def outputs(sample, decode, settings_t0):
        """ids with the preset's settings and at temperature 0, and the images of the first."""
        with torch.inference_mode(), autocast(device, args.dtype):
            ids = sample(labels, torch.Generator(device=device).manual_seed(rng_seed))
            return {"ids": ids.cpu(), "ids_t0": settings_t0(labels).cpu(), "images": decode(ids).cpu()}

    if "eager" in paths:
        def eager_sample(labels, rng):
            return sample_tokens(gen, labels, rng=rng, **pipe.sampling)

        def eager_decode(tokens):
            return to_uint8(tok.decode(tokens))

        try:
            result["paths"]["eager"] = measure(
                EndToEnd(eager_sample, eager_decode, overlap=False, device=device, dtype=args.dtype), **kw)
            if "fast" in paths:
                reference = outputs(eager_sample, eager_decode, lambda y: sample_tokens(gen, y, **t0))
        except Exception as exc:  # noqa: BLE001 - report the failure in the JSON and go on
            traceback.print_exc(file=sys.stderr)
            result["paths"]["eager"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}

    if "fast" in paths:
        try:
            sampler = StaticSampler(gen, sampling=pipe.sampling, compile=args.sampler_compile)
            decoder = FastDecoder(tok, compile=args.decoder_compile, channels_last=not args.no_channels_last, uint8=True)
            fast = EndToEnd(sampler, decoder, overlap=not args.no_overlap, device=device, dtype=args.dtype)
            result["paths"]["fast"] = {
                "sampler_compile": args.sampler_compile, "decoder_compile": args.decoder_compile,
                "channels_last": not args.no_channels_last, **measure(fast, **kw),
            }
            if reference:
                sampler_t0 = StaticSampler(gen, sampling=t0, compile=args.sampler_compile)
                got = outputs(sampler, decoder, sampler_t0)
                with torch.inference_mode(), autocast(device, args.dtype):
                    same_tokens = decoder(reference["ids"].to(device)).cpu()
                eq = got["ids"] == reference["ids"]
                diff = (same_tokens.int() - reference["images"].int()).abs()
                rows = eq.all(1)
                result["agreement"] = {
                    "ids_equal_share": round(float(eq.float().mean()), 5),
                    "rows_equal_share": round(float(rows.float().mean()), 5),
                    "ids_equal_share_temperature_0": round(float((got["ids_t0"] == reference["ids_t0"]).float().mean()), 5),
                    "decoder_max_abs_diff_uint8": int(diff.max()),
                    "decoder_mean_abs_diff_uint8": round(float(diff.float().mean()), 4),
                    "images_max_abs_diff_uint8_rows_with_equal_ids": (
                        int((got["images"][rows].int() - reference["images"][rows].int()).abs().max()) if rows.any() else None
                    ),
                }
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            result["paths"]["fast"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}

    speeds = {k: v.get("samples_per_s") for k, v in result["paths"].items()}
    if speeds.get("eager") and speeds.get("fast"):
        result["fast_over_eager"] = round(speeds["fast"] / speeds["eager"], 2)
    result["paper_reference"] = PAPER_REFERENCE
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
