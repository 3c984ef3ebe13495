"""Several nodes without SLURM, on this machine: two "nodes" of one process each (gloo on CPU).

Each node is launched the way Lightning's LightningEnvironment expects a manual multi-node launch
(the same command on every node, with MASTER_ADDR, MASTER_PORT, NODE_RANK and WORLD_SIZE in the
environment; Lightning starts trainer.devices processes on each node itself), or (slow) with
``torchrun -m`` (Lightning's TorchElasticEnvironment). The checks:

* training (generator.train, trainer.num_nodes=2 trainer.devices=1, a prebuilt token cache): the
  ranks draw disjoint shares of the cache (recorded from the test side: tests/row_log.py),
  only rank 0 writes into the shared run directory, the global batch is stated once, and the
  weights (EMA, raw, AdamW moments) equal, bit for bit, those of one node with two devices;
* the token cache (generator.cache, Lightning Fabric): each node writes its own shards and the
  merged cache equals a one-process build byte for byte.

Which files a process wrote is seen with an audit hook installed from the test (``WATCH``), and
which rows it drew with a wrapper installed from the test (``row_log``), not with anything in the
code under test.

Every process runs with OMP_NUM_THREADS=1: Lightning otherwise gives each process
cpu_count // (processes on this node) threads, so one node with two processes and two nodes of
one process would run their matmuls with different thread counts (different summation orders).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from row_log import ROWS_LOG_ENV
from row_log import SITECUSTOMIZE as ROWS

STEPS, BATCH = 4, 16
# What a scheduler or launcher may have left in this environment; each launch here sets its own.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
               "MASTER_PORT", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def _free_port() -> int:
    """A port for a rendezvous that the nodes bind seconds later.

    Not one the kernel hands out (bind to port 0): until node 0 binds it, the same port can go to any other
    socket, an outgoing connection of another test's ranks or Lightning's own free-port search, and node 0
    then fails at start-up. So it is drawn at random from below the kernel's ephemeral range and checked
    free now."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(max(1024, low - 12000), low))
    random.SystemRandom().shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below {low}")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_", "OMPI_", "PMI_"))}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def _launch(module: str, args: list[str], *, logs: Path, nodes: int = 1, env: dict | None = None,
            torchrun: bool = False) -> list:
    """Start ``python -m module args`` once per node and return the running processes.

    nodes > 1: as Lightning's LightningEnvironment expects (MASTER_ADDR, MASTER_PORT, NODE_RANK and
    WORLD_SIZE in the environment) or, with ``torchrun``, as ``torchrun --nnodes N --nproc-per-node 1
    --node-rank R --master-addr --master-port -m module args`` (Lightning's TorchElasticEnvironment).
    Output goes to files under ``logs`` (pipes could fill up and stall a rank)."""
    logs.mkdir(parents=True, exist_ok=True)
    port = str(_free_port())
    procs = []
    for node in range(nodes):
        node_env = _env(**(env or {}))
        command = [sys.executable, "-m", module]
        if torchrun:
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", "1",
                       "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", port, "-m", module]
        elif nodes > 1:
            node_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node), WORLD_SIZE=str(nodes))
        with open(logs / f"node{node}.out", "w") as out, open(logs / f"node{node}.err", "w") as err:
            # A session of its own: a failure kills the node with the processes Lightning started in it.
            procs.append(subprocess.Popen([*command, *args, f"hydra.run.dir={logs}/hydra-node{node}"], cwd=REPO,
                                          env=node_env, stdout=out, stderr=err, start_new_session=True))
    return procs


def _wait(procs: list, logs: Path, *, timeout: float = 300) -> list[str]:
    """Wait for every node; returns each node's stdout. When one fails (the others would wait for it
    at the next collective) or time runs out, the rest are killed and the test fails with its stderr."""
    deadline = time.monotonic() + timeout
    while any(proc.poll() is None for proc in procs):
        failed = [node for node, proc in enumerate(procs) if proc.returncode not in (None, 0)]
        if failed or time.monotonic() > deadline:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            node = failed[0] if failed else 0
            pytest.fail(f"node {node} {'exited ' + str(procs[node].returncode) if failed else 'timed out'}:\n"
                        + (logs / f"node{node}.err").read_text()[-3000:])
        time.sleep(0.2)
    for node, proc in enumerate(procs):
        assert proc.returncode == 0, f"node {node} exited {proc.returncode}:\n" + (logs / f"node{node}.err").read_text()[-3000:]
    return [(logs / f"node{node}.out").read_text() for node in range(len(procs))]


def _output(logs: Path, node: int = 0) -> str:
    """Everything node ``node`` printed (Hydra logs to stdout, Lightning to stderr)."""
    return (logs / f"node{node}.out").read_text() + (logs / f"node{node}.err").read_text()


# Imported at start-up through PYTHONPATH (as sitecustomize): an audit hook that notes the name of
# every file the process moves into place (atomic_path's os.replace: cache shards, run.json,
# config.yaml, checkpoints) in <TITOK_TEST_WATCH>/node<NODE_RANK, or torchrun's GROUP_RANK>.txt. It
# only watches: the code under test is the one every user runs.
WATCH = """
import os, sys

def _watch(event, args):
    if event == "os.rename":
        node = os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "-"))
        with open(os.path.join(os.environ["TITOK_TEST_WATCH"], "node%s.txt" % node), "a") as f:
            f.write(os.path.basename(str(args[1])) + "\\n")

if os.environ.get("TITOK_TEST_WATCH"):
    sys.addaudithook(_watch)
"""


def _site(tmp: Path) -> dict:
    """The environment that installs the watch and the row log (each only where its variable is set)."""
    (tmp / "site").mkdir(exist_ok=True)
    (tmp / "site" / "sitecustomize.py").write_text(WATCH + ROWS)
    return {"PYTHONPATH": os.pathsep.join([str(tmp / "site"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def _watched(tmp: Path) -> tuple[dict, Path]:
    """(environment that installs the watch, the folder it writes to)."""
    (tmp / "moved").mkdir()
    return {"TITOK_TEST_WATCH": str(tmp / "moved"), **_site(tmp)}, tmp / "moved"


def _moved(folder: Path, node: int, prefix: str = "") -> list[str]:
    path = folder / f"node{node}.txt"
    names = path.read_text().split() if path.is_file() else []
    return sorted(n for n in names if n.startswith(prefix))


# --------------------------------------------------------------------------- training

def _train_args(fx: Path, tmp: Path, run: str) -> list[str]:
    tok = fx / "tokenizer"
    return [
        "experiment=demo", f"run_dir={tmp}/{run}", f"data.root={tmp}/demo", "data.builtin=demo",
        "data.demo_train_per_class=12", "data.demo_val_per_class=2", f"tokenizer.spec={tok}/config.yaml",
        f"tokenizer.checkpoint={tok}/tokenizer.bin", f"cache.dir={tmp}/cache", "cache.batch_size=32",
        "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.mlp_dim=64", f"batch_size={BATCH}",
        "val_fraction=0", "sample_every_n_steps=0", "checkpoint_every_n_steps=1000", "logger=null",
        f"trainer.max_steps={STEPS}", "trainer.max_time=null", "trainer.accelerator=cpu", "trainer.strategy=ddp",
        "fit_sampling.enabled=false",
    ]


def _prebuilt_cache(compose, fx: Path, tmp: Path) -> Path:
    """The demo images and their token cache, built here in one process (several nodes never build it)."""
    from generator.train import prepare_cache
    from tokenizer import load_tokenizer

    cfg = compose("generator.train", _train_args(fx, tmp, "unused"))
    return prepare_cache(cfg, load_tokenizer(cfg.tokenizer.spec, cfg.tokenizer.checkpoint))


def _expected_rows(cache: Path, *, rank: int, world_size: int) -> list[list[int]]:
    """The cache rows of each batch rank ``rank`` should draw: Lightning's DistributedSampler over
    the training split (seed 0, epoch 0), cut into batches."""
    from generator.cache import TokenDataset
    from generator.token_data import TokenDataModule, epoch_indices

    data = TokenDataModule(TokenDataset(cache), batch_size=BATCH, val_fraction=0, seed=0)
    mine = data.train_positions[epoch_indices(len(data.train_positions), seed=0, epoch=0, shuffle=True,
                                              rank=rank, world_size=world_size)]
    return [mine[i * BATCH:(i + 1) * BATCH].tolist() for i in range(STEPS)]


def _drawn(folder: Path, rank: int) -> list[list[int]]:
    lines = (folder / f"rank{rank}.txt").read_text().splitlines()
    return [[int(r) for r in line.split()] for line in lines]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The exported EMA weights, the trained weights and AdamW's moments of a finished run."""
    from safetensors.torch import load_file

    ema = load_file(run_dir / "generator.safetensors")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    raw = ckpt["current_model_state"]  # WeightAveraging stores the EMA as state_dict, the weights here
    moments = {f"adam/{i}/{name}": v for i, state in ckpt["optimizer_states"][0]["state"].items()
               for name, v in state.items()}
    return {**{f"ema/{k}": v for k, v in ema.items()}, **{f"raw/{k}": v for k, v in raw.items()}, **moments}


def test_several_nodes_never_build_the_cache_themselves(compose, official_tiny, tmp_path):
    from generator.train import prepare_cache
    from tokenizer import load_tokenizer

    cfg = compose("generator.train", [*_train_args(official_tiny, tmp_path, "run"), "trainer.num_nodes=2"])
    with pytest.raises(FileNotFoundError, match="with several nodes, build it first with python -m generator.cache"):
        prepare_cache(cfg, load_tokenizer(cfg.tokenizer.spec, cfg.tokenizer.checkpoint))
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("launcher, on_device", [
    ("lightning", "false"),  # a DataLoader; Lightning swaps in a DistributedSampler
    pytest.param("lightning", "true", marks=pytest.mark.slow),  # the whole cache on the device, EpochOrder
    pytest.param("torchrun", "false", marks=pytest.mark.slow),
])
def test_two_nodes_train_like_one_node_with_two_devices(compose, official_tiny, tmp_path, launcher, on_device):
    cache = _prebuilt_cache(compose, official_tiny, tmp_path)
    extra = [f"data_on_device={on_device}"]
    rows_nodes, rows_devices = tmp_path / "rows-nodes", tmp_path / "rows-devices"
    rows_nodes.mkdir(), rows_devices.mkdir()
    watch, moved = _watched(tmp_path)
    # Both launches at once (4 processes); each its own run dir, rendezvous port and row log.
    nodes = _launch("generator.train", [*_train_args(official_tiny, tmp_path, "nodes"), *extra,
                                        "trainer.num_nodes=2", "trainer.devices=1"],
                    logs=tmp_path / "logs-nodes", nodes=2, env={ROWS_LOG_ENV: str(rows_nodes), **watch},
                    torchrun=launcher == "torchrun")
    devices = _launch("generator.train", [*_train_args(official_tiny, tmp_path, "devices"), *extra,
                                          "trainer.num_nodes=1", "trainer.devices=2"],
                      logs=tmp_path / "logs-devices", env={ROWS_LOG_ENV: str(rows_devices), **_site(tmp_path)})
    out_nodes = _wait(nodes, tmp_path / "logs-nodes")
    out_devices = _wait(devices, tmp_path / "logs-devices")

    assert f"trained {STEPS} steps" in out_nodes[0] and "checkpoint" not in out_nodes[1]  # rank 0 exports, alone
    assert f"trained {STEPS} steps" in out_devices[0]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in _output(tmp_path / "logs-nodes", 1)
    # Rank 0 alone records the run, checkpoints and exports (the run dir is shared, as on a cluster).
    assert {"run.json", "config.yaml"} <= set(_moved(moved, 0))
    assert not {"run.json", "config.yaml", "last.ckpt", "generator.safetensors"} & set(_moved(moved, 1)), _moved(moved, 1)
    # The global batch is stated once per run, by rank 0 (the second device's process shares node 0's output).
    said = _output(tmp_path / "logs-nodes", 0) + _output(tmp_path / "logs-nodes", 1)
    assert said.count("global batch") == 1
    assert "global batch 32 = 16 per device x 1 device(s) x 2 node(s) x 1 accumulation" in said
    said = _output(tmp_path / "logs-devices")
    assert said.count("global batch") == 1
    assert "global batch 32 = 16 per device x 2 device(s) x 1 node(s) x 1 accumulation" in said

    # (a) Disjoint shares: each rank drew exactly its DistributedSampler share (the Lightning
    # fetcher reads one batch ahead, so a rank may have drawn one batch beyond the last step).
    for folder in (rows_nodes, rows_devices):
        drawn = [_drawn(folder, rank)[:STEPS] for rank in range(2)]
        for rank in range(2):
            assert drawn[rank] == _expected_rows(cache, rank=rank, world_size=2)
        mine = [{r for batch in d for r in batch} for d in drawn]
        assert len(mine[0]) == len(mine[1]) == STEPS * BATCH and not mine[0] & mine[1]

    # (b) The same weights: two ranks' gradients are summed by one addition (a + b == b + a in
    # floating point), so the order gloo reduces in cannot change a bit.
    a, b = _weights(tmp_path / "nodes"), _weights(tmp_path / "devices")
    assert a.keys() == b.keys() and len(a) > 10
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    # ... after real steps: the EMA trails the weights, and AdamW holds moments.
    assert any(k.startswith("adam/") for k in a)
    assert not all(torch.equal(a[k], a[k.replace("raw/model.", "ema/")]) for k in a if k.startswith("raw/model."))


# --------------------------------------------------------------------------- token cache

def test_two_nodes_build_the_token_cache_like_one_process(compose, official_tiny, tmp_path):
    from generator.cache import _main as cache_main  # python -m generator.cache, without a new interpreter
    from titok_core.builtin import make_builtin_dataset

    tok = official_tiny / "tokenizer"
    make_builtin_dataset("demo", tmp_path / "demo", size=64, demo_train_per_class=12, demo_val_per_class=2)
    env, moved = _watched(tmp_path)
    args = [f"data.root={tmp_path}/demo", f"tokenizer.spec={tok}/config.yaml", f"tokenizer.checkpoint={tok}/tokenizer.bin",
            "cache.batch_size=16", "cache.num_workers=0", "trainer.accelerator=cpu"]
    nodes = _launch("generator.cache", [*args, f"cache.dir={tmp_path}/nodes", "trainer.num_nodes=2", "trainer.devices=1",
                                        "trainer.strategy=ddp"], logs=tmp_path / "logs-nodes", nodes=2, env=env)
    # Meanwhile the same command with one process, run here (with one thread, as each node has).
    torch.set_num_threads(1)
    cache_main(compose("generator.cache", [*args, f"cache.dir={tmp_path}/single"]))
    out = _wait(nodes, tmp_path / "logs-nodes")

    # 120 images in shards of 16: 8 shards; node r wrote those with i % 2 == r, and no others.
    assert "240 sequences of 8 tokens from 120 images" in out[0] and "token cache" not in out[1]
    assert _moved(moved, 0, "shard_") == [f"shard_{i:06d}.npz" for i in (0, 2, 4, 6)]
    assert _moved(moved, 1, "shard_") == [f"shard_{i:06d}.npz" for i in (1, 3, 5, 7)]
    assert _moved(moved, 1, "tokens") == _moved(moved, 1, "manifest") == []  # rank 0 merges, alone
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in _output(tmp_path / "logs-nodes", 1)

    for name in ("tokens.npy", "labels.npy", "manifest.json"):
        assert (tmp_path / "nodes" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    assert json.loads((tmp_path / "nodes" / "manifest.json").read_text())["num_sequences"] == 240
    assert not (tmp_path / "nodes" / "shards").exists()
