"""The training half of :mod:`titok_core.stopping`: Lightning's loop stops after the optimizer step in
which Ctrl-C or SIGTERM came, with ``last.ckpt`` saved at that step (that module's docstring says
why, and how the ranks agree). Apart, so that the jobs that do not train start without Lightning."""
from __future__ import annotations

import logging
import os
import re
import signal
import threading
from pathlib import Path

from lightning.pytorch.callbacks import Checkpoint

from titok_core.stopping import (
    _install,
    _on_signal,
    _state,
    _stop_now,
    forward_signals,
    is_termination,
    stop_asked,
    stop_forwarding,
)

log = logging.getLogger(__name__)


class _Replaced(logging.Filter):
    """Lightning's lines about the stop, which the job's own line replaces."""

    PATTERN = re.compile(r"^\s*Detected KeyboardInterrupt, attempting graceful shutdown|^(\[rank: \d+\] )?Received SIGTERM")

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.PATTERN.search(record.getMessage())


_REPLACED = _Replaced()
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
              "lightning.pytorch.trainer.connectors.signal_connector"):
    logging.getLogger(_name).addFilter(_REPLACED)


class StopOnSignal(Checkpoint):
    """Stop training after the optimizer step in which Ctrl-C or SIGTERM came, with ``last`` saved at that step.

    A Checkpoint callback, so Lightning runs it after every other callback's ``on_train_batch_end``
    (EMA updates and the like), as it runs ModelCheckpoint: the saved step is whole. Also records a
    Ctrl-C that stopped training at once (``interrupted``), which Lightning turns into ``sys.exit(1)``.
    """

    def __init__(self, last: str | os.PathLike):
        super().__init__()
        self.last = Path(last)
        self.interrupted = False
        self._step = 0
        self._deferring = False
        self._kill = None

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning has installed its SIGTERM handler by now (the signal connector, just before the
        # loops run; its teardown puts back the handlers it found). From here a signal only marks
        # the stop as asked, and the end of the step acts on it.
        self._step = trainer.global_step
        _state["deferred"] += 1
        self._deferring = True
        _install()
        launcher = trainer.strategy.launcher
        if launcher is not None and trainer.is_global_zero:  # as Lightning's own handler does
            self._kill = forward_signals(launcher.kill)

    def _stop_deferring(self) -> None:
        if self._deferring:
            _state["deferred"] -= 1
            self._deferring = False
        if self._kill is not None:
            stop_forwarding(self._kill)
            self._kill = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:
            return  # between the batches of one accumulated step: no optimizer step yet
        self._step = trainer.global_step
        asked = stop_asked() or trainer.received_sigterm
        if not trainer.strategy.reduce_boolean_decision(asked, all=False):  # any rank asked: all stop here
            return
        trainer.save_checkpoint(self.last, weights_only=False)
        if trainer.is_global_zero:
            log.info("stopped after step %d; %s holds it", trainer.global_step, self.last)
        raise _stop_now(_state["asked"] or signal.SIGTERM)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.interrupted = True
        self._stop_deferring()

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop_deferring()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._stop_deferring()


def fit(trainer, model, *, last: str | os.PathLike, **fit_kwargs) -> None:
    """``trainer.fit(model, **fit_kwargs)`` that stops as this module says.

    last: the checkpoint a stop writes (the run's ``checkpoints/last.ckpt``; a rerun resumes from
    it). Raises KeyboardInterrupt after a Ctrl-C (instead of Lightning's ``sys.exit(1)``) and
    :class:`Terminated` after a SIGTERM, once the checkpoint is written; :func:`stop_cleanly` turns
    them into the one line and the exit code.
    """
    if _state["owner"] != os.getpid() or not _state["deferred"]:
        # A stop asked before this point has already stopped the job, or was not ours.
        _state["asked"], _state["stopping"] = None, False
    callback = next((c for c in trainer.callbacks if isinstance(c, StopOnSignal)), None)
    if callback is None:
        callback = StopOnSignal(last)
        trainer.callbacks.append(callback)
    try:
        trainer.fit(model, **fit_kwargs)
    except SystemExit as exc:
        if callback.interrupted and not is_termination(exc):
            # Lightning set Ctrl-C to "ignore" for its shutdown; the next one must work again.
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, _on_signal if _state["owner"] == os.getpid() else signal.default_int_handler)
            raise KeyboardInterrupt from None
        raise
    if stop_asked():  # asked after the last step's check: training ended and saved its last.ckpt
        raise _stop_now(_state["asked"])
