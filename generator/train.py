"""Train a MaskGIT generator on cached TiTok tokens (Lightning + Hydra).

    python -m generator.train                          # the built-in demo, CPU, ~5 minutes
    python -m generator.train experiment=imagenet_l32 data.root=/data/imagenet tokenizer.checkpoint=...

Steps: build the demo dataset if asked and missing -> build the token cache if missing ->
train (resuming from ``<run_dir>/checkpoints/last.ckpt`` after a kill) -> export the EMA
weights with their config, sampling settings and tokenizer as ``<run_dir>/generator.safetensors``
-> where ``fit_sampling.enabled``, fit the sampling settings to the data (generator.fit_sampling).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from generator.cache import (TokenDataset, build_token_cache, check_cache, dataset_identity, default_cache_dir,
                             tokenizer_fingerprint)
from generator.presets import PRESETS as GENERATOR_PRESETS
from generator.token_data import TokenDataModule
from generator.lightning_module import MaskGITModule
from generator.sampler import sample_tokens
from tokenizer import load_tokenizer, require_discrete
from titok_core.checkpoints import read_model_extra, save_model_file
from titok_core.images import save_png
from titok_core.checkpoints import atomic_path
from titok_core.cli import hydra_entry
from titok_core.runs import builtin_for, dataset_fingerprint, default_run_dir, require_dataset, start_run
from titok_core.runtime import exit_on_user_error
from titok_core.trainer import PeriodicLast, SaveLast, build_trainer, ema_callback
from generator.sampler import sampling_overrides

log = logging.getLogger(__name__)
# Trainer settings that change what a run computes (max_steps and max_time only say how long).
IDENTITY_TRAINER_KEYS = ("precision", "gradient_clip_val", "accumulate_grad_batches", "global_batch")


def resolve_model(model: str | dict, *, codebook_size: int, num_tokens: int, num_classes: int) -> tuple[dict, dict]:
    """A preset name or kwargs dict -> (generator config, default sampling settings), sized to the data."""
    if isinstance(model, str):
        if model not in GENERATOR_PRESETS:
            raise ValueError(f"unknown generator preset {model!r}; known: {', '.join(GENERATOR_PRESETS)}")
        preset = GENERATOR_PRESETS[model]
        config, sampling = dict(preset["model"]), dict(preset["sampling"])
    else:
        config, sampling = dict(model), {}
        if "sampling" in config:
            raise ValueError("model.sampling was renamed: write the settings under sampling (sampling.guidance_scale=...)")
    for key, value in (("codebook_size", codebook_size), ("num_tokens", num_tokens), ("num_classes", num_classes)):
        if config.setdefault(key, value) != value:
            raise ValueError(f"generator {key}={config[key]} does not match the token cache ({value})")
    return config, sampling


def prepare_cache(cfg: DictConfig, tokenizer, *, fabric=None) -> Path:
    """Make the dataset (demo) and the token cache when missing; returns the cache directory."""
    from titok_core.formats import open_split

    root = Path(cfg.data.root)
    builtin = builtin_for(root, cfg.data.builtin)
    if builtin:
        from titok_core.builtin import make_builtin_dataset

        make_builtin_dataset(builtin, root, size=tokenizer.image_size, seed=cfg.data.builtin_seed,
                             demo_train_per_class=cfg.data.demo_train_per_class,
                             demo_val_per_class=cfg.data.demo_val_per_class)
    else:
        require_dataset(root)
    cache_dir = Path(cfg.cache.dir or default_cache_dir(root=root, split=cfg.data.split, tokenizer=tokenizer,
                                                       flip=cfg.cache.flip))
    data = dataset_identity(cfg.data.root, cfg.data.split, cfg.data.format)  # a cache of other data is refused
    if not (cache_dir / "manifest.json").is_file():
        if cfg.trainer.num_nodes > 1:
            raise FileNotFoundError(
                f"no token cache at {cache_dir}: with several nodes, build it first with python -m generator.cache"
            )
        dataset = open_split(cfg.data.root, cfg.data.split, data_format=cfg.data.format, resolution=tokenizer.image_size)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        build_token_cache(
            tokenizer=tokenizer, tokenizer_source=str(cfg.tokenizer.spec), dataset=dataset, out_dir=cache_dir,
            device=device, fabric=fabric, data=data, **{k: v for k, v in cfg.cache.items() if k != "dir"},
        )
    check_cache(cache_dir, fingerprint=tokenizer_fingerprint(tokenizer), resolution=tokenizer.image_size,
                flip=cfg.cache.flip, data=data)
    return cache_dir


class SampleGrid(Callback):
    """Every n steps, sample a few classes with the current weights and write a PNG grid."""

    def __init__(self, *, tokenizer, sampling: dict, every_n_steps: int, num_classes: int, out_dir: Path):
        self.tokenizer, self.sampling = tokenizer, sampling
        self.every, self.num_classes, self.out_dir = every_n_steps, num_classes, out_dir

    def write(self, pl_module: MaskGITModule, step: int) -> Path:

        model = pl_module.model
        was_training = model.training
        model.eval()
        labels = torch.arange(self.num_classes, device=pl_module.device) % model.num_classes
        rng = torch.Generator(device=pl_module.device).manual_seed(0)
        tokens = sample_tokens(model, labels.repeat_interleave(2), rng=rng, **self.sampling)
        self.tokenizer.to(pl_module.device)
        images = self.tokenizer.decode(tokens)
        model.train(was_training)
        return save_png(images, self.out_dir / f"samples_step{step:07d}.png", nrow=8)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step % self.every == 0 and trainer.is_global_zero:
            self.write(pl_module, step)


def train(cfg: DictConfig) -> dict:
    """Run the whole job; returns paths and final figures."""
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    builtin = builtin_for(cfg.data.root, cfg.data.builtin)
    run_dir = Path(cfg.run_dir or default_run_dir(package="generator", name=cfg.name, root=cfg.data.root,
                                                  builtin=builtin))
    tokenizer = load_tokenizer(cfg.tokenizer.spec, cfg.tokenizer.checkpoint)
    require_discrete(tokenizer, "MaskGIT training")
    cache_dir = prepare_cache(cfg, tokenizer)
    data = TokenDataset(cache_dir)
    manifest = data.manifest
    num_classes = len(manifest["classes"]) or int(data.labels.max()) + 1
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if isinstance(cfg.model, DictConfig) else cfg.model
    model_config, sampling = resolve_model(
        model_cfg, codebook_size=manifest["codebook_size"], num_tokens=manifest["num_tokens"], num_classes=num_classes
    )
    sampling.update(sampling_overrides(cfg.sampling))

    datamodule = TokenDataModule(
        data, batch_size=cfg.batch_size, num_workers=cfg.num_workers, val_fraction=cfg.val_fraction, seed=cfg.seed,
        on_device=cfg.get("data_on_device", "auto"),
    )
    has_val = datamodule.has_val

    tr = cfg.trainer
    module = MaskGITModule(
        model_config=model_config, max_steps=tr.max_steps, fused_adamw=cfg.fused_adamw, compile=cfg.compile,
        **OmegaConf.to_container(cfg.optim, resolve=True),
    )
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    callbacks: list[Callback] = [
        PeriodicLast(ckpt_dir, every_n_train_steps=cfg.checkpoint_every_n_steps),
        SaveLast(last),
    ]
    if module.hparams.ema:
        callbacks.append(ema_callback(module.hparams.ema_max_decay))
    grid = SampleGrid(
        tokenizer=tokenizer, sampling=sampling, every_n_steps=cfg.sample_every_n_steps,
        num_classes=min(cfg.sample_classes, num_classes), out_dir=run_dir / "samples",
    )
    callbacks.append(grid)
    trainer = build_trainer(
        trainer=OmegaConf.to_container(tr, resolve=True), run_dir=run_dir, batch_size=cfg.batch_size,
        callbacks=callbacks, logger=OmegaConf.to_container(cfg.logger) if OmegaConf.is_config(cfg.logger) else cfg.logger,
        name=str(cfg.name),
        val_check_interval=min(tr.val_check_interval, max(1, datamodule.train_batches())) if has_val else None,
        limit_val_batches=tr.limit_val_batches if has_val else 0, check_val_every_n_epoch=None if has_val else 1,
    )
    # After the Trainer is built (its settings are checked, and it knows each process's global rank on
    # any launcher); the other ranks start their work once rank 0 has checked the run.
    if trainer.is_global_zero:
        identity = {
            "dataset": {"root": os.path.abspath(cfg.data.root), "split": cfg.data.split, "format": cfg.data.format,
                        "builtin": builtin, **dataset_fingerprint(cfg.data.root, cfg.data.split)},
            "tokenizer": tokenizer_fingerprint(tokenizer), "model": model_config,
            "recipe": {"optim": OmegaConf.to_container(cfg.optim, resolve=True), "batch_size": cfg.batch_size,
                       "seed": cfg.seed, "cache_flip": cfg.cache.flip,
                       "trainer": {k: cfg.trainer.get(k) for k in IDENTITY_TRAINER_KEYS}},
        }
        if start_run(run_dir, identity, resume=cfg.resume):
            log.info("%s: the same run, resuming", run_dir)
        with atomic_path(run_dir / "config.yaml") as tmp:  # this launch's whole config, for the record
            tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    resume = str(last) if last.is_file() else None
    if resume:
        log.info("resuming from %s", resume)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    if trainer.interrupted:  # Lightning catches Ctrl-C and returns; the checkpoints so far are complete
        raise KeyboardInterrupt

    result = {"run_dir": str(run_dir), "global_step": trainer.global_step, "cache_dir": str(cache_dir)}
    if trainer.is_global_zero:
        out = run_dir / "generator.safetensors"
        extra = {
            "sampling": sampling,
            "tokenizer": {"spec": str(cfg.tokenizer.spec), "checkpoint": cfg.tokenizer.checkpoint},
            "data": {"root": str(cfg.data.root), "split": str(cfg.data.split), "builtin": builtin},
            "classes": manifest["classes"], "global_step": trainer.global_step, "ema": bool(cfg.optim.ema),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        }
        save_model_file(out, kind="generator", config=module.model.config, state_dict=module.model.state_dict(), extra=extra)
        result.update(checkpoint=str(out), metrics=extra["metrics"])
        if cfg.fit_sampling.enabled:  # the sampling settings fitted to the data, written into the file
            from generator.fit_sampling import fit_after_training

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


main = hydra_entry(config="generator/train", description=__doc__, renamed={"model.sampling": "sampling", "model.seq_len": "model.num_tokens"})(_main)


if __name__ == "__main__":
    main()
