"""Benchmark gFID evaluation: ``eval.gfid mode=inception`` end to end, with random weights everywhere.

    python -m titok_bench.eval --generator-spec maskgit_l32 --num-samples 50000 --batch-size 125
    python -m titok_bench.eval --num-samples 5000 --sampler-compile reduce-overhead --decoder-compile default
Runs the real evaluation (sampling, decoding and Inception streamed batch by batch, over
classes balanced as for the paper's 50,000 samples) with random generator and tokenizer
weights, a randomly initialised Inception and random reference statistics: the FID it prints
means nothing, the time is the real one. Prints one JSON line: seconds for the samples (and
with ``--compare-overlap`` also without overlapping the stages, with the FID of both, which
must be equal), samples/s, peak memory, and the largest batch that fits (probed on CUDA).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from generator.presets import PRESETS
from sampling.fast import COMPILE_MODES
from titok_bench.flags import pipeline_flags
from titok_bench.timing import largest_batch, peak_memory_mb
from titok_core.runtime import pick_device

CONF = Path(__file__).resolve().parent.parent / "conf" / "eval"


def random_inception_weights(path: Path) -> Path:
    """A torch-fidelity Inception state dict with He-initialised random weights (nothing to download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    class Unloaded(tf_inception.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return super().load_state_dict(state_dict, strict=False, assign=assign)

    empty = path.with_name("empty.pth")
    torch.save({}, empty)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.5, generator=g)
    torch.save(net.state_dict(), path)
    return path


def random_reference(path: Path) -> Path:
    from eval.reference import save_reference_stats

    features = np.random.default_rng(0).normal(size=(4096, 2048))
    return save_reference_stats(path, features.mean(0), np.cov(features, rowvar=False), {"source": "random"})


def main(argv: list[str] | None = None) -> dict:
    from hydra import compose, initialize_config_dir

    from eval.gfid import run
    from eval.samples import pipeline_from_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pipeline_flags(p, presets=list(PRESETS))
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=125)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--sampler-compile", default="none", choices=COMPILE_MODES)
    p.add_argument("--decoder-compile", default="none", choices=COMPILE_MODES)
    p.add_argument("--compare-overlap", action="store_true", help="also run without overlapping the stages")
    p.add_argument("--warmup-samples", type=int, default=None,
                   help="an untimed run of this many samples first (compilation); default 3 batches")
    p.add_argument("--probe", default="auto", choices=["auto", "yes", "no"],
                   help="probe the largest batch that fits (auto: on CUDA)")
    p.add_argument("--max-batch", type=int, default=4096)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    probe = args.probe == "yes" or (args.probe == "auto" and device.type == "cuda")
    warmup = 3 * args.batch_size if args.warmup_samples is None else args.warmup_samples

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inception = random_inception_weights(tmp / "inception.pth")
        reference = random_reference(tmp / "reference.npz")

        def cfg(num_samples: int, overlap: bool):
            overrides = [
                "mode=inception", f"generator.spec={args.generator_spec}", "random_weights=true", f"num_samples={num_samples}",
                f"batch_size={args.batch_size}", f"dtype={args.dtype}", f"reference={reference}",
                f"inception_weights={inception}", "state_dir=null", "out=null", f"overlap={overlap}",
                f"sampler_compile={args.sampler_compile}", f"decoder_compile={args.decoder_compile}",
                "trainer.accelerator=" + ("gpu" if device.type == "cuda" else "cpu"),
            ]
            for key, value in (("generator.checkpoint", args.generator_checkpoint), ("tokenizer.spec", args.tokenizer_spec),
                               ("tokenizer.checkpoint", args.tokenizer_checkpoint)):
                if value is not None:
                    overrides.append(f"{key}={value}")
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                return compose("gfid", overrides=overrides)

        pipe = pipeline_from_config(cfg(warmup, True))  # one pipeline for every run: compiled once
        if warmup:
            run(cfg(warmup, True), pipe)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timed = run(cfg(args.num_samples, True), pipe)
        result = {
            "benchmark": "gfid", "generator": args.generator_spec, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "num_samples": timed["num_samples"], "batch_size": args.batch_size,
            "dtype": timed["dtype"], "sampler_compile": args.sampler_compile, "decoder_compile": args.decoder_compile,
            "seconds": timed["loop_seconds"], "samples_per_s": round(timed["num_samples"] / timed["loop_seconds"], 1),
            "peak_memory_mb": round(peak_memory_mb(device), 1), "fid_random_weights": timed["fid"],
        }
        if args.compare_overlap:
            serial = run(cfg(args.num_samples, False), pipe)
            result.update(seconds_without_overlap=serial["loop_seconds"],
                          same_fid_and_is=serial["fid"] == timed["fid"] and serial["is_mean"] == timed["is_mean"])
        result.update(_probe(cfg(args.batch_size, True), pipe, args, device) if probe else
                      {"largest_batch": None, "largest_batch_limited": False})
    print(json.dumps(result))
    return result


def _probe(cfg, pipe, args, device: torch.device) -> dict:
    """The largest batch for which one batch goes through sampling, decoding and Inception."""
    from eval.fidelity import InceptionFeatures
    from eval.samples import sampler_and_decoder
    from titok_core.images import to_uint8
    from titok_core.runtime import autocast

    sampler, decoder = sampler_and_decoder(pipe, cfg)
    acc = InceptionFeatures(cfg.inception_weights, device=device)

    def one_batch(b: int) -> None:
        labels = torch.arange(b, device=device) % pipe.generator.num_classes
        with torch.inference_mode(), autocast(device, cfg.dtype):
            acc.update(to_uint8(decoder(sampler(labels, torch.Generator(device=device).manual_seed(0))).float()))

    return largest_batch(one_batch, start=args.batch_size, limit=args.max_batch, device=device)


if __name__ == "__main__":
    main()
