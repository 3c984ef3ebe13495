"""Learning-rate schedule shared by tokenizer and generator training: warm-up, cosine, time budget.

A run bounded by ``trainer.max_time`` does not know in advance how many steps it will make, so a
cosine over ``max_steps`` would stop half-way, at a high learning rate. :class:`FitScheduleToTime`
measures the step rate early in the run and sets the cosine's horizon to the steps that fit in
the time left, so a 5-minute run anneals fully, on a fast machine or a slow one.
"""
from __future__ import annotations

import logging
import math
import time

from lightning.pytorch.callbacks import Callback, Timer

from titok_core.errors import UsageError

log = logging.getLogger(__name__)


def warmup_cosine(step: int, *, warmup_steps: int, max_steps: int, base_lr: float, end_lr: float) -> float:
    """Learning rate at ``step``: linear warm-up to base_lr, then cosine down to end_lr."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return end_lr + 0.5 * (base_lr - end_lr) * (1 + math.cos(math.pi * progress))


def parse_max_time(value: str | None) -> float | None:
    """Lightning's ``max_time`` string "DD:HH:MM:SS" -> seconds (None stays None)."""
    if value is None:
        return None
    parts = str(value).strip().split(":")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):  # Lightning's Timer reads whole numbers
        raise UsageError(f"trainer.max_time={value}: write days:hours:minutes:seconds, e.g. "
                         "trainer.max_time=00:00:05:00 for five minutes")
    days, hours, minutes, seconds = (int(p) for p in parts)
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


class FitScheduleToTime(Callback):
    """Set ``pl_module.hparams.max_steps`` (the cosine's horizon) to the steps that fit in max_time.

    After ``skip`` steps (start-up, first validation) it times ``measure`` steps and sets the
    horizon to ``step + rate * time_left * margin``, capped by the trainer's max_steps; then it
    measures again every ``measure`` steps while more than a tenth of the budget is left, so a
    machine that gets faster or slower (other jobs starting or ending) moves the horizon with it.
    The horizon never drops below the current step. A resumed run measures again over what is left.
    """

    def __init__(self, *, max_time_s: float, skip: int = 10, measure: int = 40, margin: float = 0.95):
        self.max_time_s, self.skip, self.measure, self.margin = max_time_s, skip, measure, margin
        self.horizon: int | None = None
        self._start_step = 0
        self._t0: float | None = None

    def on_train_start(self, trainer, pl_module):
        self._start_step, self._t0 = trainer.global_step, None
        if self.horizon is not None:  # resumed: keep the last estimate until the new one
            pl_module.hparams.max_steps = self.horizon

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        done = trainer.global_step - self._start_step
        if done == self.skip:
            self._t0 = time.perf_counter()
        elif done > self.skip and (done - self.skip) % self.measure == 0 and self._t0 is not None:
            now = time.perf_counter()
            rate = self.measure / (now - self._t0)
            self._t0 = now
            timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
            elapsed = timer.time_elapsed("train") if timer is not None else 0.0
            left = max(0.0, self.max_time_s - elapsed)
            if self.horizon is not None and left < 0.1 * self.max_time_s:
                return  # late in the run: keep the schedule steady
            horizon = trainer.global_step + int(rate * left * self.margin)
            self.horizon = max(trainer.global_step, min(horizon, trainer.max_steps))
            pl_module.hparams.max_steps = self.horizon
            log.info("time budget: %.2f steps/s, %.0f s left -> cosine over %d steps", rate, left, self.horizon)

    def state_dict(self) -> dict:
        return {"horizon": self.horizon}

    def load_state_dict(self, state_dict: dict) -> None:
        self.horizon = state_dict.get("horizon")


def schedule_callbacks(*, max_time: str | None, schedule_steps) -> list[Callback]:
    """``[FitScheduleToTime]`` when ``schedule_steps`` is "auto" and max_time is set, else ``[]``
    (``schedule_steps`` "max_steps": the cosine runs over trainer.max_steps)."""
    if schedule_steps not in ("auto", "max_steps"):
        raise UsageError(f"trainer.schedule_steps must be auto or max_steps, got {schedule_steps!r}")
    seconds = parse_max_time(max_time)
    if schedule_steps == "auto" and seconds is not None:
        return [FitScheduleToTime(max_time_s=seconds)]
    return []
