"""How a long job stops when it is asked to: Ctrl-C and SIGTERM.

Both stop at the next point where the job's state is whole, save it there, print one line and exit:
training finishes the optimizer step and writes ``last.ckpt`` of that step (atomically, through the
Trainer's checkpoint writer); an evaluation saves its state after the batch in hand; a token cache
finishes the shard in hand. The same command resumes from there.

* **Ctrl-C** (SIGINT): exit 130. A second Ctrl-C stops at once; the run then resumes from what it
  saved last (a periodic checkpoint, the finished shards, the evaluation's last saved state).
* **SIGTERM** (``kill``, ``timeout``, job schedulers; SLURM before the time limit with
  ``#SBATCH --signal=TERM@120``): exit 143.

Outside such a loop (loading models, building a dataset) both stop at once. Every entry point runs
its work inside :func:`stop_cleanly` (the handlers, the one line, the exit code;
``titok_core.cli.hydra_entry`` does it); a loop marks its safe points with :func:`at_safe_points` /
:func:`stop_point`; training calls :func:`titok_core.stopping_lightning.fit` instead of
``trainer.fit`` (``titok_core.training`` does it)::

    with stop_cleanly():                                  # in the entry point
        ...
        fit(trainer, module, datamodule=dm, ckpt_path=resume, weights_only=True, last=ckpt_dir / "last.ckpt")

Lightning's own handling does not give this: on Ctrl-C it calls ``sys.exit(1)`` itself
(``lightning.pytorch.trainer.call._call_and_handle_interrupt``), and on SIGTERM its loops raise
``SIGTERMException`` (a SystemExit with no code: exit 0) with nothing saved. Its loops also raise it
at points that differ between ranks (the end of a step on the rank that got the signal,
mid-validation), where the other ranks may be waiting in a collective. So while training runs the
signals only mark the stop as asked (``stopping_lightning.StopOnSignal`` takes over the SIGTERM handler Lightning
installed), and at every optimizer step all ranks agree through ``reduce_boolean_decision`` whether
any of them was asked: every rank stops after the same step, saves together, and raises together.

Stopping between batches also keeps DataLoader workers out of it: they ignore both signals
(:func:`ignore_stop_signals`, their ``worker_init_fn``) and are shut down by their main process,
instead of dying mid-transfer (PyTorch's workers die of a SIGTERM that is not their parent's, as
when a scheduler signals every process of a job, and the main process then fails).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from titok_core.errors import RESUME_HINT

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports a job ended by Ctrl-C
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143
FINISHING = "stopping after the step in hand (Ctrl-C again stops at once)"


class Terminated(SystemExit):
    """SIGTERM asked the job to stop; its state up to here is saved. Exits 143 when nothing catches it.

    A SystemExit, as Lightning's own ``SIGTERMException`` (which this module leaves unimported: the jobs
    that do not train start without Lightning); :func:`is_termination` knows both."""

    def __init__(self) -> None:
        super().__init__(EXIT_TERMINATED)


def is_termination(exc: BaseException) -> bool:
    """Whether ``exc`` is a stop by SIGTERM: ours (:class:`Terminated`) or, where Lightning is loaded, its own."""
    lightning = sys.modules.get("lightning.pytorch.utilities.exceptions")
    return isinstance(exc, Terminated) or (lightning is not None and isinstance(exc, lightning.SIGTERMException))


# Per process: which signal asked the job to stop (None, SIGINT or SIGTERM), whether the stop is under
# way (raised: later signals are ignored, so none lands in the shutdown), whether the code is in a
# loop with safe points, and the process that installed the handlers (a forked child inherits them,
# but is not the job).
_state: dict = {"owner": None, "asked": None, "stopping": False, "deferred": 0}
_forward: list[Callable[[int], None]] = []


def _stop_now(signum: int) -> BaseException:
    """The exception that stops the job now (to be raised); from here on signals are ignored."""
    _state["stopping"] = True
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def _on_signal(signum, frame) -> None:
    if os.getpid() != _state["owner"]:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt  # a forked child keeps Python's own Ctrl-C
        return
    if _state["stopping"]:
        return
    if _state["asked"] is not None:
        if signum == signal.SIGINT:
            raise _stop_now(signum)  # the second Ctrl-C: at once
        return
    _state["asked"] = signum
    if signum == signal.SIGTERM:
        for kill in list(_forward):  # processes this one launched (the other ranks of a Lightning launch)
            with contextlib.suppress(OSError):
                kill(signum)
    if not _state["deferred"]:
        raise _stop_now(signum)
    if signum == signal.SIGINT:
        _say(FINISHING)


def _install() -> None:
    """Make :func:`_on_signal` this process's SIGINT and SIGTERM handler (the main thread only, as signal allows)."""
    if threading.current_thread() is threading.main_thread():
        _state["owner"] = os.getpid()
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores Ctrl-C and SIGTERM; its main process stops
    at a safe point and shuts its workers down (at the latest when it exits: :func:`_end_workers`)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _end_workers() -> None:
    """At exit, kill the daemonic children still alive (DataLoader workers left by an unfinished
    iterator). multiprocessing's own exit handler ends them with SIGTERM and waits for them, which
    workers that ignore SIGTERM would never answer. Registered after multiprocessing's handler, so it
    runs before it."""
    import multiprocessing

    children = [child for child in multiprocessing.active_children() if child.daemon]
    if children and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the killed workers
    for child in children:
        child.kill()


atexit.register(_end_workers)


def stop_asked() -> bool:
    """True once Ctrl-C or SIGTERM has asked this process to stop (under :func:`stop_cleanly` or :func:`fit`)."""
    return _state["asked"] is not None and _state["owner"] == os.getpid()


@contextlib.contextmanager
def at_safe_points() -> Iterator[None]:
    """Inside, Ctrl-C and SIGTERM only mark the stop as asked; the code calls :func:`stop_point` where
    its state is whole (a second Ctrl-C still stops at once)."""
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1


def stop_point(save: Callable[[], None] | None = None) -> None:
    """Where the state is whole: once a stop is asked, ``save()`` the state and raise
    KeyboardInterrupt (Ctrl-C) or :class:`Terminated` (SIGTERM)."""
    if stop_asked():
        if save is not None:
            save()
        raise _stop_now(_state["asked"])


def forward_signals(kill: Callable[[int], None]) -> Callable[[int], None]:
    """SIGTERM reaching this process is passed on with ``kill(signum)``, e.g. to the other ranks a
    Lightning launcher started as subprocesses of this one (Ctrl-C reaches them from the terminal).
    Returns ``kill`` (for :func:`stop_forwarding`)."""
    _forward.append(kill)
    return kill


def stop_forwarding(kill: Callable[[int], None]) -> None:
    if kill in _forward:
        _forward.remove(kill)


def _say(message: str) -> None:
    """A line on stderr from the first process only (every rank of a multi-process job stops the same way;
    a job of several processes runs under Lightning, which then knows this process's rank)."""
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")
    if getattr(getattr(rank_zero, "rank_zero_only", None), "rank", 0) == 0:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_cleanly(message: str = RESUME_HINT) -> Iterator[None]:
    """Run an entry point's work: Ctrl-C -> ``message`` on stderr, exit 130; SIGTERM -> ``message``, exit 143.

    Installs the handlers for the block (a stop raises where the code is, except inside
    :func:`at_safe_points`) and restores the previous ones after it, unless the job stopped: then
    they stay, ignoring any later Ctrl-C while the process exits.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    _state["asked"], _state["stopping"] = None, False
    _install()
    try:
        yield
    except KeyboardInterrupt:
        _state["stopping"] = True
        _say(message)
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit as exc:
        if not is_termination(exc):  # ours, or Lightning's own (a SIGTERM before training started)
            raise
        _state["stopping"] = True
        _say(message)
        sys.exit(EXIT_TERMINATED)
    finally:
        if not _state["stopping"]:
            for signum, handler in previous.items():
                if handler is not None:
                    signal.signal(signum, handler)
        _forward.clear()
