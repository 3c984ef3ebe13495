"""Train a MaskGIT generator on cached TiTok tokens (Lightning + Hydra).

    python -m generator.train                          # the built-in demo, CPU, ~5 minutes
    python -m generator.train experiment=imagenet_l32 data.root=/data/imagenet tokenizer.checkpoint=...

Steps: build the demo dataset if asked and missing -> build the token cache if missing ->
train (resuming from ``<run_dir>/checkpoints/last.ckpt`` after a kill) -> export the EMA
weights with their config, sampling settings and tokenizer as ``<run_dir>/generator.safetensors``
-> where ``fit_sampling.enabled``, fit the sampling settings to the data (generator.fit_sampling).
The run itself (directory, identity, resume, export) is :mod:`titok_core.training`'s.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from generator.cache import CACHE_RANGES, TokenDataset, open_cache, tokenizer_fingerprint
from generator.fit_sampling import FIT_SAMPLING_RANGES, fit_after_training
from generator.lightning_module import MaskGITModule, SampleGrid
from generator.presets import resolve_model
from generator.sampler import SAMPLING_RANGES, sampling_overrides
from generator.token_data import TokenDataModule
from titok_core import training
from titok_core.checkpoints import read_model_extra
from titok_core.cli import Ranges, hydra_entry
from titok_core.errors import exit_on_user_error
from titok_core.trainer import ema_callback
from tokenizer import load_tokenizer, require_discrete

log = logging.getLogger(__name__)
# run.json keys of runs recorded before an option was renamed: old -> new.
RENAMED_RECORD_KEYS = {"recipe.cache_flip": "recipe.hflip", "recipe.optim.ema_max_decay": "recipe.optim.ema_decay"}
# run.json keys added since, with the value the runs recorded before them had.
ADDED_RECORD_KEYS = {"recipe.optim.mask_schedule": "arccos", "recipe.optim.loss_weighting": "official"}


def prepare_cache(cfg: DictConfig, tokenizer, run: training.Run | None = None) -> Path:
    """Make the dataset (demo) and the token cache when missing; returns the cache directory.

    run: the run being trained (its dataset identity is kept there); None: the run ``cfg`` describes."""
    run = run or training.start(cfg, package="generator")
    identity = training.prepare_data(run, image_size=tokenizer.image_size)  # a cache of other data is refused
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    cache_dir, _ = open_cache(
        tokenizer=tokenizer, tokenizer_source=str(cfg.tokenizer.spec), data=cfg.data, cache=cfg.cache, device=device,
        identity=identity,
        refuse_to_build=("with several nodes, build it first with python -m generator.cache"
                         if cfg.trainer.num_nodes > 1 else None),
    )
    return cache_dir


def _recorded_path(spec: str | None) -> str | None:
    """A spec or checkpoint as the generator's file records it: a local file or folder by its absolute
    path (so the file works from any directory), anything else (a preset, a repo id) as given."""
    if spec is None:
        return None
    return os.path.abspath(spec) if os.path.exists(str(spec)) else str(spec)


def train(cfg: DictConfig) -> dict:
    """Run the whole job; returns paths and final figures."""
    run = training.start(cfg, package="generator")
    tokenizer = load_tokenizer(cfg.tokenizer.spec, cfg.tokenizer.checkpoint)
    require_discrete(tokenizer, "MaskGIT training")
    cache_dir = prepare_cache(cfg, tokenizer, run)
    data = TokenDataset(cache_dir)
    manifest = data.manifest
    num_classes = len(manifest["classes"]) or int(data.labels.max()) + 1
    model_config, sampling = resolve_model(
        OmegaConf.to_container(cfg.model, resolve=True), codebook_size=manifest["codebook_size"],
        num_tokens=manifest["num_tokens"], num_classes=num_classes,
    )
    sampling.update(sampling_overrides(cfg.sampling))
    datamodule = TokenDataModule(data, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                 val_fraction=cfg.val_fraction, seed=cfg.seed, on_device=cfg.data_on_device)
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    module = MaskGITModule(model_config=model_config, max_steps=cfg.trainer.max_steps, fused_adamw=cfg.fused_adamw,
                           compile=cfg.compile, **optim)
    grid = SampleGrid(tokenizer=tokenizer, sampling=sampling, every_n_steps=cfg.sample_every_n_steps,
                      num_classes=min(cfg.sample_classes, num_classes), out_dir=run.dir / "samples")
    tr, has_val = cfg.trainer, datamodule.has_val
    ema = [ema_callback(cfg.optim.ema_decay)] if cfg.optim.ema else []
    trainer = training.fit(
        run, module, datamodule=datamodule, callbacks=[*ema, grid],
        trainer_args=dict(
            val_check_interval=min(tr.val_check_interval, max(1, datamodule.train_batches())) if has_val else None,
            limit_val_batches=tr.limit_val_batches if has_val else 0, check_val_every_n_epoch=None if has_val else 1),
        identity={"tokenizer": tokenizer_fingerprint(tokenizer), "model": model_config}, recipe={"optim": optim},
        renamed_record=RENAMED_RECORD_KEYS, added_record=ADDED_RECORD_KEYS,
    )
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    result = {"run_dir": str(run.dir), "global_step": trainer.global_step, "cache_dir": str(cache_dir)}
    out = training.export(run, trainer, config=module.model.config, state_dict=module.model.state_dict(), extra={
        "sampling": sampling,
        "tokenizer": {"spec": _recorded_path(cfg.tokenizer.spec), "checkpoint": _recorded_path(cfg.tokenizer.checkpoint)},
        "classes": manifest["classes"], "ema": bool(cfg.optim.ema), "metrics": metrics,
    })
    if out is not None:
        result.update(checkpoint=str(out), metrics=metrics)
        if cfg.fit_sampling.enabled:  # the sampling settings fitted to the data, written into the file
            result["fit_sampling"] = fit_after_training(out, cfg)
            grid.sampling = read_model_extra(out)["sampling"]
        if cfg.sample_every_n_steps:
            result["samples"] = str(grid.write(module, trainer.global_step))
    return result


def _main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        result = train(cfg)
    if "checkpoint" in result:
        print(f"trained {result['global_step']} steps; checkpoint: {result['checkpoint']}")
        if "samples" in result:
            print(f"samples: {result['samples']}")
        if result.get("fit_sampling"):
            print(result["fit_sampling"])
        print(f"sample from it: python -m sampling.generate generator.checkpoint={result['checkpoint']} class=0 n=16")


main = hydra_entry(
    config="generator/train", description=__doc__, scalar_groups={"model": "model.preset"},
    renamed={"model.sampling": "sampling", "model.seq_len": "model.num_tokens", "cache.flip": "data.hflip",
             "optim.ema_max_decay": "optim.ema_decay"},
    ranges=training.TRAINER_RANGES | CACHE_RANGES | SAMPLING_RANGES | FIT_SAMPLING_RANGES | Ranges(
        at_least_one=("sample_classes",),
        not_negative=("sample_every_n_steps", "optim.label_smoothing", "optim.class_dropout")),
)(_main)


if __name__ == "__main__":
    main()
