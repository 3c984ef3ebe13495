"""A tiny training job built as the training entry points build theirs (titok_core.trainer.build_trainer,
last.ckpt written by PeriodicLast / SaveLast, resumed from it), run through titok_core.stopping, with
the step progress bar and the library filters: what the stop, screen and noise tests drive.

    python tests/tiny_fit.py --run-dir DIR [--max-steps N] [--step-seconds S] [--devices 2] [--noise]

Prints ``done step N`` after every optimizer step, ``resuming from step K`` when it resumes and
``trained N steps`` at the end (stdout); the progress bar goes to stderr.
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class _Marker(Callback):
    """A callback the module also returns from configure_callbacks (Lightning then says it overrides)."""


class StepPrinter(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            print(f"done step {trainer.global_step}", flush=True)


class Tiny(L.LightningModule):
    def __init__(self, step_seconds: float, noise: bool):
        super().__init__()
        self.net = nn.Linear(8, 1)
        self.step_seconds, self.noise = step_seconds, noise

    def training_step(self, batch, batch_idx):
        x, y = batch
        time.sleep(self.step_seconds)
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def configure_callbacks(self):
        return [_Marker()] if self.noise else []

    def on_train_start(self):
        if self.noise:
            warnings.warn("a real warning from the job", UserWarning)


def run(args) -> int:
    from titok_core.progress import StepProgressBar
    from titok_core.stopping_lightning import fit
    from titok_core.trainer import PeriodicLast, SaveLast, build_trainer

    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    data = TensorDataset(x, x.sum(1, keepdim=True))
    run_dir = Path(args.run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    callbacks = [PeriodicLast(last.parent, every_n_train_steps=args.every), SaveLast(last), StepPrinter(),
                 StepProgressBar()]
    if args.noise:
        callbacks.append(_Marker())
    trainer_cfg = {"max_steps": args.max_steps, "max_time": args.max_time, "accelerator": "cpu",
                   "devices": args.devices, "precision": "32-true", "log_every_n_steps": 50,
                   "num_sanity_val_steps": 0}
    if args.devices > 1:
        trainer_cfg["strategy"] = "ddp"
    fixed = {"val_check_interval": 1, "limit_val_batches": 1} if args.noise else {"limit_val_batches": 0}
    trainer = build_trainer(trainer=trainer_cfg, run_dir=run_dir, batch_size=4, callbacks=callbacks, logger="csv",
                            name="tiny", **fixed)
    module = Tiny(args.step_seconds, args.noise)
    resume = str(last) if last.is_file() else None
    if resume and trainer.is_global_zero:
        step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
        print(f"resuming from step {step}", flush=True)
    fit(trainer, module, train_dataloaders=DataLoader(data, batch_size=4, shuffle=True),
        val_dataloaders=DataLoader(data, batch_size=4), ckpt_path=resume, weights_only=True, last=last)
    if trainer.is_global_zero:
        print(f"trained {trainer.global_step} steps", flush=True)
    return 0


def main(argv: list[str] | None = None) -> None:
    from titok_core.quiet import quiet_libraries
    from titok_core.stopping import stop_cleanly

    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--max-time", default=None)
    parser.add_argument("--step-seconds", type=float, default=0.0)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--noise", action="store_true", help="set up every library message the filters drop")
    parser.add_argument("--no-quiet", action="store_true", help="leave the library messages on")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not args.no_quiet:
        quiet_libraries()
    with stop_cleanly():
        run(args)


if __name__ == "__main__":
    main()
