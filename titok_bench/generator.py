"""Benchmark generator training throughput (random weights, random tokens).

    python -m titok_bench.generator --generator-spec maskgit_l32 --batch-size 512 --dtype bf16 --compile --trainer
Prints one JSON line: steps/s, samples (sequences)/s and tokens/s of full training steps, peak
memory, and the largest batch that fits (probed on CUDA with eager steps).

A step is what ``MaskGITModule`` trains with: class dropout, arccos masking, the weighted
label-smoothed loss, backward, gradient clipping at 1.0 and AdamW on the module's own parameter
groups (fused on CUDA unless ``--fused no``). Without ``--trainer`` the steps run in a plain
loop (no EMA, no LR schedule, no logging). With ``--trainer`` they run inside ``Trainer.fit``
exactly as ``generator.train`` runs them: EMA callback, LR schedule, logging, and the batches
from :class:`generator.token_data.TokenDataModule` over a random token cache of
``--cache-size`` sequences (the ImageNet cache by default), on the device or through a
DataLoader (``--data``).
"""
from __future__ import annotations

import argparse
import json
import time

import lightning as L
import numpy as np
import torch

from generator import load_generator
from generator.lightning_module import MaskGITModule
from generator.presets import PRESETS
from generator.token_data import DeviceTokenLoader, EpochOrder, TokenDataModule
from titok_bench.flags import renamed_flags
from titok_bench.timing import largest_batch, peak_memory_mb, time_call
from titok_core.runtime import autocast, pick_device
from titok_core.trainer import ema_callback

IMAGENET_SEQUENCES = 2 * 1_281_167  # each image and its mirror


def model_config(spec: str) -> dict:
    """A generator preset name or any ``load_generator`` spec -> our generator config."""
    if spec in PRESETS:
        return dict(PRESETS[spec]["model"])
    return dict(load_generator(spec, random_weights=True).config)  # the architecture only


class RandomCache:
    """A token cache's arrays without the files: tokens uint16 [M,L], labels int32 [M] (TokenDataset's fields)."""

    def __init__(self, size: int, num_tokens: int, codebook_size: int, num_classes: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.tokens = rng.integers(0, codebook_size, (size, num_tokens), dtype=np.uint16)
        self.labels = rng.integers(0, num_classes, size, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.tokens[i].astype(np.int64)), torch.tensor(int(self.labels[i]))


class _StepTimer(L.Callback):
    """Wall time of the training batches after the first ``warmup`` (compilation, autotuning)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.steps, self.losses = warmup, None, 0, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.steps += 1
            self.losses.append(outputs["loss"].detach())

    def seconds_per_step(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - self.start) / self.steps


def _module(args, config: dict) -> MaskGITModule:
    fused = {"auto": None, "yes": True, "no": False}[args.fused]
    return MaskGITModule(model_config=config, fused_adamw=fused, compile=args.compile)


def run_trainer(args, config: dict, device: torch.device) -> tuple[float, list, MaskGITModule, int]:
    """Steps inside Trainer.fit as generator.train runs them; (s/step, losses, module, train batches/epoch)."""
    cache = RandomCache(args.cache_size, config["num_tokens"], config["codebook_size"], config["num_classes"])
    data = TokenDataModule(cache, batch_size=args.batch_size, num_workers=args.num_workers, val_fraction=0.0,
                           on_device={"device": True, "loader": False}[args.data])
    module = _module(args, config)
    timer = _StepTimer(args.warmup)
    precision = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[args.dtype]
    trainer = L.Trainer(
        accelerator=device.type, devices=1, max_steps=args.warmup + args.steps, precision=precision,
        gradient_clip_val=1.0, callbacks=[ema_callback(), timer], logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, limit_val_batches=0, log_every_n_steps=50,
    )
    trainer.fit(module, datamodule=data)
    return timer.seconds_per_step(device), timer.losses, module, data.train_batches()


def run_loop(args, config: dict, device: torch.device) -> tuple[float, list, MaskGITModule]:
    """Steps in a plain loop on the device; (s/step, losses, module)."""
    module = _module(args, config).to(device).train()
    optimizer = module.configure_optimizers()["optimizer"]
    # fp16 autocast needs loss scaling, as Lightning's "16-mixed"; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")
    if args.data == "device":
        cache = RandomCache(max(args.cache_size, args.batch_size), config["num_tokens"], config["codebook_size"],
                            config["num_classes"])
        loader = DeviceTokenLoader(cache.tokens, cache.labels, torch.arange(len(cache)), batch_size=args.batch_size,
                                   device=device, sampler=EpochOrder(len(cache), seed=0, shuffle=True), drop_last=True)
        batches = iter(loader)
    else:
        fixed = (torch.randint(0, config["codebook_size"], (args.batch_size, config["num_tokens"]), device=device),
                 torch.randint(0, config["num_classes"], (args.batch_size,), device=device))
    losses = []

    def step():
        nonlocal batches
        if args.data == "device":
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
        else:
            batch = fixed
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, args.dtype):
            loss, _ = module._step(batch, train=True)  # exactly the training loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.detach())

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time_call(step, device=device, warmup=0, iters=args.steps)
    return t, losses, module


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator-spec", default="maskgit_l32", help=f"generator spec ({', '.join(PRESETS)}, or a config file)")
    renamed_flags(p, {"--preset": "--generator-spec"})
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, autotuning, compilation)")
    p.add_argument("--compile", action="store_true", help="torch.compile the generator and the loss")
    p.add_argument("--fused", default="auto", choices=["auto", "yes", "no"], help="fused AdamW (auto: on CUDA)")
    p.add_argument("--trainer", action="store_true", help="run the steps inside Lightning's Trainer.fit")
    p.add_argument("--data", default="device", choices=["device", "loader", "fixed"],
                   help="device: batches gathered from a cache on the device; loader: a DataLoader (--trainer); "
                        "fixed: one batch over and over (no --trainer)")
    p.add_argument("--cache-size", type=int, default=IMAGENET_SEQUENCES, help="sequences in the random cache")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader workers for --data loader")
    p.add_argument("--probe", default="auto", choices=["auto", "yes", "no"],
                   help="probe the largest batch that fits (auto: on CUDA)")
    p.add_argument("--max-batch", type=int, default=16384, help="probe no further than this batch size")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.cache_size < 1:
        p.error("--steps, --batch-size and --cache-size must be >= 1, --warmup >= 0")
    if args.trainer and args.data == "fixed" or not args.trainer and args.data == "loader":
        p.error("--data fixed goes without --trainer, --data loader with it")

    device = pick_device(args.device)
    torch.manual_seed(0)
    config = model_config(args.generator_spec)
    if args.trainer:
        t_step, losses, module, batches_per_epoch = run_trainer(args, config, device)
    else:
        t_step, losses, module = run_loop(args, config, device)
        batches_per_epoch = None
    params_m = round(sum(p.numel() for p in module.model.parameters()) / 1e6, 2)
    peak = peak_memory_mb(device)
    probe = args.probe == "yes" or (args.probe == "auto" and device.type == "cuda")
    sizes = {"largest_batch": None, "largest_batch_limited": False}
    if probe:
        del module
        # Eager steps (a compiled step would recompile for every size); compiled ones need less memory.
        probe_args = argparse.Namespace(**{**vars(args), "warmup": 1, "steps": 1, "data": "fixed", "compile": False})
        sizes = largest_batch(
            lambda b: run_loop(argparse.Namespace(**{**vars(probe_args), "batch_size": b}), config, device),
            start=args.batch_size, limit=args.max_batch, device=device,
        )
    result = {
        "benchmark": "generator_training", "generator": args.generator_spec, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": args.dtype, "batch_size": args.batch_size, "compile": args.compile,
        "fused_adamw": args.fused, "trainer": args.trainer, "data": args.data,
        "cache_sequences": args.cache_size if args.data != "fixed" else None, "batches_per_epoch": batches_per_epoch,
        "num_tokens": config["num_tokens"], "params_m": params_m,
        "steps": args.steps, "warmup": args.warmup,
        "steps_per_s": round(1 / t_step, 3),
        "samples_per_s": round(args.batch_size / t_step, 2),
        "tokens_per_s": round(args.batch_size * config["num_tokens"] / t_step, 1),
        "last_loss": round(float(losses[-1]), 4),
        "peak_memory_mb": round(peak, 1),
        **sizes,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
