"""One training job from start to end: what tokenizer.train and generator.train share.

A trainer keeps what is its own (the model, the data, the loss) and hands the rest to this
module, in this order:

1. :func:`start`: the seed, and the run directory (``run_dir``, else
   ``runs/<package>/<name>[-<dataset folder>]``; see :func:`titok_core.runs.default_run_dir`);
2. :func:`prepare_data`: the built-in dataset written when asked (else the data must be there),
   and the dataset's identity (:func:`titok_core.runs.dataset_identity`);
3. :func:`fit`: the Lightning Trainer (:func:`titok_core.trainer.build_trainer`) with
   ``checkpoints/last.ckpt`` written every ``checkpoint_every_n_steps`` and at the end; the run's
   identity recorded or checked (``run.json``, :func:`titok_core.runs.start_run`) and this
   launch's whole config recorded (``config.yaml``), on rank 0; resuming from last.ckpt; ``fit``;
4. :func:`export`: ``<run_dir>/<package>.safetensors``, on rank 0.

Both trainers' configs have the same top level (name, run_dir, resume, seed, data, optim,
batch_size, num_workers, checkpoint_every_n_steps, logger, trainer); :data:`TRAINER_RANGES` are
the range checks of those options.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from titok_core import stopping_lightning
from titok_core.checkpoints import atomic_path, save_model_file
from titok_core.cli import Ranges
from titok_core.runs import builtin_for, dataset_identity, default_run_dir, require_dataset, start_run
from titok_core.trainer import PeriodicLast, SaveLast, build_trainer

log = logging.getLogger(__name__)

# Trainer settings that change what a run computes (max_steps and max_time only say how long).
IDENTITY_TRAINER_KEYS = ("precision", "gradient_clip_val", "accumulate_grad_batches", "global_batch")

# The range checks of the options every trainer has (see titok_core.cli.Ranges).
TRAINER_RANGES = Ranges(
    at_least_one=("batch_size", "checkpoint_every_n_steps", "trainer.max_steps", "trainer.accumulate_grad_batches",
                  "trainer.global_batch", "trainer.num_nodes", "trainer.log_every_n_steps"),
    positive=("optim.lr", "optim.end_lr"),
    not_negative=("seed", "num_workers", "optim.warmup_steps", "optim.weight_decay"),
)


@dataclass
class Run:
    """One training run: its config, package ("tokenizer" or "generator"), directory and built-in dataset."""

    cfg: DictConfig
    package: str
    dir: Path
    builtin: str | None
    data: dict | None = None  # the dataset's identity, once prepare_data has run
    resumed_from: int | None = None  # the step of the checkpoint fit resumed from
    checkpoints: Path = field(init=False)

    def __post_init__(self):
        self.checkpoints = self.dir / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.ckpt"


def start(cfg: DictConfig, *, package: str) -> Run:
    """Seed everything with ``cfg.seed`` and find the run directory; nothing is written yet."""
    import lightning as L

    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    builtin = builtin_for(cfg.data.root, cfg.data.builtin)
    run_dir = Path(cfg.run_dir or default_run_dir(package=package, name=cfg.name, root=cfg.data.root, builtin=builtin))
    return Run(cfg=cfg, package=package, dir=run_dir, builtin=builtin)


def prepare_data(run: Run, *, image_size: int) -> dict:
    """Write the built-in dataset at ``data.root`` when the run has one (images of ``image_size``
    pixels; returns at once when it is there), else require data at ``data.root``; returns (and
    keeps in ``run.data``) the identity of the split trained on."""
    data = run.cfg.data
    if run.builtin:
        from titok_core.builtin import make_builtin_dataset

        make_builtin_dataset(run.builtin, Path(data.root), size=image_size, seed=data.builtin_seed,
                             demo_train_per_class=data.demo_train_per_class,
                             demo_val_per_class=data.demo_val_per_class)
    else:
        require_dataset(data.root)
    run.data = dataset_identity(data.root, data.split, data.format)
    return run.data


def _container(node):
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def fit(run: Run, module, *, identity: dict, recipe: dict, callbacks: list = (), trainer_args: dict | None = None,
        renamed_record: dict | None = None, added_record: dict | None = None, on_trainer: Callable | None = None,
        **data):
    """Build the Trainer, record the run, resume and fit ``module``; returns the Trainer.

    identity: what the run is besides its dataset and recipe (the model config, the tokenizer ...);
    recipe: the trainer's own settings that change what it computes (loss and optim groups, ...):
    the record adds the dataset (``run.data`` and the built-in dataset), the batch size, seed,
    flips and :data:`IDENTITY_TRAINER_KEYS`. callbacks: the trainer's own, after last.ckpt's.
    trainer_args: Trainer arguments the trainer sets itself (validation cadence). renamed_record:
    keys of run.json files written before an option was renamed, added_record: keys added to the
    record since, with the value earlier runs had (see start_run). on_trainer: called with the
    Trainer once it is built, before anything is fitted (a module that optimises by hand takes over
    settings Lightning refuses with manual optimisation). data: what ``trainer.fit`` takes (the
    loaders or a datamodule).
    """
    cfg = run.cfg
    callbacks = [PeriodicLast(run.checkpoints, every_n_train_steps=cfg.checkpoint_every_n_steps), SaveLast(run.last),
                 *callbacks]
    trainer = build_trainer(trainer=_container(cfg.trainer), run_dir=run.dir, batch_size=cfg.batch_size,
                            callbacks=callbacks, logger=_container(cfg.logger), name=str(cfg.name),
                            **(trainer_args or {}))
    if on_trainer is not None:
        on_trainer(trainer)
    # After the Trainer is built (its settings are checked, and it knows each process's global rank on
    # any launcher); the other ranks start their work once rank 0 has checked the run.
    if trainer.is_global_zero:
        record = {"dataset": {**run.data, "builtin": run.builtin}, **identity,
                  "recipe": {**recipe, "batch_size": cfg.batch_size, "seed": cfg.seed, "hflip": cfg.data.hflip,
                             "trainer": {k: cfg.trainer.get(k) for k in IDENTITY_TRAINER_KEYS}}}
        if start_run(run.dir, record, resume=cfg.resume, renamed=renamed_record or {}, added=added_record or {}):
            log.info("%s: the same run, resuming", run.dir)
        with atomic_path(run.dir / "config.yaml") as tmp:  # this launch's whole config, for the record
            tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if run.last.is_file():
        # Our own Lightning checkpoints hold only tensors and plain containers: no pickled code.
        run.resumed_from = int(torch.load(run.last, map_location="cpu", weights_only=True, mmap=True)["global_step"])
        log.info("resuming from %s (step %d)", run.last, run.resumed_from)
    # The one call of trainer.fit. Ctrl-C and SIGTERM finish the step in hand and save it in last.ckpt,
    # then raise KeyboardInterrupt / Terminated (the entry point's one line, exit 130 / 143).
    stopping_lightning.fit(trainer, module, last=run.last, **data,
                 ckpt_path=str(run.last) if run.resumed_from is not None else None, weights_only=True)
    return trainer


def export(run: Run, trainer, *, config: dict, state_dict: dict, extra: dict) -> Path | None:
    """Rank 0: write ``<run_dir>/<package>.safetensors`` (what ``load_tokenizer`` / ``load_generator``
    read) and return its path; other ranks: None. ``extra`` gets the global step and the data
    (root, split, built-in dataset) besides."""
    if not trainer.is_global_zero:
        return None
    data = run.cfg.data
    out = run.dir / f"{run.package}.safetensors"
    extra = {"global_step": trainer.global_step,
             "data": {"root": str(data.root), "split": str(data.split), "builtin": run.builtin}, **extra}
    save_model_file(out, kind=run.package, config=config, state_dict=state_dict, extra=extra)
    return out
