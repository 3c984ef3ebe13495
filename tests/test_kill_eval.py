"""eval.gfid survives a kill: SIGKILL the evaluation at a seeded random point, run the same command
again, and get the figures (and files) of a run that was never stopped.

Inception mode keeps its state in ``state_dir`` (eval.state: the Progress file, saved atomically
every batch here, and the per-batch RowLog files of features and samples); demo mode's resumable
state is its two demo classifiers, cached atomically (titok_core.judges). Every job runs as the
user runs it, ``python -m eval.gfid ...`` in a fresh process (its own process group, one CPU
thread), with relative paths, so the killed run and the uninterrupted one are the very same command
in two temp folders. The uninterrupted run of each mode starts once per module, in the background,
while the first test kills and reruns its own copy.

Kill points come from a seeded RNG and are placed by the job's own progress, not by the clock alone:
inception mode is killed a random fraction of a batch after the j-th batch the job itself appends
to the features file (the batch time measured on the job, so the point lands inside the sampling
loop whatever the load); demo mode a random delay after a classifier's first training step is
logged, or once both classifiers are cached.

Default suite: one kill in each mode. ``-m slow``: kills in a row (one mid state save), a kill after
the sampling loop (FID / .npz writing), a kill while the reference's Inception features are made,
and demo kills during the colour-blind classifier and during sampling.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from jobs import Job

TINY = REPO / "tests" / "fixtures" / "official_tiny"
SEED = 7351  # every kill point below derives from it
FEATURE_BYTES = 2048 * 4  # one row of the features RowLog: float32 [2048]
NUM_SAMPLES, BATCH = 18, 3  # inception mode: 6 batches of 3
BATCHES = NUM_SAMPLES // BATCH
DEMO_STEPS, COLOUR_BLIND_STEPS = 20, 40  # demo mode: a few seconds of classifier training each

MODELS = [
    f"generator.spec={TINY / 'generator_imagebert' / 'config.yaml'}",
    f"generator.checkpoint={TINY / 'generator_imagebert' / 'generator.bin'}",
    f"tokenizer.spec={TINY / 'tokenizer' / 'config.yaml'}",
    f"tokenizer.checkpoint={TINY / 'tokenizer' / 'tokenizer.bin'}",
]
# Figures that depend on the run's history, not on what was measured.
TIMINGS = ("loop_seconds", "batches_this_run")


# ----------------------------------------------------------------------------------------- helpers


def run_to_end(args: list[str], cwd: Path, env: dict | None = None) -> tuple[dict, str]:
    """Run the command to its end; (the result JSON it wrote, this run's output)."""
    job = Job("eval.gfid", args, cwd, env=env)
    before = len(job.output())
    rc = job.wait()
    out = job.output()[before:]
    assert rc == 0, f"eval.gfid failed (rc {rc}):\n{out[-6000:]}"
    return json.loads((cwd / "result.json").read_text()), out


class Uninterrupted:
    """The uninterrupted run of a mode, started in the background; ``result()`` waits for it."""

    def __init__(self, args: list[str], cwd: Path, env: dict | None = None):
        self.cwd = cwd
        self.job = Job("eval.gfid", args, cwd, env=env)
        self._result: dict | None = None

    def result(self) -> dict:
        if self._result is None:
            rc = self.job.wait()
            assert rc == 0, f"the uninterrupted run failed (rc {rc}):\n{self.job.output()[-6000:]}"
            self._result = json.loads((self.cwd / "result.json").read_text())
        return self._result

    def close(self) -> None:
        if not self.job.ended():
            self.job.kill()


def _same_figures(got: dict, want: dict) -> None:
    got = {k: v for k, v in got.items() if k not in TIMINGS}
    want = {k: v for k, v in want.items() if k not in TIMINGS}
    assert got == want  # exactly: the same samples through the same arithmetic


# ----------------------------------------------------------------------------------------- inception mode


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An ADM-style reference: 8 of the tiny generator's own samples (another seed) and 4 of smooth noise
    as arr_0 (so that precision and recall are neither 0 nor 1), random mu/sigma for FID."""
    from sampling.pipeline import load_pipeline, sample_images

    pipe = load_pipeline(
        generator={"spec": TINY / "generator_imagebert" / "config.yaml",
                   "checkpoint": TINY / "generator_imagebert" / "generator.bin"},
        tokenizer={"spec": TINY / "tokenizer" / "config.yaml", "checkpoint": TINY / "tokenizer" / "tokenizer.bin"},
    )
    own = sample_images(pipe, torch.arange(8) % 6, seed=99, batch_size=8, dtype="fp32")
    own = (own * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    low = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(4))
    noise = (torch.nn.functional.interpolate(low, size=(64, 64), mode="bilinear") * 255).round().to(torch.uint8)
    features = np.random.default_rng(3).normal(size=(64, 2048))
    path = tmp_path_factory.mktemp("reference") / "ref.npz"
    np.savez(path, arr_0=np.concatenate([own, noise.permute(0, 2, 3, 1).numpy()]), mu=features.mean(0),
             sigma=np.cov(features, rowvar=False))
    return path


@pytest.fixture(scope="module")
def inception_args(reference, inception_weights) -> list[str]:
    # Relative paths: the same command in another folder is another, independent evaluation.
    return ["mode=inception", *MODELS, f"reference={reference}", "reference_cache=refcache.npz",
            f"inception_weights={inception_weights}", f"num_samples={NUM_SAMPLES}", f"batch_size={BATCH}",
            "state_every=1", "state_dir=state", "save_npz=samples.npz", "out=result.json", "seed=3",
            "trainer.accelerator=cpu", "dtype=fp32"]


@pytest.fixture(scope="module")
def inception_want(inception_args, tmp_path_factory):
    run = Uninterrupted(inception_args, tmp_path_factory.mktemp("inception_uninterrupted"))
    yield run
    run.close()


def _feature_rows(state: Path) -> int:
    files = list(state.glob("gfid-*-rank0.features")) if state.is_dir() else []
    return max((f.stat().st_size // FEATURE_BYTES for f in files), default=0)


def _kill_in_loop(job: Job, j: int, fraction: float) -> str:
    """Kill ``fraction`` of a batch time after the j-th batch this job appends to the features file
    (j >= 2; the batch time is the interval between its (j-1)-th and j-th, measured on this job).

    A resumed job first cuts the file back to its saved rows, then appends: each rise of the file's
    whole batches is one batch appended by this job.
    """
    state = job.cwd / "state"
    level, appended = _feature_rows(state) // BATCH, []

    def jth_batch_appended():
        nonlocal level
        now = _feature_rows(state) // BATCH
        if now > level:
            appended.append(time.monotonic())
        level = now
        return len(appended) >= j

    job.wait_for(jth_batch_appended)
    batch_time = appended[j - 1] - appended[j - 2] if j >= 2 else 0.0
    assert j >= 2 or fraction == 0, "the first batch of a job has no batch time to take a fraction of"
    assert job.kill_after(fraction * batch_time), f"the job ended before the kill point:\n{job.output()[-4000:]}"
    return f"this job's batch {j} + {fraction:.2f} x {batch_time:.2f} s"


def _check_state_after_kill(cwd: Path) -> int:
    """Only complete files and atomic temp files in the state dir, the row logs hold at least the rows the
    progress file counts, nothing final written; returns the batches the saved progress counts as done."""
    state = cwd / "state"
    assert not (cwd / "result.json").exists()
    files = sorted(p.name for p in state.iterdir()) if state.is_dir() else []
    fps = {name.split("-")[1] for name in files if name.startswith("gfid-")}
    assert len(fps) <= 1, files
    done = 0
    for name in files:
        if name.startswith("."):  # an atomic write the kill interrupted: never read under that name
            assert name.startswith(".gfid-") and name.endswith(".tmp") and ".pt." in name, files
            continue
        assert name.startswith("gfid-") and name.endswith(("-rank0.pt", "-rank0.features", "-rank0.samples")), files
        if name.endswith(".pt"):
            saved = torch.load(state / name, map_location="cpu", weights_only=True)  # whole, or torch.load fails
            done = int(saved["done"])
            assert 0 < done <= BATCHES and saved["accumulators"][0]["count"] == done * BATCH
    if done:
        row = {"features": FEATURE_BYTES, "samples": 64 * 64 * 3}
        for kind, size in row.items():
            (log,) = state.glob(f"gfid-*-rank0.{kind}")
            assert log.stat().st_size // size >= done * BATCH, (kind, log.stat().st_size, done)
    npz = cwd / "samples.npz"
    if npz.exists():  # only a kill after the file was renamed into place: then it is whole
        with zipfile.ZipFile(npz) as zf:
            assert zf.testzip() is None and sorted(zf.namelist()) == ["arr_0.npy", "arr_1.npy"]
    return done


def _rerun_and_compare(args: list[str], cwd: Path, done: int, want: Uninterrupted) -> dict:
    got, out = run_to_end(args, cwd)
    assert "ignoring" not in out and "starting again" not in out, out[-4000:]
    if done:
        assert f"{done} batches done" in out, out[-4000:]
    assert got["batches_this_run"] == BATCHES - done  # resumed, not restarted
    _same_figures(got, want.result())
    assert (cwd / "samples.npz").read_bytes() == (want.cwd / "samples.npz").read_bytes()
    # The state ends as an uninterrupted run leaves it: the same rows, the same accumulators.
    for kind in ("features", "samples"):
        (mine,), (theirs,) = (list(d.glob(f"state/gfid-*-rank0.{kind}")) for d in (cwd, want.cwd))
        assert mine.name == theirs.name and mine.read_bytes() == theirs.read_bytes(), kind
    (mine,), (theirs,) = (list(d.glob("state/gfid-*-rank0.pt")) for d in (cwd, want.cwd))
    mine, theirs = (torch.load(p, map_location="cpu", weights_only=True) for p in (mine, theirs))
    assert mine["done"] == theirs["done"] == BATCHES and mine["sums"] == theirs["sums"]
    for key, value in theirs["accumulators"][0].items():
        assert torch.equal(mine["accumulators"][0][key], value), key
    return got


def _inception_kill_test(args, tmp_path, want, points: list[tuple[int, float]]) -> list[str]:
    cwd, where = tmp_path / "run", []
    done = 0
    for j, fraction in points:
        job = Job("eval.gfid", args, cwd)
        point = _kill_in_loop(job, j, fraction)
        before, done = done, _check_state_after_kill(cwd)
        temps = len(list((cwd / "state").glob(".*.tmp")))
        where.append(f"{point}: {done} batches saved, {temps} interrupted state write(s) left")
        # The state of the batch before the j-th was saved before the j-th's rows were written.
        assert done >= before + j - 1, (before, done, where)
    _rerun_and_compare(args, cwd, done, want)
    assert not list((cwd / "state").glob(".gfid-*.pt.*.tmp"))  # the rerun removed what a kill cut short
    return where


def test_inception_killed_in_the_sampling_loop_and_rerun(inception_args, inception_want, tmp_path):
    rng = random.Random(f"{SEED}-inception")
    where = _inception_kill_test(inception_args, tmp_path, inception_want, [(rng.randint(2, 3), rng.random())])
    got = inception_want.result()
    assert 0 < got["precision"] < 1 or 0 < got["recall"] < 1, got  # the figures compared are not trivial
    print("kill points:", where)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143),
                                          pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)],
                         ids=["sigterm", "ctrl-c"])
def test_inception_stopped_by_a_signal_and_rerun(inception_args, inception_want, tmp_path, signum, code):
    """Ctrl-C and SIGTERM save the state of every batch done (here the only save: state_every is larger
    than the run) and exit 130 / 143 with one line; the rerun resumes from it and ends as the
    uninterrupted run."""
    args = [a if not a.startswith("state_every=") else "state_every=100" for a in inception_args]
    cwd = tmp_path / "run"
    job = Job("eval.gfid", args, cwd)
    job.wait_for(lambda: _feature_rows(cwd / "state") >= 2 * BATCH)
    os.kill(job.proc.pid, signum)
    assert job.wait() == code, job.tail()
    lines = [line for line in job.output().splitlines() if line.strip()]
    assert lines[-1] == "interrupted: run the same command to resume" and "Traceback" not in job.output(), job.tail()
    saved = list((cwd / "state").glob("gfid-*-rank0.pt"))
    done = int(torch.load(saved[0], weights_only=True)["done"]) if saved else 0
    assert 2 <= done < BATCHES and _feature_rows(cwd / "state") == done * BATCH, done
    _rerun_and_compare(args, cwd, done, inception_want)


@pytest.mark.slow
def test_inception_survives_kills_in_a_row(inception_args, inception_want, tmp_path):
    """Three kills, the second the moment the resumed job's first batch is appended (mid state save)."""
    rng = random.Random(f"{SEED}-inception-row")
    # At most 3 + 1 batches are saved before the third job starts: it has 2 to append.
    where = _inception_kill_test(inception_args, tmp_path, inception_want,
                                 [(2, rng.random()), (1, 0.0), (2, rng.random())])
    print("kill points:", where)


@pytest.mark.slow
def test_inception_killed_after_the_sampling_loop(inception_args, inception_want, tmp_path):
    """While the statistics, precision/recall, the .npz and the result are made from the finished state."""
    rng = random.Random(f"{SEED}-inception-end")
    cwd = tmp_path / "run"
    job = Job("eval.gfid", inception_args, cwd)
    job.wait_for(lambda: _feature_rows(cwd / "state") >= NUM_SAMPLES)
    delay = rng.uniform(0, 2.0)
    assert job.kill_after(delay), job.output()[-4000:]
    done = _check_state_after_kill(cwd)
    print(f"kill point: last batch's rows + {delay:.2f} s: {done} batches saved, "
          f"samples.npz {'written' if (cwd / 'samples.npz').exists() else 'not written'}")
    _rerun_and_compare(inception_args, cwd, done, inception_want)


@pytest.mark.slow
def test_inception_killed_while_the_reference_is_measured(inception_args, inception_want, tmp_path):
    """Before any state: the reference's Inception features (cached atomically beside the run) are made."""
    rng = random.Random(f"{SEED}-inception-reference")
    cwd = tmp_path / "run"
    job = Job("eval.gfid", inception_args, cwd)
    job.wait_for(lambda: "reference images" in job.output())
    delay = rng.uniform(0, 1.0)
    assert job.kill_after(delay), job.output()[-4000:]
    leftovers = sorted(p.name for p in cwd.iterdir() if "refcache" in p.name)
    print(f"kill point: reference images + {delay:.2f} s: {leftovers}")
    assert all(n == "refcache.npz" or (n.startswith(".refcache.npz.") and n.endswith(".tmp")) for n in leftovers)
    if "refcache.npz" in leftovers:
        with np.load(cwd / "refcache.npz") as cache:
            assert cache["features"].shape == (12, 2048)
    done = _check_state_after_kill(cwd)
    _rerun_and_compare(inception_args, cwd, done, inception_want)


# ----------------------------------------------------------------------------------------- demo mode

@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """A 10-class demo folder (train 8, val 3 per class), as tests/test_eval.py makes it."""
    from test_eval import _demo_folder

    return _demo_folder(tmp_path_factory.mktemp("demo_data"), {"train": 8, "val": 3})


@pytest.fixture(scope="module")
def demo_args(demo_root) -> list[str]:
    return ["mode=demo", *MODELS, f"data.root={demo_root}", "demo_per_class=2", f"classifier_steps={DEMO_STEPS}",
            f"colour_blind_steps={COLOUR_BLIND_STEPS}", "batch_size=10", "out=result.json", "seed=3",
            "trainer.accelerator=cpu", "dtype=fp32"]


def _demo_env(cwd: Path) -> dict:
    return {"XDG_CACHE_HOME": str(cwd / "cache")}  # the classifier cache: titok_core.judges.default_cache_dir


def _classifier_dir(cwd: Path) -> Path:
    return cwd / "cache" / "titok_gen" / "demo_classifier"


@pytest.fixture(scope="module")
def demo_want(demo_args, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("demo_uninterrupted")
    run = Uninterrupted(demo_args, cwd, _demo_env(cwd))
    yield run
    run.close()


def _cached_classifiers(cwd: Path) -> int:
    folder = _classifier_dir(cwd)
    return len(list(folder.glob("demo_classifier-*.safetensors"))) if folder.is_dir() else 0


def _check_classifier_cache_after_kill(cwd: Path) -> int:
    """Every cache file under its final name is a whole demo classifier; the rest are atomic temp files."""
    from titok_core.checkpoints import read_model_file

    assert not (cwd / "result.json").exists()
    folder = _classifier_dir(cwd)
    whole = 0
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.name.startswith("."):
            assert path.name.startswith(".demo_classifier-") and path.name.endswith(".tmp"), path
            continue
        assert path.name.startswith("demo_classifier-") and path.suffix == ".safetensors", path
        kind, config, state = read_model_file(path)
        assert kind == "demo_classifier" and config["steps"] in (DEMO_STEPS, COLOUR_BLIND_STEPS) and state
        whole += 1
    return whole


def _demo_kill_test(args, tmp_path, want, points) -> list[str]:
    """points: (what the kill waits for, delay); then the rerun to the end, compared with the uninterrupted run."""
    cwd, where, cached = tmp_path / "run", [], 0
    for ready, delay in points:
        job = Job("eval.gfid", args, cwd, env=_demo_env(cwd))
        job.wait_for(lambda: ready(job))
        assert job.kill_after(delay), f"the job ended before the kill point:\n{job.output()[-4000:]}"
        cached = _check_classifier_cache_after_kill(cwd)
        where.append(f"{ready.__name__} + {delay:.2f} s ({cached} classifier(s) cached)")
    got, out = run_to_end(args, cwd, _demo_env(cwd))
    assert out.count("demo classifier: cached") == cached, out[-4000:]  # what the kills left is used as is
    assert out.count("trained and cached") == 2 - cached, out[-4000:]
    want_result = want.result()
    for key in ("class_accuracy", "colour_blind_accuracy", "classifier_fid", "precision", "recall"):
        assert got[key] == want_result[key], key
    _same_figures(got, want_result)
    return where


def first_classifier_training(job: Job) -> bool:
    return f"demo classifier step 1/{DEMO_STEPS} " in job.output()


def colour_blind_training(job: Job) -> bool:
    return f"demo classifier step 1/{COLOUR_BLIND_STEPS} " in job.output()


def both_cached(job: Job) -> bool:
    return _cached_classifiers(job.cwd) == 2


def test_demo_killed_while_the_classifiers_train_and_rerun(demo_args, demo_want, tmp_path):
    rng = random.Random(f"{SEED}-demo")
    # The two trainings take ~3 s and ~6 s on an idle CPU: any delay up to 4 s lands in one of them.
    where = _demo_kill_test(demo_args, tmp_path, demo_want, [(first_classifier_training, rng.uniform(0, 4.0))])
    assert "0 classifier(s)" in where[0] or "1 classifier(s)" in where[0], where
    print("kill points:", where)


@pytest.mark.slow
def test_demo_killed_while_the_colour_blind_classifier_trains(demo_args, demo_want, tmp_path):
    rng = random.Random(f"{SEED}-demo-colour-blind")
    where = _demo_kill_test(demo_args, tmp_path, demo_want, [(colour_blind_training, rng.uniform(0, 2.0))])
    assert "1 classifier(s)" in where[0], where
    print("kill points:", where)


@pytest.mark.slow
def test_demo_survives_kills_in_a_row(demo_args, demo_want, tmp_path):
    """Killed in the first classifier's training, then (rerun) while sampling with both classifiers cached."""
    rng = random.Random(f"{SEED}-demo-row")
    where = _demo_kill_test(demo_args, tmp_path, demo_want,
                            [(first_classifier_training, rng.uniform(0, 1.5)), (both_cached, rng.uniform(0, 0.1))])
    assert "0 classifier(s)" in where[0] and "2 classifier(s)" in where[1], where
    print("kill points:", where)
