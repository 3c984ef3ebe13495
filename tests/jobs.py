"""A command run as a user runs it, for the kill tests: ``python -m <module> <args>`` in its own
process group, its output in a log file, killed with SIGKILL at a point the test chooses."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO


def job_env(extra: dict | None = None) -> dict:
    """One CPU thread (the same arithmetic as an in-process reference run with one thread, and
    several times faster than two threads fighting over a shared machine's cores); the repo importable."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **(extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return env


class Job:
    """One ``python -m <module> <args>`` in ``cwd``; output appended to ``log`` (default ``cwd/job.log``).

    A ``module`` ending in ``.py`` is a script path, run as ``python <script> <args>``."""

    def __init__(self, module: str, args: list[str], cwd: Path, log: Path | None = None, env: dict | None = None):
        cwd.mkdir(parents=True, exist_ok=True)
        self.cwd, self.log = cwd, log or cwd / "job.log"
        how = [module] if module.endswith(".py") else ["-m", module]
        self.cmd = [sys.executable, *how, *args]
        self._out = open(self.log, "ab")
        self._out.write(f"\n$ python {' '.join(how)} {' '.join(args)}\n".encode())
        self._out.flush()
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=job_env(env), stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.started = time.monotonic()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 4000) -> str:
        return self.output()[-n:]

    def ended(self) -> bool:
        return self.proc.poll() is not None

    def kill(self) -> None:
        if not self.ended():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self._out.close()

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self._out.close()

    def wait_for(self, ready, *, timeout: float = 240):
        """Poll ``ready()`` every 2 ms until it returns something true (returned); fails if the job ends first."""
        deadline = time.monotonic() + timeout
        while True:
            got = ready()
            if got:
                return got
            if self.ended():
                raise AssertionError(f"the job ended (rc {self.proc.returncode}) before the kill point:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the kill point never came:\n{self.tail()}")
            time.sleep(0.002)

    def kill_after(self, delay: float) -> bool:
        """SIGKILL the job's process group ``delay`` seconds from now; False when it ended first."""
        end = time.monotonic() + delay
        while time.monotonic() < end:
            if self.ended():
                self._out.close()
                return False
            time.sleep(0.002)
        self.kill()
        return self.proc.returncode == -signal.SIGKILL

    def kill_at(self, ready, delay: float, *, timeout: float = 240) -> bool:
        """Wait until ``ready()`` (the job is under way), then ``delay`` seconds more, and SIGKILL the
        job's process group. True when it was killed; False when it ended first (rc checked by the caller)."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.ended():
                self._out.close()
                return False
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the kill point never came: {self.tail()}")
            time.sleep(0.002)
        return self.kill_after(delay)
