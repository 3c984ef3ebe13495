"""The training screen of a step-based run: ``step 1200/4000 |###   | 02:13<05:10, 8.97 step/s, loss=3.588``.

Lightning's bars count batches per epoch (``Epoch 9/-2``), which says nothing in a run bounded by
``max_steps`` or ``max_time``. :class:`StepProgressBar` counts optimizer steps over the whole run
(resumed runs start at their step) towards its end: ``trainer.max_steps``, or with
``trainer.max_time`` the steps that fit in the time left, as :class:`titok_core.lr_schedule.FitScheduleToTime`
measures them (before its first measure, or without it, from the bar's own rate and Lightning's
Timer). tqdm supplies the rate and the time left; the postfix holds the logged losses.
"""
from __future__ import annotations

import sys

from lightning.pytorch.callbacks import Timer, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class StepProgressBar(TQDMProgressBar):
    """A TQDMProgressBar whose training bar counts optimizer steps to the run's end, on stderr.

    refresh_rate: redraw every that many optimizer steps (tqdm also waits 0.1 s between redraws).
    Validation bars are Lightning's, on stderr, and vanish when done.
    """

    BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar:20}| {elapsed}<{remaining}, {rate_fmt}{postfix}"

    def __init__(self, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate, leave=False)
        self._step = 0

    def init_train_tqdm(self, *, total: int | None = None, initial: int = 0) -> Tqdm:
        return Tqdm(desc="step", unit=" step", total=total, initial=initial, position=2 * self.process_position,
                    disable=self.is_disabled, leave=True, dynamic_ncols=True, file=sys.stderr, smoothing=0.1,
                    bar_format=self.BAR_FORMAT)

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(desc=self.validation_description, position=2 * self.process_position + 1,
                    disable=self.is_disabled, leave=False, dynamic_ncols=True, file=sys.stderr)

    def init_sanity_tqdm(self) -> Tqdm:
        return Tqdm(desc=self.sanity_check_description, position=2 * self.process_position,
                    disable=self.is_disabled, leave=False, dynamic_ncols=True, file=sys.stderr)

    @staticmethod
    def total_steps(trainer, rate: float | None = None) -> int | None:
        """Where the run ends: the steps that fit the time budget when max_time is set (the schedule's
        measure, else ``rate`` steps/s over the time left), else max_steps; None when unknown."""
        from titok_core.lr_schedule import FitScheduleToTime

        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        left = timer.time_remaining("train") if timer is not None else None
        if left is None:
            return max_steps
        fitted = next((c.horizon for c in trainer.callbacks if isinstance(c, FitScheduleToTime) and c.horizon), None)
        if fitted is not None:
            return fitted
        if not rate:
            return None
        estimate = trainer.global_step + int(rate * left)
        return min(estimate, max_steps) if max_steps else estimate

    def on_train_start(self, trainer, pl_module) -> None:
        # A resumed run starts at its step; tqdm's rate counts the steps of this launch only.
        self.train_progress_bar = self.init_train_tqdm(total=self.total_steps(trainer), initial=trainer.global_step)
        self._step = trainer.global_step

    def on_train_epoch_start(self, trainer, *_) -> None:
        pass  # one bar for the whole run

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable or trainer.global_step == self._step:
            return  # disabled, or between the batches of one accumulated step
        done = trainer.global_step - self._step
        self._step = trainer.global_step
        rate = bar.format_dict.get("rate")
        bar.total = self.total_steps(trainer, rate) or bar.total
        if bar.total is not None and bar.total < trainer.global_step:
            bar.total = trainer.global_step
        bar.set_postfix(self.losses(trainer), refresh=False)
        if self._should_update(trainer.global_step, bar.total):
            bar.update(done)
        else:
            bar.n += done

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass

    def on_train_end(self, trainer, pl_module) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable:
            bar.set_postfix(self.losses(trainer), refresh=False)
        bar.close()  # draws the last state once more, and keeps it on the screen

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Leave the bars where they are, each on its own line, before the job prints why it stopped.
        for bar in (self._train_progress_bar, self._val_progress_bar):
            if bar is not None and not bar.disable:
                bar.close()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.val_progress_bar.close()
        self.reset_dataloader_idx_tracker()

    @staticmethod
    def losses(trainer) -> dict[str, str]:
        """The losses on the progress bar (metrics logged with ``prog_bar=True`` whose name ends in "loss")."""
        out = {}
        for name, value in trainer.progress_bar_metrics.items():
            if name.rsplit("/", 1)[-1].endswith("loss"):
                out[name.rsplit("/", 1)[-1] if name.startswith("train/") else name] = f"{float(value):.4g}"
        return out
