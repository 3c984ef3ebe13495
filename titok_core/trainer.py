"""Lightning helpers shared by tokenizer and generator training: weight decay groups, EMA, last.ckpt."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from torch import nn


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
    """ema <- decay * ema + (1 - decay) * model, with :func:`ema_decay` of ``step``."""
    decay = ema_decay(step, max_decay)
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def ema_callback(max_decay: float = 0.999) -> WeightAveraging:
    """Lightning's WeightAveraging as an EMA with :func:`ema_decay`."""

    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        decay = ema_decay(num_averaged, max_decay).to(averaged.device)
        return averaged * decay + current * (1 - decay)

    return WeightAveraging(avg_fn=avg_fn)


class SaveLast(Callback):
    """Write last.ckpt when training ends (max_steps or max_time), before any weight averaging is
    copied into the model, so a rerun with a larger budget resumes exactly."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        # The full state (optimiser, loops, callbacks), not only the weights: a rerun resumes from it.
        trainer.save_checkpoint(self.path, weights_only=False)
