"""Train a MaskGIT generator on cached TiTok tokens (Lightning + Hydra).

    python -m generator.train                          # the built-in demo, CPU, ~5 minutes
    python -m generator.train experiment=imagenet_l32 data.root=/data/imagenet tokenizer.checkpoint=...

Steps: build the demo dataset if asked and missing -> build the token cache if missing ->
train (resuming from ``<run_dir>/checkpoints/last.ckpt`` after a kill) -> export the EMA
weights with their config, sampling settings and tokenizer as ``<run_dir>/generator.safetensors``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from generator.cache import TokenDataset, build_token_cache, check_cache, tokenizer_fingerprint
from generator.presets import PRESETS as GENERATOR_PRESETS
from generator.token_data import TokenDataModule
from generator.lightning_module import MaskGITModule
from generator.sampler import sample_tokens
from tokenizer import load_tokenizer, require_vq
from titok_core.checkpoints import save_model_file
from titok_core.images import save_png
from titok_core.runtime import exit_on_user_error, resolve_precision
from titok_core.lr_schedule import schedule_callbacks
from titok_core.trainer import SaveLast, ema_callback

log = logging.getLogger(__name__)


def resolve_model(model: str | dict, *, codebook_size: int, seq_len: int, num_classes: int) -> tuple[dict, dict]:
    """A preset name or kwargs dict -> (generator config, default sampling settings), sized to the data."""
    if isinstance(model, str):
        if model not in GENERATOR_PRESETS:
            raise ValueError(f"unknown generator preset {model!r}; known: {', '.join(GENERATOR_PRESETS)}")
        preset = GENERATOR_PRESETS[model]
        config, sampling = dict(preset["model"]), dict(preset["sampling"])
    else:
        config, sampling = dict(model), {}
        sampling = config.pop("sampling", sampling)
    for key, value in (("codebook_size", codebook_size), ("seq_len", seq_len), ("num_classes", num_classes)):
        if config.setdefault(key, value) != value:
            raise ValueError(f"generator {key}={config[key]} does not match the token cache ({value})")
    return config, sampling


def prepare_cache(cfg: DictConfig, tokenizer, *, fabric=None) -> Path:
    """Make the dataset (demo) and the token cache when missing; returns the cache directory."""
    from titok_core.formats import dataset_name, open_split

    root = Path(cfg.data.root)
    if cfg.data.builtin:
        from titok_core.builtin import make_builtin_dataset

        make_builtin_dataset(cfg.data.builtin, root, size=tokenizer.image_size, seed=cfg.data.builtin_seed,
                             demo_train_per_class=cfg.data.demo_train_per_class,
                             demo_val_per_class=cfg.data.demo_val_per_class)
    cache_dir = cfg.cache.dir
    if cache_dir is None:
        suffix = "" if cfg.cache.flip else "-noflip"
        cache_dir = Path("data/token_cache") / f"{dataset_name(root)}-{cfg.data.split}-{tokenizer_fingerprint(tokenizer)}{suffix}"
    cache_dir = Path(cache_dir)
    if not (cache_dir / "manifest.json").is_file():
        if cfg.trainer.num_nodes > 1:
            raise FileNotFoundError(
                f"no token cache at {cache_dir}: with several nodes, build it first with python -m generator.cache"
            )
        dataset = open_split(cfg.data.root, cfg.data.split, data_format=cfg.data.get("format", "auto"),
                             resolution=tokenizer.image_size)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        build_token_cache(
            tokenizer=tokenizer, tokenizer_source=str(cfg.tokenizer.spec), dataset=dataset, out_dir=cache_dir,
            batch_size=cfg.cache.batch_size, device=device, dtype=cfg.cache.dtype, num_workers=cfg.cache.num_workers,
            fabric=fabric, flip=cfg.cache.flip, decode=cfg.cache.get("decode", "pil"),
            compile=cfg.cache.get("compile", False),
        )
    check_cache(cache_dir, fingerprint=tokenizer_fingerprint(tokenizer), resolution=tokenizer.image_size,
                flip=cfg.cache.flip)
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
    run_dir = Path(cfg.run_dir)
    tokenizer = load_tokenizer(cfg.tokenizer.spec, cfg.tokenizer.checkpoint)
    require_vq(tokenizer, "MaskGIT training")
    cache_dir = prepare_cache(cfg, tokenizer)
    data = TokenDataset(cache_dir)
    manifest = data.manifest
    num_classes = len(manifest["classes"]) or int(data.labels.max()) + 1
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if isinstance(cfg.model, DictConfig) else cfg.model
    model_config, sampling = resolve_model(
        model_cfg, codebook_size=manifest["codebook_size"], seq_len=manifest["num_tokens"], num_classes=num_classes
    )
    sampling.update(OmegaConf.to_container(cfg.sampling, resolve=True))

    datamodule = TokenDataModule(
        data, batch_size=cfg.batch_size, num_workers=cfg.num_workers, val_fraction=cfg.val_fraction, seed=cfg.seed,
        on_device=cfg.get("data_on_device", "auto"),
    )
    has_val = datamodule.has_val

    tr = cfg.trainer
    module = MaskGITModule(
        model_config=model_config, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
        warmup_steps=cfg.optim.warmup_steps, max_steps=tr.max_steps, end_lr=cfg.optim.end_lr,
        label_smoothing=cfg.optim.label_smoothing, unmasked_weight=cfg.optim.unmasked_weight,
        class_dropout=cfg.optim.class_dropout, fused_adamw=cfg.get("fused_adamw"), compile=cfg.get("compile", False),
    )
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=cfg.checkpoint_every_n_steps, save_top_k=0),
        SaveLast(last), *schedule_callbacks(max_time=tr.max_time, schedule_steps=tr.schedule_steps),
    ]
    if cfg.optim.ema:
        callbacks.append(ema_callback(cfg.optim.ema_max_decay))
    grid = SampleGrid(
        tokenizer=tokenizer, sampling=sampling, every_n_steps=cfg.sample_every_n_steps,
        num_classes=min(cfg.sample_classes, num_classes), out_dir=run_dir / "samples",
    )
    callbacks.append(grid)
    trainer = L.Trainer(
        default_root_dir=run_dir, max_steps=tr.max_steps, max_time=tr.max_time, accelerator=tr.accelerator,
        devices=tr.devices, num_nodes=tr.num_nodes, strategy=tr.strategy, precision=resolve_precision(tr.precision),
        gradient_clip_val=tr.gradient_clip_val, log_every_n_steps=tr.log_every_n_steps,
        val_check_interval=min(tr.val_check_interval, max(1, datamodule.train_batches())) if has_val else None,
        limit_val_batches=tr.limit_val_batches if has_val else 0, check_val_every_n_epoch=None if has_val else 1,
        callbacks=callbacks, logger=CSVLogger(run_dir, name="logs"), enable_model_summary=False,
    )
    resume = str(last) if last.is_file() else None
    if resume:
        log.info("resuming from %s", resume)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)

    result = {"run_dir": str(run_dir), "global_step": trainer.global_step, "cache_dir": str(cache_dir)}
    if trainer.is_global_zero:
        out = run_dir / "generator.safetensors"
        extra = {
            "sampling": sampling,
            "tokenizer": {"spec": str(cfg.tokenizer.spec), "checkpoint": cfg.tokenizer.checkpoint},
            "data": {"root": str(cfg.data.root), "split": str(cfg.data.split), "builtin": cfg.data.builtin},
            "classes": manifest["classes"], "global_step": trainer.global_step, "ema": bool(cfg.optim.ema),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        }
        save_model_file(out, kind="generator", config=module.model.config, state_dict=module.model.state_dict(), extra=extra)
        result.update(checkpoint=str(out), metrics=extra["metrics"])
        if cfg.sample_every_n_steps:
            result["samples"] = str(grid.write(module, trainer.global_step))
    return result


@hydra.main(config_path="../conf/generator", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        result = train(cfg)
    if "checkpoint" in result:
        print(f"trained {result['global_step']} steps; checkpoint: {result['checkpoint']}")
        if "samples" in result:
            print(f"samples: {result['samples']}")
        print(f"sample from it: python -m sampling.generate checkpoint={result['checkpoint']} class=0 n=16")


if __name__ == "__main__":
    main()
