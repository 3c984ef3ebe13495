"""A user's stop is clean: Ctrl-C (SIGINT) prints one line and exits 130; SIGTERM (kill, timeout, job
schedulers) saves the work in hand, prints the line and exits 143; the same command resumes.

Every job runs as a user runs it (a fresh process, see tests/jobs.py); the signal goes to the job's
main process once it is under way, as ``kill PID``, ``timeout`` and a terminal's Ctrl-C deliver it.
Training is tests/tiny_fit.py (a Lightning job built as the trainers build theirs, through
titok_core.stopping); tokenizer.train and generator.train are checked the same way.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from jobs import Job

TINY_FIT = str(REPO / "tests" / "tiny_fit.py")
TOKENIZER = REPO / "tests" / "fixtures" / "official_tiny" / "tokenizer"
RESUME_HINT = "interrupted: run the same command to resume"


def _signal_when(job: Job, ready, signum: int, *, group: bool = False, timeout: float = 240) -> None:
    """Once ``ready()``, send ``signum`` to the job's main process, or to all its processes (``group``: as
    a job scheduler or a terminal's Ctrl-C does; DataLoader workers included)."""
    job.wait_for(ready, timeout=timeout)
    (os.killpg if group else os.kill)(job.proc.pid, signum)


def _stderr_lines(text: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]+", text) if line.strip()]


def _step(ckpt: Path) -> tuple[int, set[int]]:
    """(global_step, the AdamW per-parameter step counts) of a Lightning checkpoint."""
    c = torch.load(ckpt, map_location="cpu", weights_only=True)
    return int(c["global_step"]), {int(s["step"]) for s in c["optimizer_states"][0]["state"].values()}


def _steps_printed(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"done step (\d+)\b", text)]


# ----------------------------------------------------------------------------------------- training


def _tiny_fit(tmp_path: Path, *extra: str, log: str = "job.log") -> Job:
    return Job(TINY_FIT, ["--run-dir", "run", "--max-steps", "30", "--every", "5", "--step-seconds", "0.15", *extra],
               tmp_path, tmp_path / log)


def _stopped_after_step_7(tmp_path: Path, signum: int, *, code: int, library_line: str) -> str:
    """Run the tiny fit, send ``signum`` once step 7 is printed; check the exit code, the one line and
    that neither a traceback nor Lightning's own line shows; return the output."""
    job = _tiny_fit(tmp_path)
    _signal_when(job, lambda: 7 in _steps_printed(job.output()), signum)
    rc = job.wait()
    out = job.output()
    assert rc == code, out[-3000:]
    assert _stderr_lines(out)[-1] == RESUME_HINT, out[-3000:]
    assert "Traceback" not in out and library_line not in out, out[-3000:]
    return out


def test_sigterm_in_training_saves_the_step_it_stopped_at_and_the_rerun_resumes_from_it(tmp_path):
    out = _stopped_after_step_7(tmp_path, signal.SIGTERM, code=143, library_line="Received SIGTERM")
    stopped = _steps_printed(out)[-1]
    assert 7 <= stopped < 30
    # The step it stopped at (periodic checkpoints come every 5 steps), with the optimizer state of it.
    assert _step(tmp_path / "run" / "checkpoints" / "last.ckpt") == (stopped, {stopped})
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.tmp"))

    rerun = _tiny_fit(tmp_path, log="rerun.log")
    assert rerun.wait() == 0, rerun.tail()
    out = rerun.output()
    assert f"resuming from step {stopped}" in out and "trained 30 steps" in out
    assert _steps_printed(out)[0] == stopped + 1
    assert _step(tmp_path / "run" / "checkpoints" / "last.ckpt") == (30, {30})


@pytest.mark.slow  # two Ctrl-Cs 0.3 s apart inside one 2 s step: timing-sensitive on a busy 2-core machine
def test_ctrl_c_in_training_saves_the_step_and_exits_130_and_twice_stops_at_once(tmp_path):
    out = _stopped_after_step_7(tmp_path, signal.SIGINT, code=130, library_line="Detected KeyboardInterrupt")
    assert "stopping after the step in hand (Ctrl-C again stops at once)" in out
    stopped = _steps_printed(out)[-1]
    assert _step(tmp_path / "run" / "checkpoints" / "last.ckpt") == (stopped, {stopped})

    # Twice within one (long) step: at once, from the last periodic checkpoint (every 5 steps).
    job = _tiny_fit(tmp_path, "--step-seconds", "2", log="twice.log")
    _signal_when(job, lambda: stopped + 1 in _steps_printed(job.output()), signal.SIGINT)
    time.sleep(0.3)
    os.kill(job.proc.pid, signal.SIGINT)
    rc = job.wait()
    out = job.output()
    assert rc == 130 and _stderr_lines(out)[-1] == RESUME_HINT and "Traceback" not in out, out[-3000:]
    assert _steps_printed(out)[-1] == stopped + 1  # the step under way was not finished
    step, _ = _step(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert step <= stopped + 1 and (step % 5 == 0 or step == stopped)

    rerun = _tiny_fit(tmp_path, log="rerun.log")
    assert rerun.wait() == 0, rerun.tail()
    assert f"resuming from step {step}" in rerun.output() and "trained 30 steps" in rerun.output()


@pytest.mark.slow
def test_sigterm_stops_every_rank_of_a_two_process_run_after_the_same_step(tmp_path):
    """DDP on two CPU processes (Lightning launches the second): SIGTERM to the first only; both stop
    after one step, the checkpoint holds it, the line is printed once, and the rerun resumes."""
    job = _tiny_fit(tmp_path, "--devices", "2")
    _signal_when(job, lambda: 5 in _steps_printed(job.output()), signal.SIGTERM)
    rc = job.wait()
    out = job.output()
    assert rc == 143, out[-3000:]
    assert out.count(RESUME_HINT) == 1 and "Traceback" not in out, out[-3000:]
    stopped = _steps_printed(out)[-1]
    assert _step(tmp_path / "run" / "checkpoints" / "last.ckpt") == (stopped, {stopped})
    rerun = _tiny_fit(tmp_path, "--devices", "2", log="rerun.log")
    assert rerun.wait() == 0, rerun.tail()
    assert f"resuming from step {stopped}" in rerun.output() and "trained 30 steps" in rerun.output()


def _trainer_args(module: str, tmp_path: Path) -> list[str]:
    common = ["trainer.max_time=null", "trainer.max_steps=400", "trainer.accelerator=cpu", "trainer.devices=1",
              "trainer.precision=32-true", "trainer.val_check_interval=1000", "checkpoint_every_n_steps=3",
              f"run_dir={tmp_path / 'run'}", "logger=null"]
    if module == "tokenizer.train":
        data = tmp_path / "data"
        g = torch.Generator().manual_seed(0)
        for split, names in (("train", ["a/0", "a/1", "b/0"]), ("val", ["a/0", "b/0"])):
            for name in names:
                (data / split / name).parent.mkdir(parents=True, exist_ok=True)
                x = (torch.rand(3, 16, 16, generator=g) * 255).byte().permute(1, 2, 0).numpy()
                Image.fromarray(x).save(data / split / f"{name}.png")
        return ["experiment=small", f"data.root={data}", "batch_size=1", "codebook.quantizer_warmup_steps=4",
                "optim.warmup_steps=2", "model.enc_width=32", "model.enc_depth=1", "model.enc_heads=2",
                "model.dec_width=32", "model.dec_depth=1", "model.dec_heads=2", "model.num_tokens=8", *common]
    return ["experiment=demo", f"data.root={tmp_path}/demo", "data.builtin=demo", "data.demo_train_per_class=6",
            "data.demo_val_per_class=1", f"tokenizer.spec={TOKENIZER}/config.yaml",
            f"tokenizer.checkpoint={TOKENIZER}/tokenizer.bin", f"cache.dir={tmp_path}/cache", "cache.batch_size=32",
            "cache.num_workers=0", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.mlp_dim=64",
            "batch_size=8", "num_workers=0", "sample_every_n_steps=0", "sampling.num_steps=2", *common]


def _new_checkpoint(last: Path):
    """True once ``last`` is written again (another inode or mtime than now): training is under way."""
    def stat():
        try:
            st = os.stat(last)
            return st.st_ino, st.st_mtime_ns
        except FileNotFoundError:
            return None

    before = stat()
    return lambda: stat() not in (None, before)


@pytest.mark.parametrize("module", ["tokenizer.train", "generator.train"])
def test_the_trainers_stop_cleanly(tmp_path, module):
    args = _trainer_args(module, tmp_path)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"

    job = Job(module, args, tmp_path)
    _signal_when(job, _new_checkpoint(last), signal.SIGINT)
    assert job.wait() == 130, job.tail()
    assert _stderr_lines(job.output())[-1] == RESUME_HINT, job.tail()

    job = Job(module, args, tmp_path, tmp_path / "term.log")
    _signal_when(job, _new_checkpoint(last), signal.SIGTERM)
    assert job.wait() == 143, job.tail()
    assert _stderr_lines(job.output())[-1] == RESUME_HINT, job.tail()
    stopped, counts = _step(last)
    assert 3 < stopped < 400 and counts == {stopped}  # a step after the one the job started from

    more = [f"trainer.max_steps={stopped + 3}" if a.startswith("trainer.max_steps=") else a for a in args]
    rerun = Job(module, more, tmp_path, tmp_path / "rerun.log")
    assert rerun.wait() == 0, rerun.tail()
    assert f"trained {stopped + 3} steps" in rerun.output()
    if module == "tokenizer.train":  # the next command, as generator.train names sampling.generate
        assert (f"train a generator on its tokens: python -m generator.train experiment=small "
                f"data.root={tmp_path / 'data'} tokenizer.spec={tmp_path / 'run'}/") in rerun.output(), rerun.tail()
    assert _step(last) == (stopped + 3, {stopped + 3})


# ----------------------------------------------------------------------------------------- generator.cache


def _images(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "train" / f"class{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        (d / f"{i:04d}.png").write_bytes(buf.getvalue())
    return root


def _cache_args(root: Path, out: Path, workers: int | None) -> list[str]:
    """None: the default number of DataLoader workers (auto)."""
    return [f"data.root={root}", f"tokenizer.spec={TOKENIZER / 'config.yaml'}",
            f"tokenizer.checkpoint={TOKENIZER / 'tokenizer.bin'}", f"cache.dir={out}", "cache.batch_size=1",
            *([f"cache.num_workers={workers}"] if workers is not None else []), "cache.dtype=fp32",
            "trainer.accelerator=cpu"]


CACHE_HINT = "interrupted: the finished shards are kept; run the same command to resume"


@pytest.mark.parametrize("signum, code, workers", [(signal.SIGTERM, 143, 2), (signal.SIGINT, 130, None)],
                         ids=["sigterm-to-every-process", "sigint"])
def test_the_token_cache_stops_cleanly_and_the_rerun_continues(tmp_path, compose, signum, code, workers):
    from generator.cache import _main

    root = _images(tmp_path / "images", 60)
    out = tmp_path / "cache"
    shards = out / "shards"
    job = Job("generator.cache", _cache_args(root, out, workers), tmp_path)
    _signal_when(job, lambda: shards.is_dir() and len(list(shards.glob("shard_*.npz"))) >= 5, signum,
                 group=signum == signal.SIGTERM)
    rc = job.wait()
    text = job.output()
    assert rc == code, text[-3000:]
    assert _stderr_lines(text)[-1] == CACHE_HINT and "Traceback" not in text, text[-3000:]
    assert "DataLoader worker" not in text, text[-3000:]
    assert f"token cache {out}: building it from 60 images" in text  # the folder it builds is named
    # The default number of workers fits the machine: no warning that it asks for more than there are cores.
    assert "worker processes in total" not in text
    kept = len(list(shards.glob("shard_*.npz")))
    assert 5 <= kept < 60 and not (out / "manifest.json").exists()
    assert not list(shards.glob(".*.tmp")) and not list(out.glob(".*.tmp"))

    rerun = Job("generator.cache", _cache_args(root, out, workers), tmp_path, tmp_path / "rerun.log")
    assert rerun.wait() == 0, rerun.tail()
    assert f"token cache {out}: 120 sequences" in rerun.output()
    assert sorted(p.name for p in out.iterdir()) == ["labels.npy", "manifest.json", "tokens.npy"]
    assert not (tmp_path / "cache.lock").exists()  # nothing beside the cache either
    assert json.loads((out / "manifest.json").read_text())["num_images"] == 60
    if signum == signal.SIGTERM:  # the same cache as a build that was never stopped (made here, once)
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")  # as in a fresh process
        try:
            _main(compose("generator.cache", _cache_args(root, tmp_path / "want", workers)))
        finally:
            torch.set_float32_matmul_precision(previous)
        for name in ("tokens.npy", "labels.npy"):
            assert (out / name).read_bytes() == (tmp_path / "want" / name).read_bytes()


@pytest.mark.parametrize("cores, workers", [(1, 0), (2, 1), (3, 2), (16, 4)])
def test_auto_workers_fit_the_machine(monkeypatch, cores, workers):
    from titok_core.runtime import resolve_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert resolve_workers("auto") == workers
    assert resolve_workers(3) == 3
    with pytest.raises(ValueError, match="num_workers must be auto or a number"):
        resolve_workers("two")


def test_a_process_with_workers_still_alive_exits(tmp_path):
    """Workers ignore SIGTERM (they stop when their main process says so); multiprocessing ends
    leftover daemonic workers at exit with SIGTERM and waits for them, so without
    titok_core.stopping's exit hook a process with a leaked DataLoader iterator never exits."""
    script = tmp_path / "leak.py"
    script.write_text(
        "import torch\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "from titok_core.stopping import ignore_stop_signals\n"
        "loader = DataLoader(TensorDataset(torch.arange(100)), batch_size=10, num_workers=2,\n"
        "                    persistent_workers=True, worker_init_fn=ignore_stop_signals)\n"
        "it = iter(loader)\n"
        "print(int(next(it)[0].sum()))\n"
        "KEEP = it\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "45", done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
