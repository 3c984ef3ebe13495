"""The global batch (trainer.global_batch -> accumulate_grad_batches, logged once) and the loggers
(logger=csv | tensorboard | wandb, a list of them, or null) of generator.train, on tiny demo runs in
this process."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest

from generator.train import _main, train
from titok_core.trainer import accumulation_for, build_trainer

from row_log import record_rows


def _args(fx: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    tok = fx / "tokenizer"
    return [
        "experiment=demo", f"run_dir={run_dir}", f"data.root={data}/demo", "data.builtin=demo",
        "data.demo_train_per_class=12", "data.demo_val_per_class=2", f"tokenizer.spec={tok}/config.yaml",
        f"tokenizer.checkpoint={tok}/tokenizer.bin", f"cache.dir={data}/cache", "cache.batch_size=32",
        "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.mlp_dim=64", "batch_size=4",
        "val_fraction=0", "sample_every_n_steps=0", "checkpoint_every_n_steps=1000", "trainer.max_time=null",
        "trainer.max_steps=3", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.log_every_n_steps=1",
        "fit_sampling.enabled=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def demo(compose, official_tiny, tmp_path_factory):
    """compose(run_dir, *overrides) -> the config of a tiny demo run; the images and their token
    cache are made once for the module."""
    from generator.train import prepare_cache
    from tokenizer import load_tokenizer

    data = tmp_path_factory.mktemp("logger-data")
    cfg = compose("generator.train", _args(official_tiny, data, data / "unused"))
    prepare_cache(cfg, load_tokenizer(cfg.tokenizer.spec, cfg.tokenizer.checkpoint))
    return lambda run_dir, *extra: compose("generator.train", _args(official_tiny, data, run_dir, *extra))


def _global_batch_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("global batch")]


# --------------------------------------------------------------------------- the global batch

def test_global_batch_sets_accumulation_from_devices_and_nodes(tmp_path, caplog):
    def built(**trainer):
        return build_trainer(trainer={"accelerator": "cpu", "strategy": "ddp", "max_steps": 1, **trainer},
                             run_dir=tmp_path, batch_size=4, callbacks=[], logger=None, name="t")

    with caplog.at_level(logging.INFO, logger="titok_core.trainer"):
        assert built(devices=2, global_batch=16).accumulate_grad_batches == 2
    assert _global_batch_lines(caplog) == ["global batch 16 = 4 per device x 2 device(s) x 1 node(s) x 2 accumulation"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="titok_core.trainer"):
        assert built(devices=2, num_nodes=2, global_batch=16).accumulate_grad_batches == 1
        assert built(devices=2, accumulate_grad_batches=3).accumulate_grad_batches == 3  # no global_batch: as given
    assert _global_batch_lines(caplog) == ["global batch 16 = 4 per device x 2 device(s) x 2 node(s) x 1 accumulation",
                                           "global batch 24 = 4 per device x 2 device(s) x 1 node(s) x 3 accumulation"]
    with pytest.raises(ValueError, match=r"^trainer.global_batch=24 is not a multiple of batch_size x devices x nodes = "
                                         r"4 x 4 = 16$"):
        built(devices=2, num_nodes=2, global_batch=24)
    # The recipes of docs/multinode.md: 2048 at 64 a device on 8 GPUs and on 4 nodes x 8.
    assert accumulation_for(global_batch=2048, batch_size=64, world_size=8) == 4
    assert accumulation_for(global_batch=2048, batch_size=64, world_size=32) == 1


def test_a_run_with_a_global_batch_accumulates_and_says_so_once(demo, tmp_path, caplog, monkeypatch):
    rows = tmp_path / "rows"
    rows.mkdir()
    record_rows(rows, monkeypatch.setattr)
    cfg = demo(tmp_path / "run", "trainer.global_batch=16", "trainer.max_steps=2", "logger=null")
    with caplog.at_level(logging.INFO):
        result = train(cfg)
    assert result["global_step"] == 2
    assert _global_batch_lines(caplog) == ["global batch 16 = 4 per device x 1 device(s) x 1 node(s) x 4 accumulation"]
    # 2 optimizer steps of 4 batches each (Lightning reads one batch ahead: maybe one more drawn).
    assert len((rows / "rank0.txt").read_text().splitlines()) in (8, 9)
    assert not (tmp_path / "run" / "logs").exists()  # logger=null: no logger


def test_a_global_batch_that_does_not_divide_is_one_line(demo, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _main(demo(tmp_path / "run", "trainer.global_batch=10"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: trainer.global_batch=10 is not a multiple of batch_size x devices x nodes = 4 x 1 = 4"]


# --------------------------------------------------------------------------- loggers

def _csv_losses(run_dir: Path) -> list[float]:
    files = sorted((run_dir / "logs").glob("version_*/metrics.csv"))
    assert len(files) == 1, files
    with open(files[0], newline="") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def _tensorboard_losses(run_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folders = sorted((run_dir / "tensorboard").glob("version_*"))
    assert len(folders) == 1 and list(folders[0].glob("events.out.tfevents.*")), folders
    events = EventAccumulator(str(folders[0]))
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"], events.Tags()["scalars"]
    return [e.value for e in events.Scalars("train/loss")]


@pytest.mark.parametrize("logger", ["csv", "[csv]"])
def test_csv_logger_writes_the_training_loss(demo, tmp_path, logger):
    train(demo(tmp_path / "run", f"logger={logger}"))
    losses = _csv_losses(tmp_path / "run")
    assert len(losses) == 3 and all(loss > 0 for loss in losses)  # one row a step (log_every_n_steps=1)
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_tensorboard_logger_writes_the_training_loss(demo, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e '.[tensorboard]')")
    train(demo(tmp_path / "run", "logger=tensorboard"))
    losses = _tensorboard_losses(tmp_path / "run")
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    assert not (tmp_path / "run" / "logs").exists()


def test_a_list_of_loggers_writes_to_each(demo, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e '.[tensorboard]')")
    train(demo(tmp_path / "run", "logger=[csv,tensorboard]"))
    assert _csv_losses(tmp_path / "run") == pytest.approx(_tensorboard_losses(tmp_path / "run"), rel=1e-6)


def test_wandb_logger_runs_offline_unless_told(demo, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[wandb]')")
    import os

    monkeypatch.setenv("WANDB_MODE", "unset")  # recorded, so that the deletion below is undone after the test
    monkeypatch.delenv("WANDB_MODE")  # as a user who never set it
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    try:
        train(demo(tmp_path / "run", "logger=wandb"))
    finally:
        wandb.finish()
    assert os.environ["WANDB_MODE"] == "offline"
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "no offline run written under run_dir/wandb"
