"""How a long job stops when it is asked to: Ctrl-C and SIGTERM.

* **Ctrl-C** (SIGINT) stops at once: the job prints one line and exits 130. What it saved last
  (a periodic checkpoint, finished cache shards, the evaluation's state) is where a rerun continues.
* **SIGTERM** (``kill``, ``timeout``, job schedulers; SLURM before the time limit with
  ``#SBATCH --signal=TERM@120``) stops at the next point where the job's state is whole: training
  finishes the optimizer step, writes ``last.ckpt`` of that step (atomically, through the Trainer's
  checkpoint writer) and exits 143; an evaluation saves its state after the batch in hand; a token
  cache keeps its finished shards. The same command resumes from there.

An entry point runs its work inside :func:`stop_cleanly` (the one line and the exit code);
training calls :func:`fit` instead of ``trainer.fit``::

    with stop_cleanly():                                  # in the entry point
        ...
        fit(trainer, module, datamodule=dm, ckpt_path=resume, weights_only=True, last=ckpt_dir / "last.ckpt")

Lightning's own handling does not give this: on Ctrl-C it calls ``sys.exit(1)`` itself
(``lightning.pytorch.trainer.call._call_and_handle_interrupt``), and on SIGTERM its loops raise
``SIGTERMException`` (a SystemExit with no code: exit 0) with nothing saved. Its loops also raise it
at points that differ between ranks (the end of a step on the rank that got the signal,
mid-validation), where the other ranks may be waiting in a collective. So while training runs,
SIGTERM only marks the stop as asked (:class:`StopOnSignal` takes over the handler Lightning
installed), and at every optimizer step all ranks agree through ``reduce_boolean_decision`` whether
any of them was asked: every rank stops after the same step, saves together, and raises
:class:`Terminated` (Lightning's ``SIGTERMException`` with exit code 143) together.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

RESUME_HINT = "interrupted: run the same command to resume"
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports a job ended by Ctrl-C
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143


class Terminated(SIGTERMException):
    """SIGTERM asked the job to stop; its state up to here is saved. Exits 143 when nothing catches it."""

    def __init__(self) -> None:
        super().__init__(EXIT_TERMINATED)


# The SIGTERM handler's state, per process (a forked child inherits the handler, but is not the job).
_state = {"owner": None, "asked": False, "deferred": 0}
_forward: list[Callable[[int], None]] = []


def _on_sigterm(signum, frame) -> None:
    if os.getpid() != _state["owner"]:
        return  # a forked child (a multiprocessing worker): the process that started it stops it
    first = not _state["asked"]
    _state["asked"] = True
    if first:
        for kill in list(_forward):  # processes this one launched (the other ranks of a Lightning launch)
            with contextlib.suppress(OSError):
                kill(signum)
    if first and not _state["deferred"]:
        raise Terminated()


def _install() -> None:
    """Make :func:`_on_sigterm` this process's SIGTERM handler (from the main thread only, as signal allows)."""
    if threading.current_thread() is threading.main_thread():
        _state["owner"] = os.getpid()
        signal.signal(signal.SIGTERM, _on_sigterm)


def ignore_sigterm(worker_id: int | None = None) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGTERM; its main process stops (at a safe
    point) and shuts its workers down. PyTorch's workers otherwise die of a SIGTERM that does not come
    from their parent, as when a scheduler signals every process of the job, and the main process
    then fails with "DataLoader worker ... is killed by signal: Terminated"."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_asked() -> bool:
    """True once SIGTERM has reached this process (inside :func:`stop_cleanly` or a :func:`fit`)."""
    return _state["asked"] and _state["owner"] == os.getpid()


@contextlib.contextmanager
def at_safe_points() -> Iterator[None]:
    """Inside, SIGTERM only marks the stop as asked; the code calls :func:`stop_point` where its state is whole."""
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1


def stop_point(save: Callable[[], None] | None = None) -> None:
    """Where the state is whole: when SIGTERM has come, ``save()`` it and raise :class:`Terminated`."""
    if stop_asked():
        if save is not None:
            save()
        raise Terminated()


def forward_signals(kill: Callable[[int], None]) -> Callable[[int], None]:
    """SIGTERM reaching this process is passed on with ``kill(signum)``, e.g. to the other ranks a
    Lightning launcher started as subprocesses of this one. Returns ``kill`` (for :func:`stop_forwarding`)."""
    _forward.append(kill)
    return kill


def stop_forwarding(kill: Callable[[int], None]) -> None:
    if kill in _forward:
        _forward.remove(kill)


def _say(message: str) -> None:
    """The one line, from the first process only (every rank of a multi-process job stops the same way)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_cleanly(message: str = RESUME_HINT) -> Iterator[None]:
    """Run an entry point's work: Ctrl-C -> ``message`` on stderr, exit 130; SIGTERM -> ``message``, exit 143.

    Installs the SIGTERM handler for the block (SIGTERM raises :class:`Terminated` where the code is,
    except inside :func:`at_safe_points`) and restores the previous one after it.
    """
    previous = signal.getsignal(signal.SIGTERM)
    _state["asked"] = False
    _install()
    try:
        yield
    except KeyboardInterrupt:
        _say(message)
        sys.exit(EXIT_INTERRUPTED)
    except SIGTERMException:  # ours, or Lightning's own (a SIGTERM before training started)
        _say(message)
        sys.exit(EXIT_TERMINATED)
    finally:
        if threading.current_thread() is threading.main_thread() and previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _forward.clear()


# ----------------------------------------------------------------------------------------- training


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
    """Stop training after the optimizer step in which SIGTERM came, with ``last`` saved at that step.

    A Checkpoint callback, so Lightning runs it after every other callback's ``on_train_batch_end``
    (EMA updates and the like), as it runs ModelCheckpoint: the saved step is whole. Also records a
    Ctrl-C (``interrupted``), which Lightning turns into ``sys.exit(1)``.
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
        # loops run); from here SIGTERM only marks the stop as asked, and the step's end acts on it.
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
        raise Terminated()

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

    last: the checkpoint a SIGTERM writes (the run's ``checkpoints/last.ckpt``; a rerun resumes from
    it). Raises KeyboardInterrupt after a Ctrl-C (instead of Lightning's ``sys.exit(1)``) and
    :class:`Terminated` after a SIGTERM, once the checkpoint is written; :func:`stop_cleanly` turns
    them into the one line and the exit code.
    """
    if _state["owner"] != os.getpid() or not _state["deferred"]:
        _state["asked"] = False  # a SIGTERM before this point has already stopped the job, or was not ours
    callback = next((c for c in trainer.callbacks if isinstance(c, StopOnSignal)), None)
    if callback is None:
        callback = StopOnSignal(last)
        trainer.callbacks.append(callback)
    try:
        trainer.fit(model, **fit_kwargs)
    except SystemExit as exc:
        if callback.interrupted and not isinstance(exc, SIGTERMException):
            # Lightning set SIGINT to "ignore" for its shutdown; a later Ctrl-C must work again.
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt from None
        raise
    if stop_asked():  # SIGTERM after the last step's check: training ended and saved its last.ckpt
        raise Terminated()
