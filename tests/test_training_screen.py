"""What a training run shows: a progress bar in steps (titok_core.progress) and no library noise a user
cannot act on (titok_core.quiet); on tests/tiny_fit.py, a Lightning job built as the trainers build theirs."""
from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

from conftest import REPO
from jobs import job_env

TINY_FIT = str(REPO / "tests" / "tiny_fit.py")
NOISE = {
    "litlogger tip": "try installing [litlogger]",
    "_pytree deprecation": "`isinstance(treespec, LeafSpec)` is deprecated",
    "log_every_n_steps": "is smaller than the logging interval Trainer(log_every_n_steps=",
    "configure_callbacks": "returned in `LightningModule.configure_callbacks` will override",
    "val_check_interval=1": "`Trainer(val_check_interval=1)` was configured",
}


def _tiny_fit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, TINY_FIT, "--run-dir", str(tmp_path / "run"), *args], cwd=tmp_path,
                          env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_the_library_noise_is_gone_and_a_real_warning_still_shows(tmp_path):
    # The run sets up every message (a small dataset, validation every batch, a model callback that
    # replaces a Trainer callback): without the filters each one is there ...
    loud = _tiny_fit(tmp_path / "loud", "--max-steps", "3", "--noise", "--no-quiet").stderr
    assert [name for name, text in NOISE.items() if text not in loud] == []
    # ... with them, none is; the job's own warning and Lightning's other lines still show.
    quiet = _tiny_fit(tmp_path / "quiet", "--max-steps", "3", "--noise").stderr
    assert [name for name, text in NOISE.items() if text in quiet] == []
    assert "UserWarning: a real warning from the job" in quiet
    assert "`Trainer(limit_val_batches=1)` was configured" in quiet  # not in the list: kept


def test_quiet_filters_only_those_messages():
    from titok_core.quiet import quiet_libraries

    quiet_libraries()
    quiet_libraries()  # twice: nothing doubles
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_libraries()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("The number of training batches (4) is smaller than the logging interval "
                      "Trainer(log_every_n_steps=50). Set a lower value ...", UserWarning)
        warnings.warn("something is deprecated", FutureWarning)
        warnings.warn("The number of training batches is not what you think", UserWarning)
    assert [str(w.message) for w in seen] == ["something is deprecated",
                                              "The number of training batches is not what you think"]


def test_the_progress_bar_counts_steps_with_rate_time_left_and_loss(tmp_path):
    err = _tiny_fit(tmp_path, "--max-steps", "12", "--every", "5").stderr
    frames = [f for f in re.split(r"[\r\n]+", err) if f.startswith("step ")]
    assert frames, err[-2000:]
    last = frames[-1]
    # step 12/12 |####################| 00:01<00:00, 9.81 step/s, loss=3.59
    assert re.match(r"^step 12/12 \|.{20}\| \d\d:\d\d<00:00, +[\d.]+ step/s, loss=[\d.e+-]+$", last), last
    assert all(re.match(r"^step \d+/12 ", f) for f in frames), frames
    assert "Epoch" not in err and "it/s" not in err.replace("Validation", "")

    # A resumed run starts at its step; with a time budget the end is the steps that fit in it.
    err = _tiny_fit(tmp_path, "--max-steps", "100000", "--max-time", "00:00:00:04", "--step-seconds", "0.05").stderr
    frames = [f for f in re.split(r"[\r\n]+", err) if f.startswith("step ")]
    assert frames[0].startswith("step 12/"), frames[:3]
    ends = {int(m) for m in re.findall(r"^step \d+/(\d+) ", "\n".join(frames), flags=re.M)}
    assert ends and max(ends) < 1000, ends  # an estimate from the rate and the time left, not max_steps
