"""Lightning helpers shared by tokenizer and generator training: the Trainer, loggers, weight decay
groups, EMA and last.ckpt."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar, WeightAveraging
from torch import nn

from titok_core.errors import UsageError

log = logging.getLogger(__name__)


def param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]], *, weight_decay: float, no_decay_keys: tuple[str, ...],
) -> list[dict]:
    """AdamW groups: vectors (ndim < 2) and parameters whose name holds one of ``no_decay_keys``
    get no weight decay, the rest ``weight_decay``. Frozen parameters are left out."""
    named = [(n, p) for n, p in named_parameters if p.requires_grad]

    def exempt(name: str, param: nn.Parameter) -> bool:
        return param.ndim < 2 or any(key in name for key in no_decay_keys)

    return [
        {"params": [p for n, p in named if exempt(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exempt(n, p)], "weight_decay": weight_decay},
    ]


def ema_decay(num_updates, max_decay: float):
    """The EMA decay after ``num_updates`` updates: min((1 + n) / (10 + n), max_decay).

    ``num_updates`` an int (returns a float) or a tensor (returns a float32 tensor)."""
    if isinstance(num_updates, torch.Tensor):
        n = num_updates.float()
        return torch.clamp((1 + n) / (10 + n), max=max_decay)
    return min((1 + num_updates) / (10 + num_updates), max_decay)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, *, step: int, max_decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, with :func:`ema_decay` of ``step`` (one foreach call)."""
    decay = ema_decay(step, max_decay)
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)


def ema_callback(max_decay: float = 0.999) -> WeightAveraging:
    """Lightning's WeightAveraging as an EMA with :func:`ema_decay`.

    The update is one foreach call over all the weights of a device and dtype (``multi_avg_fn``), not a
    Python loop over the parameters: for a small network that loop cost more than the optimiser's step.
    The decay stays a tensor on the device, so the update never waits for the device."""

    def multi_avg_fn(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():  # integer buffers (counters) are taken as they are
            torch._foreach_copy_(averaged, current)
            return
        decay = ema_decay(num_averaged, max_decay).to(averaged[0])  # 0-dim, on the weights' device and dtype
        torch._foreach_mul_(averaged, decay)
        torch._foreach_add_(averaged, torch._foreach_mul(current, 1 - decay))

    return WeightAveraging(multi_avg_fn=multi_avg_fn)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with local checkpoints whole or absent.

    Lightning's own writer (``_atomic_save``) goes through an fsspec transaction that writes to a
    file in the system temp folder and ``shutil.move``s it into place: when that folder is on another
    file system than the run, the move copies into the final path (a kill mid-copy leaves a truncated
    last.ckpt), nothing is fsynced, and a kill leaves the temp file behind. Here the checkpoint is
    written to a temp file beside its path, fsynced, and ``os.replace``d over it: a failure or a kill
    at any point leaves the previous file intact. Remote paths (``s3://`` ...) go to Lightning's writer.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if storage_options is not None or "://" in os.fspath(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed write; never read
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        try:  # the rename itself survives a power cut once the folder is synced
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass


class PeriodicLast(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` steps, overwritten in place (no last-v1.ckpt).

    The final last.ckpt is :class:`SaveLast`'s: Lightning runs checkpoint callbacks after every other
    callback, so a save here at the end of training would come after weight averaging has copied
    the EMA into the model, and a resumed run would continue from the averaged weights.
    """

    def __init__(self, dirpath: Path, *, every_n_train_steps: int):
        super().__init__(dirpath=dirpath, save_last=True, every_n_train_steps=every_n_train_steps, save_top_k=0,
                         enable_version_counter=False)

    def on_train_end(self, trainer, pl_module):
        pass


class SaveLast(Callback):
    """Write last.ckpt when training ends (max_steps or max_time), before any weight averaging is
    copied into the model, so a rerun with a larger budget resumes exactly."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        # The full state (optimiser, loops, callbacks), not only the weights: a rerun resumes from it.
        trainer.save_checkpoint(self.path, weights_only=False)


# Keys of a ``trainer`` config group that are ours, not Lightning Trainer arguments.
OWN_TRAINER_KEYS = ("schedule_steps", "global_batch")
LOGGERS = ("csv", "tensorboard", "wandb")


def make_loggers(names, run_dir: Path, *, name: str) -> list:
    """Lightning loggers by name: ``csv`` (run_dir/logs/version_N/metrics.csv), ``tensorboard``
    (run_dir/tensorboard) and ``wandb`` (run_dir/wandb; offline unless WANDB_MODE says otherwise).
    ``names``: one name, a list of them, or null/[] for none."""
    import os

    if names is None:
        return []
    names = [names] if isinstance(names, str) else list(names)
    loggers = []
    for logger in names:
        if logger == "csv":
            from lightning.pytorch.loggers import CSVLogger

            loggers.append(CSVLogger(run_dir, name="logs"))
        elif logger == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(run_dir, name="tensorboard"))
        elif logger == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            os.environ.setdefault("WANDB_MODE", "offline")  # nothing leaves the machine unless asked
            loggers.append(WandbLogger(name=name, save_dir=str(run_dir), project="titok-gen"))
        else:
            raise UsageError(f"logger must be one or a list of {', '.join(LOGGERS)}, got {logger!r}")
    return loggers


def accumulation_for(*, global_batch: int, batch_size: int, world_size: int) -> int:
    """Gradient accumulation that makes ``batch_size`` x ``world_size`` x it equal ``global_batch``;
    ValueError (one line) when it does not divide."""
    per_step = batch_size * world_size
    if global_batch % per_step:
        raise UsageError(
            f"trainer.global_batch={global_batch} is not a multiple of batch_size x devices x nodes = "
            f"{batch_size} x {world_size} = {per_step}"
        )
    return global_batch // per_step


def build_trainer(
    *, trainer: dict, run_dir: Path, batch_size: int, callbacks: list, logger, name: str, **fixed,
):
    """The Lightning Trainer of both training entry points.

    trainer: the ``trainer`` config group, handed over whole: every key is a Trainer argument
    except ``schedule_steps`` (auto: with max_time, the cosine is fitted to the steps that fit;
    see :mod:`titok_core.lr_schedule`) and ``global_batch`` (null, or the batch the recipe needs:
    sets accumulate_grad_batches from batch_size x devices x nodes). ``precision: auto`` is
    resolved by :func:`titok_core.runtime.resolve_precision`. fixed: arguments the entry point
    sets itself (validation cadence and the like). The global batch is logged once.
    """
    import lightning as L

    from titok_core.lr_schedule import schedule_callbacks
    from titok_core.runtime import resolve_precision

    kwargs = {k: v for k, v in dict(trainer).items() if k not in OWN_TRAINER_KEYS}
    kwargs["precision"] = resolve_precision(kwargs.get("precision", "auto"))
    callbacks = [*callbacks, *schedule_callbacks(max_time=kwargs.get("max_time"),
                                                 schedule_steps=trainer.get("schedule_steps", "max_steps"))]
    kwargs.update(fixed)  # the entry point's own values win (e.g. no validation when there is no val split)
    if kwargs.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        from titok_core.progress import StepProgressBar

        callbacks.append(StepProgressBar())  # step n/total, time left, the loss (Lightning's counts epochs)
    plugins = kwargs.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):  # checkpoints are whole or absent after a kill
        kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
    built = L.Trainer(default_root_dir=run_dir, callbacks=callbacks, logger=make_loggers(logger, run_dir, name=name),
                      enable_model_summary=False, **kwargs)
    global_batch = trainer.get("global_batch")
    if global_batch:
        built.accumulate_grad_batches = accumulation_for(
            global_batch=int(global_batch), batch_size=batch_size, world_size=built.world_size)
    if built.is_global_zero:
        log.info("global batch %d = %d per device x %d device(s) x %d node(s) x %d accumulation",
                 batch_size * built.world_size * built.accumulate_grad_batches, batch_size,
                 built.num_devices, built.num_nodes, built.accumulate_grad_batches)
    return built
