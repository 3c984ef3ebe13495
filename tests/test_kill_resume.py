"""Every long job survives a kill: start it, SIGKILL it at a random point, run the same command again,
and get what an uninterrupted run gives.

Each job runs as the user runs it (``python -m ...`` in a fresh process, cwd a temp folder); the
uninterrupted reference runs in this process from the same options (the same code path, without
the ~10 s of imports). Kill points are drawn from a seeded RNG: a point in the job's progress (the
k-th finished shard, the k-th checkpoint written) plus a random delay, so that the kill lands mid
batch, mid step or mid write, whatever the speed of the machine. The whole process group is
killed (DataLoader workers included), as when a node dies.

In the default suite: one cache build (image folder), one tokenizer.train and one generator.train,
one kill each. ``-m slow``: several kills in a row, parquet and WebDataset caches, and a kill loop
on the checkpoint writer.
"""
from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from jobs import Job, job_env

TOKENIZER = REPO / "tests" / "fixtures" / "official_tiny" / "tokenizer"
SEED = 20240611  # the kill points of every test derive from it


# ----------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _one_thread():
    """One CPU thread here and in the jobs: the same arithmetic on both sides, and on a machine shared
    with other work one thread is several times faster than two fighting over the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run_to_end(module: str, args: list[str], cwd: Path, log: Path) -> str:
    job = Job(module, args, cwd, log)
    rc = job.wait()
    assert rc == 0, f"{module} failed (rc {rc}):\n{job.tail()}"
    return job.output()


def _kill(module: str, args: list[str], cwd: Path, log: Path, ready, delay: float, what: str) -> None:
    job = Job(module, args, cwd, log)
    killed = job.kill_at(ready, delay)
    assert killed, (f"{module} ended (rc {job.proc.returncode}) before the kill point ({what}); "
                    f"the job is too short for it:\n{job.tail()}")


def _png(rng: np.random.Generator) -> bytes:
    side = int(rng.integers(18, 30))
    arr = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _samples(n: int, seed: int = 0) -> list[tuple[int, bytes]]:
    rng = np.random.default_rng(seed)
    return [(i % 3, _png(rng)) for i in range(n)]


def write_folder(root: Path, samples) -> Path:
    for i, (label, data) in enumerate(samples):
        d = root / "train" / f"class{label}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:04d}.png").write_bytes(data)
    return root


def write_parquet(root: Path, samples, *, files: int = 2) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True)
    per = -(-len(samples) // files)
    for f in range(files):
        part = samples[f * per : (f + 1) * per]
        table = pa.table({
            "image": pa.array([{"bytes": d, "path": None} for _, d in part],
                              type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "label": pa.array([label for label, _ in part], type=pa.int64()),
        })
        pq.write_table(table, root / "data" / f"train-{f:05d}-of-{files:05d}.parquet", row_group_size=8)
    return root


def write_tars(root: Path, samples, *, per_tar: int = 8) -> Path:
    root.mkdir(parents=True)
    for t in range(0, len(samples), per_tar):
        with tarfile.open(root / f"train-{t // per_tar:04d}.tar", "w") as tar:
            for i, (label, data) in enumerate(samples[t : t + per_tar], start=t):
                for name, payload in ((f"{i:06d}.png", data), (f"{i:06d}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return root


def _optimizer_steps(ckpt: Path) -> tuple[int, list[torch.Tensor], list[int]]:
    """(global_step, every exp_avg, every per-parameter step count) of a Lightning checkpoint."""
    c = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = c["optimizer_states"][0]["state"]
    return (int(c["global_step"]), [s["exp_avg"] for s in state.values()],
            [int(s["step"]) for s in state.values()])


# ----------------------------------------------------------------------------------------- token cache


def _cache_args(root: Path, out: Path, workers: int = 0) -> list[str]:
    return [f"data.root={root}", "data.split=train", f"tokenizer.spec={TOKENIZER / 'config.yaml'}",
            f"tokenizer.checkpoint={TOKENIZER / 'tokenizer.bin'}", f"cache.dir={out}", "cache.batch_size=1",
            f"cache.num_workers={workers}", "cache.dtype=fp32", "trainer.accelerator=cpu"]


def _reference_cache(compose, root: Path, out: Path, workers: int = 0) -> Path:
    from generator.cache import _main

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # as in a fresh process (training tests set "high")
    try:
        _main(compose("generator.cache", _cache_args(root, out, workers)))
    finally:
        torch.set_float32_matmul_precision(previous)
    return out


def _same_cache(got: Path, want: Path) -> None:
    assert sorted(p.name for p in got.iterdir()) == ["labels.npy", "manifest.json", "tokens.npy"], list(got.iterdir())
    for name in ("tokens.npy", "labels.npy"):
        assert (got / name).read_bytes() == (want / name).read_bytes(), name
    # The manifest holds no timestamps: all of it must agree.
    assert json.loads((got / "manifest.json").read_text()) == json.loads((want / "manifest.json").read_text())


def _shards_done(out: Path):
    return lambda: len(list((out / "shards").glob("*.npz"))) if (out / "shards").is_dir() else 0


def _kill_cache_and_resume(tmp_path, compose, root: Path, *, shards: int, kills: int, rng: random.Random,
                           workers: int = 0) -> list:
    """Kill the build ``kills`` times at increasing shard counts, rerun to the end; returns the kill points."""
    want = _reference_cache(compose, root, tmp_path / "want", workers)
    out, log = tmp_path / "cache", tmp_path / "cache.log"
    args = _cache_args(root, out, workers)
    done = _shards_done(out)
    points = sorted(rng.sample(range(1, shards * 2 // 3), kills))
    for k in points:
        delay = rng.uniform(0, 0.02)
        _kill("generator.cache", args, tmp_path, log, lambda k=k: done() >= k, delay, f"shard {k} + {delay:.3f} s")
        assert not (out / "manifest.json").exists()
    assert done() >= points[-1]
    output = _run_to_end("generator.cache", args, tmp_path, log)
    assert f"token cache {out}:" in output
    _same_cache(out, want)
    return points


def test_cache_build_killed_and_rerun_gives_the_uninterrupted_cache(tmp_path, compose):
    root = write_folder(tmp_path / "images", _samples(48))
    points = _kill_cache_and_resume(tmp_path, compose, root, shards=48, kills=1, rng=random.Random(SEED))
    assert len(points) == 1


@pytest.mark.slow
@pytest.mark.parametrize("store", ["folder", "parquet", "webdataset"])
def test_cache_build_survives_several_kills(tmp_path, compose, store):
    samples = _samples(40, seed=1)
    writer = {"folder": write_folder, "parquet": write_parquet, "webdataset": write_tars}[store]
    root = writer(tmp_path / "images", samples)
    # WebDataset with two DataLoader workers: they die with the job (its process group) and the
    # rerun's workers take the unfinished tars.
    _kill_cache_and_resume(tmp_path, compose, root, shards=40, kills=3, rng=random.Random(f"{SEED}-{store}"),
                           workers=2 if store == "webdataset" else 0)


@pytest.mark.slow
def test_cache_build_killed_while_merging(tmp_path, compose):
    """A kill once every shard exists (while tokens.npy / labels.npy / manifest.json are written, or
    while the shards are removed): the rerun finishes the same cache, with no temp file left."""
    root = write_folder(tmp_path / "images", _samples(24, seed=2))
    want = _reference_cache(compose, root, tmp_path / "want")
    out, log, rng = tmp_path / "cache", tmp_path / "cache.log", random.Random(f"{SEED}-merge")
    args = _cache_args(root, out)
    done = _shards_done(out)
    job = Job("generator.cache", args, tmp_path, log)
    job.kill_at(lambda: done() >= 24, rng.uniform(0, 0.05))  # may also end first: both are fine here
    assert job.proc.returncode in (0, -signal.SIGKILL), job.tail()
    _run_to_end("generator.cache", args, tmp_path, log)
    _same_cache(out, want)


# ----------------------------------------------------------------------------------------- tokenizer.train


def _tokenizer_images(root: Path, size: int = 16) -> Path:
    """One training image (train/a/0.png) and four held-out ones."""
    g = torch.Generator().manual_seed(0)
    for split, names in (("train", ["a/0"]), ("val", ["a/0", "a/1", "b/0", "b/1"])):
        for name in names:
            (root / split / name).parent.mkdir(parents=True, exist_ok=True)
            x = (torch.rand(3, size, size, generator=g) * 255).byte().permute(1, 2, 0).numpy()
            Image.fromarray(x).save(root / split / f"{name}.png")
    return root


def _tokenizer_args(data: Path, run: Path, steps: int, *extra: str) -> list[str]:
    # experiment=small at a tiny width, on one training image: every batch is that image, whatever the
    # DataLoader's shuffle (which draws from the global RNG, not kept in a checkpoint), so a resumed
    # run sees the data the uninterrupted one saw and can be compared bit for bit.
    return [
        "experiment=small", f"run_dir={run}", f"data.root={data}", "batch_size=1", "trainer.max_time=null",
        f"trainer.max_steps={steps}", "checkpoint_every_n_steps=2", "trainer.val_check_interval=1000",
        "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
        "codebook.quantizer_warmup_steps=4", "optim.warmup_steps=2", "model.enc_width=32", "model.enc_depth=1",
        "model.enc_heads=2", "model.dec_width=32", "model.dec_depth=1", "model.dec_heads=2", "model.num_tokens=8",
        # The official GAN from step 1: the discriminator's own optimiser and schedule, and LeCAM's EMAs.
        "loss.gan.weight=0.1", "loss.gan.start_step=1", "loss.gan.lecam_weight=0.001", "loss.gan.channels=32",
        "loss.gan.layers=1", *extra,
    ]


def _checkpoints_written(last: Path):
    """A counter of the distinct last.ckpt files seen (each write replaces the file: another inode and
    mtime; inode numbers alone are reused)."""
    seen: set[tuple[int, int]] = set()

    def count() -> int:
        try:
            st = os.stat(last)
            seen.add((st.st_ino, st.st_mtime_ns))
        except FileNotFoundError:
            pass
        return len(seen)

    return count


def _kill_training(tmp_path, module: str, args: list[str], run: Path, *, points: list[tuple[int, float]]) -> list:
    """Kill ``module`` at each (k-th checkpoint, delay) in turn; returns (step resumed from, its checkpoint) pairs."""
    last, log = run / "checkpoints" / "last.ckpt", tmp_path / f"{module}.log"
    resumed = []
    for k, delay in points:
        already = _checkpoints_written(last)()
        _kill(module, args, tmp_path, log, lambda c=_checkpoints_written(last), k=k: c() >= k + already, delay,
              f"checkpoint {k} + {delay:.2f} s")
        assert last.is_file()
        keep = tmp_path / f"resume_from_{len(resumed)}.ckpt"
        keep.write_bytes(last.read_bytes())  # whole: torch.load below reads it
        resumed.append((_optimizer_steps(keep)[0], keep))
    return resumed


def _check_resumed(resumed: list, final_last: Path, steps: int) -> None:
    """The optimizer state came back at every resume: the per-parameter AdamW step counts of the
    final checkpoint equal the global step (a fresh optimizer after a resume at step k would count steps - k)."""
    for step, ckpt in resumed:
        got_step, exp_avg, counts = _optimizer_steps(ckpt)
        assert 0 < step < steps and set(counts) == {step}, (step, set(counts))
        assert exp_avg and any(bool(t.abs().sum() > 0) for t in exp_avg), "exp_avg is all zero"
    final_step, exp_avg, counts = _optimizer_steps(final_last)
    assert final_step == steps and set(counts) == {steps}, (final_step, set(counts))


def _tokenizer_kill_test(tmp_path, compose, points, steps, *extra: str):
    from safetensors.torch import load_file

    from tokenizer.train import train

    data = _tokenizer_images(tmp_path / "data")
    want = train(compose("tokenizer.train", _tokenizer_args(data, tmp_path / "want", steps, *extra)))
    assert want["global_step"] == steps
    run = tmp_path / "run"
    args = _tokenizer_args(data, run, steps, *extra)
    resumed = _kill_training(tmp_path, "tokenizer.train", args, run, points=points)
    output = _run_to_end("tokenizer.train", args, tmp_path, tmp_path / "rerun.log")
    assert f"trained {steps} steps" in output
    assert f"(step {resumed[-1][0]})" in output  # "resuming from .../last.ckpt (step k)"
    _check_resumed(resumed, run / "checkpoints" / "last.ckpt", steps)
    # The trained weights (model, EMA, discriminator), LeCAM's EMAs, both optimizers' states and both
    # LR schedules are those of the uninterrupted run, bit for bit.
    got = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ref = torch.load(tmp_path / "want" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert got["lr_schedulers"] == ref["lr_schedulers"] and len(ref["lr_schedulers"]) == 2
    assert len(got["optimizer_states"]) == len(ref["optimizer_states"]) == 2
    for g, r in zip(got["optimizer_states"], ref["optimizer_states"]):
        assert g["state"].keys() == r["state"].keys() and r["state"]
        for a, b in zip(g["state"].values(), r["state"].values()):
            assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert {int(s["step"]) for s in ref["optimizer_states"][1]["state"].values()} == {steps - 1}  # from step 1
    assert got["state_dict"].keys() == ref["state_dict"].keys()
    for part in ("model.", "ema.", "loss_module.discriminator.", "loss_module.ema_"):
        keys = [k for k in ref["state_dict"] if k.startswith(part)]
        assert keys and all(torch.equal(got["state_dict"][k], ref["state_dict"][k]) for k in keys), part
    assert ref["state_dict"]["loss_module.ema_real_logits_mean"].abs() > 0
    # The exported EMA weights too: the EMA update and codebook revival of step k run before the
    # checkpoint of step k is written (tokenizer.lightning_module._AfterOptimizerStep).
    exported = load_file(run / "tokenizer.safetensors")
    want = load_file(tmp_path / "want" / "tokenizer.safetensors")
    assert exported.keys() == want.keys()
    assert all(torch.equal(exported[name], want[name]) for name in want), [
        name for name in want if not torch.equal(exported[name], want[name])][:3]


def test_tokenizer_train_killed_and_rerun_continues_from_its_checkpoint(tmp_path, compose):
    rng = random.Random(f"{SEED}-tokenizer")
    _tokenizer_kill_test(tmp_path, compose, [(rng.randint(1, 4), rng.uniform(0, 0.05))], steps=16)


@pytest.mark.slow
def test_tokenizer_train_survives_several_kills(tmp_path, compose):
    rng = random.Random(f"{SEED}-tokenizer-slow")
    _tokenizer_kill_test(tmp_path, compose, [(rng.randint(1, 3), rng.uniform(0, 0.1)) for _ in range(3)], steps=30)


@pytest.mark.slow
def test_vae_tokenizer_train_killed_and_rerun_draws_the_same_noise(tmp_path, compose):
    """A VAE tokenizer decodes posterior samples: their noise comes from the run's seed and step,
    so the resumed run is the uninterrupted one bit for bit."""
    rng = random.Random(f"{SEED}-tokenizer-vae")
    _tokenizer_kill_test(tmp_path, compose, [(rng.randint(1, 4), rng.uniform(0, 0.05))], 16, "model.quantizer=vae",
                         "loss.rate_weight=0")  # experiment=small's rate term is for FSQ codes


# ----------------------------------------------------------------------------------------- generator.train


def _generator_args(tmp_path: Path, run: Path, steps: int) -> list[str]:
    return [
        "experiment=demo", f"run_dir={run}", f"data.root={tmp_path}/demo", "data.builtin=demo",
        "data.demo_train_per_class=12", "data.demo_val_per_class=2", f"tokenizer.spec={TOKENIZER}/config.yaml",
        f"tokenizer.checkpoint={TOKENIZER}/tokenizer.bin", f"cache.dir={tmp_path}/cache", "cache.batch_size=32",
        "cache.num_workers=0", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.mlp_dim=64",
        "batch_size=16", "num_workers=0", f"trainer.max_steps={steps}", "trainer.max_time=null",
        "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true", "trainer.val_check_interval=1000",
        "checkpoint_every_n_steps=2", "sample_every_n_steps=0",
        "sampling.num_steps=4", "fit_sampling.enabled=false",
    ]


def _generator_kill_test(tmp_path, compose, points, steps):
    from generator.train import train

    # The reference builds the demo data and the token cache the killed runs then share (read only).
    want = train(compose("generator.train", _generator_args(tmp_path, tmp_path / "want", steps)))
    assert want["global_step"] == steps
    run = tmp_path / "run"
    args = _generator_args(tmp_path, run, steps)
    resumed = _kill_training(tmp_path, "generator.train", args, run, points=points)
    output = _run_to_end("generator.train", args, tmp_path, tmp_path / "rerun.log")
    assert f"trained {steps} steps" in output and "resuming from" in output
    _check_resumed(resumed, run / "checkpoints" / "last.ckpt", steps)
    # Not the same weights: the masks (and class dropout) are drawn from the global torch RNG, which a
    # Lightning checkpoint does not hold, so after a resume each step masks other tokens.
    from generator import load_generator

    got, ref = load_generator(run / "generator.safetensors"), load_generator(tmp_path / "want" / "generator.safetensors")
    assert got.config == ref.config
    assert all(torch.isfinite(p).all() for p in got.parameters())


def test_generator_train_killed_and_rerun_continues_from_its_checkpoint(tmp_path, compose):
    rng = random.Random(f"{SEED}-generator")
    _generator_kill_test(tmp_path, compose, [(rng.randint(1, 6), rng.uniform(0, 0.05))], steps=40)


@pytest.mark.slow
def test_generator_train_survives_several_kills(tmp_path, compose):
    rng = random.Random(f"{SEED}-generator-slow")
    _generator_kill_test(tmp_path, compose, [(rng.randint(1, 5), rng.uniform(0, 0.1)) for _ in range(3)], steps=60)


# ----------------------------------------------------------------------------------------- last.ckpt is whole or absent


def test_a_failed_checkpoint_write_leaves_the_old_file(tmp_path, monkeypatch):
    from titok_core import trainer as trainer_mod
    from titok_core.trainer import AtomicCheckpointIO

    io_ = AtomicCheckpointIO()
    path = tmp_path / "io" / "last.ckpt"
    old, new = {"global_step": 1, "w": torch.arange(1000.0)}, {"global_step": 2, "w": torch.arange(1000.0) * 2}
    io_.save_checkpoint(old, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        io_.save_checkpoint({**new, "bad": Unpicklable()}, path)

    real_save = torch.save

    def dies_half_way(obj, f):  # what a kill leaves: part of the bytes written, then nothing
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(trainer_mod.torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        io_.save_checkpoint(new, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp file left behind

    (path.parent / ".last.ckpt.abc123.tmp").write_bytes(b"half a checkpoint")  # what a SIGKILL leaves
    io_.save_checkpoint(new, path)
    assert torch.load(path, weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_both_trainers_write_checkpoints_atomically(tmp_path):
    from titok_core.trainer import AtomicCheckpointIO, build_trainer

    tr = build_trainer(trainer={"max_steps": 1, "accelerator": "cpu", "devices": 1}, run_dir=tmp_path, batch_size=1,
                       callbacks=[], logger=None, name="t")
    assert isinstance(tr.strategy.checkpoint_io, AtomicCheckpointIO)
    tr.strategy.checkpoint_io.save_checkpoint({"global_step": 7}, tmp_path / "io" / "last.ckpt")
    assert torch.load(tmp_path / "io" / "last.ckpt", weights_only=True) == {"global_step": 7}
    assert sorted(p.name for p in (tmp_path / "io").iterdir()) == ["last.ckpt"]  # no temp file left


_WRITER = """
import sys, torch
from titok_core.trainer import AtomicCheckpointIO
io_, path, i = AtomicCheckpointIO(), sys.argv[1], 0
print("ready", flush=True)
while True:
    i += 1
    io_.save_checkpoint({"global_step": i, "w": torch.full((4_000_000,), float(i))}, path)
"""


@pytest.mark.slow
def test_killing_the_checkpoint_writer_never_leaves_a_truncated_last_ckpt(tmp_path):
    """SIGKILL a process that rewrites a 16 MB last.ckpt in a loop, at random moments: the file is
    always a whole checkpoint, one of those written."""
    rng = random.Random(f"{SEED}-writer")
    path = tmp_path / "last.ckpt"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    for attempt in range(4):
        job = subprocess.Popen([sys.executable, str(script), str(path)], cwd=tmp_path, env=job_env(),
                               stdout=subprocess.PIPE, start_new_session=True)
        assert job.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 1.0))
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        c = torch.load(path, weights_only=True)
        assert torch.equal(c["w"], torch.full((4_000_000,), float(c["global_step"]))), attempt
