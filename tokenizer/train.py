"""Train a TiTok tokenizer from scratch (Lightning + Hydra).

    python -m tokenizer.train                              # the built-in demo (experiment=demo)
    python -m tokenizer.train experiment=demo trainer.max_time=00:00:10:00
    python -m tokenizer.train experiment=imagenet_l32_stage1 data.root=/data/imagenet \
        proxy.vqgan_checkpoint=maskgit-vqgan-imagenet-f16-256.bin

Steps: build the demo dataset if asked and missing -> train on ``<root>/train`` (resuming
from ``<run_dir>/checkpoints/last.ckpt`` after a kill), validating on held-out images every
``trainer.val_check_interval`` steps (PSNR, codebook usage, a reconstruction grid and a
code-usage figure under ``<run_dir>/figures``) -> export the EMA weights as
``<run_dir>/tokenizer.safetensors``, which ``load_tokenizer`` reads.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from titok_core.builtin import NATIVE_SIZE, make_builtin_dataset
from titok_core.checkpoints import save_model_file
from titok_core.data import ImageFolderDataset, InMemoryImages, collate_skip_bad, count_skipped
from titok_core.formats import WebDatasetShards, WebDatasetTrainStream, decode_sample, has_split, open_split
from tokenizer.config import check_keys
from tokenizer.presets import PRESETS, small_image_size, titok_small
from titok_core.images import save_png
from titok_core.checkpoints import atomic_path
from titok_core.cli import hydra_entry
from titok_core.runs import builtin_for, dataset_fingerprint, default_run_dir, require_dataset, start_run
from titok_core.runtime import exit_on_user_error
from tokenizer.lightning_module import TiTokModule
from titok_core.trainer import PeriodicLast, SaveLast, build_trainer

log = logging.getLogger(__name__)
# Trainer settings that change what a run computes (max_steps and max_time only say how long).
IDENTITY_TRAINER_KEYS = ("precision", "gradient_clip_val", "accumulate_grad_batches", "global_batch")


def resolve_model(model: dict, *, image_side: int | None = None) -> dict:
    """``{preset: name, **overrides}`` (or plain TiTokConfig fields) -> our TiTok config (a dict of them).

    Keys set to None keep the preset's value (or TiTokConfig's default without a preset).
    ``image_size: auto`` (preset titok_small only) sizes the model for images whose shorter
    side is ``image_side`` pixels (16, 32 or 64; see :func:`tokenizer.presets.small_image_size`).
    An old key name (``num_latent_tokens``, ``quantize_mode``) or an unknown key fails with one line.
    """
    check_keys({k: v for k, v in model.items() if k != "preset"}, what="tokenizer model")
    config = {k: v for k, v in model.items() if v is not None}
    preset = config.pop("preset", None)
    if config.get("image_size") == "auto":
        if preset != "titok_small":
            raise ValueError("model.image_size=auto needs model.preset=titok_small")
        if image_side is None:
            raise ValueError("model.image_size=auto needs the size of the training images")
        config.pop("image_size")
        return {**titok_small(small_image_size(image_side)), **config}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown tokenizer preset {preset!r}; known: {', '.join(PRESETS)}")
        config = {**PRESETS[preset], **config}
    return config


def first_image_side(root: Path) -> int:
    """The shorter side in pixels of the first image of the image folder ``root`` (<class>/<image>)."""
    from PIL import Image

    for path, _ in ImageFolderDataset(root, resolution=1, train=False).samples:
        try:
            with Image.open(path) as img:
                return min(img.size)
        except OSError:
            continue
    raise FileNotFoundError(f"no readable image in {root}")


def build_datasets(cfg: DictConfig, image_size: int) -> tuple[Dataset, Dataset]:
    """Train images (augmented) and a fixed random subset of held-out images (not augmented).

    ``data.root`` is any format of :mod:`titok_core.formats`; WebDataset shards give an endless
    shuffled stream for training (see :func:`_webdataset_datasets`). ``data.in_memory``: the
    train split is decoded once into RAM (small datasets).
    """
    root, fmt = cfg.data.root, cfg.data.get("format", "auto")
    builtin = builtin_for(root, cfg.data.builtin)
    if builtin:  # returns at once when the tree is there
        make_builtin_dataset(builtin, Path(root), size=image_size, seed=cfg.data.builtin_seed,
                             demo_train_per_class=cfg.data.demo_train_per_class,
                             demo_val_per_class=cfg.data.demo_val_per_class)
    else:
        require_dataset(root)
    train_set = open_split(root, cfg.data.train_split, data_format=fmt, resolution=image_size, train=True,
                           random_flip=cfg.data.hflip)
    if isinstance(train_set, WebDatasetShards):  # streamed, never held in memory
        return _webdataset_datasets(cfg, train_set, image_size)
    if cfg.data.in_memory:  # small datasets: decode once, augment (flip) on the tensor
        plain_train = open_split(root, cfg.data.train_split, data_format=fmt, resolution=image_size, train=False)
        train_set = InMemoryImages(plain_train, random_flip=cfg.data.hflip, desc=f"loading {root}")
        log.info("%d training images in memory (%d unreadable skipped)", len(train_set), train_set.num_skipped)
    g = torch.Generator().manual_seed(cfg.seed)
    if has_split(root, cfg.data.val_split, data_format=fmt):
        val_set = open_split(root, cfg.data.val_split, data_format=fmt, resolution=image_size, train=False)
        order = torch.randperm(len(val_set), generator=g).tolist()
        return train_set, Subset(val_set, order[: cfg.data.val_images])
    # No val split: hold out images of the train split (seen without augmentation).
    log.warning("no %s split in %s; holding out %d training images for validation", cfg.data.val_split, root,
                cfg.data.val_images)
    plain = open_split(root, cfg.data.train_split, data_format=fmt, resolution=image_size, train=False)
    if cfg.data.in_memory:
        plain = InMemoryImages(plain)
    order = torch.randperm(len(plain), generator=g).tolist()
    n_val = min(cfg.data.val_images, len(plain) // 10 or 1)
    return Subset(train_set, order[n_val:]), Subset(plain, order[:n_val])


def _webdataset_datasets(cfg: DictConfig, shards: WebDatasetShards, image_size: int):
    """Streamed shards: an endless shuffled training stream, and the first ``val_images`` readable
    images of the val shards (or, without them, of the train shards, then left out of training)."""
    from functools import partial

    from titok_core.data import preprocess

    root, fmt, want = cfg.data.root, cfg.data.get("format", "auto"), cfg.data.val_images
    held_out = not has_split(root, cfg.data.val_split, data_format=fmt)
    val_shards = shards if held_out else open_split(root, cfg.data.val_split, data_format=fmt, resolution=image_size)
    val, names = [], set()
    for shard in range(len(val_shards)):
        for image, label, name in val_shards.samples(shard, damaged="skip"):
            item = decode_sample(image, label, name, partial(preprocess, resolution=image_size))
            if item is not None:
                val.append(item)
                names.add(name)
            if len(val) >= want:
                break
        if len(val) >= want:
            break
    if held_out:
        log.warning("no %s shards; holding out the first %d training images for validation", cfg.data.val_split, len(val))
    stream = WebDatasetTrainStream(shards, resolution=image_size, seed=cfg.seed,
                                   exclude=frozenset(names) if held_out else frozenset())
    return stream, val


def usage_figure(counts: torch.Tensor, height: int = 96, width_per_code: int = 2) -> torch.Tensor:
    """Bar chart of code counts, most used first: counts [K] -> image float [3,height,K*w] in [0,1].

    Dead codes show as empty columns on the right; a collapsed codebook is a few bars.
    """
    ordered = counts.float().sort(descending=True).values
    bars = (ordered / ordered.max().clamp(min=1) * height).round()
    rows = torch.arange(height, 0, -1, dtype=torch.float32)[:, None]  # top row = tallest
    filled = (rows <= bars[None, :]).float().repeat_interleave(width_per_code, dim=1)
    image = torch.ones(3, height, filled.shape[1])
    image[0] -= 0.8 * filled
    image[1] -= 0.5 * filled
    return image


class Figures(Callback):
    """After each validation: inputs-vs-reconstruction grid and code-usage figure, as PNGs."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.latest: dict[str, str] = {}

    def write(self, pl_module: TiTokModule, tag: str) -> dict[str, str]:
        if pl_module.val_preview is not None:
            inputs, recon = pl_module.val_preview
            grid = torch.cat([inputs, recon])  # row 1: inputs, row 2: reconstructions
            self.latest["recon_grid"] = str(save_png(grid, self.out_dir / f"recon_{tag}.png", nrow=len(inputs)))
        counts = getattr(pl_module, "val_counts", None)
        if counts is not None:
            self.latest["usage_figure"] = str(save_png(usage_figure(counts), self.out_dir / f"usage_{tag}.png"))
        return dict(self.latest)

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.is_global_zero and not trainer.sanity_checking:
            self.write(pl_module, f"step{trainer.global_step:07d}")


def train(cfg: DictConfig) -> dict:
    """Run the whole job; returns paths and final figures (global_step, metrics, checkpoint, ...)."""
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    builtin = builtin_for(cfg.data.root, cfg.data.builtin)
    run_dir = Path(cfg.run_dir or default_run_dir(package="tokenizer", name=cfg.name, root=cfg.data.root,
                                                  builtin=builtin))
    init = None
    if cfg.finetune.init_from:
        # Fine-tuning starts from a trained tokenizer: its architecture (cfg.model is not read), its weights.
        from tokenizer import load_tokenizer

        init = load_tokenizer(cfg.finetune.init_from)
        model_config = init.config.to_dict()
        log.info("fine-tuning %s%s", cfg.finetune.init_from,
                 " (encoder and quantiser frozen: the tokens stay as they are)" if cfg.finetune.freeze_encoder else "")
    else:
        if cfg.finetune.freeze_encoder:
            raise ValueError("finetune.freeze_encoder needs finetune.init_from (a trained tokenizer)")
        model = OmegaConf.to_container(cfg.model, resolve=True)
        side = None
        if model.get("image_size") == "auto":
            if builtin:
                side = NATIVE_SIZE[builtin]
            else:
                require_dataset(cfg.data.root)
                side = first_image_side(Path(cfg.data.root) / cfg.data.train_split)
        model_config = resolve_model(model, image_side=side)
    log.info("tokenizer %s", model_config)
    train_set, val_set = build_datasets(cfg, model_config["image_size"])
    loader_kw = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                     collate_fn=collate_skip_bad)
    if isinstance(train_set, IterableDataset):  # streamed shards: shuffled by the stream itself
        train_loader = DataLoader(train_set, drop_last=True, **loader_kw)
    else:
        train_loader = DataLoader(train_set, shuffle=True, drop_last=len(train_set) >= cfg.batch_size, **loader_kw)
    val_loader = DataLoader(val_set, shuffle=False, **loader_kw)

    tr = cfg.trainer
    module = TiTokModule(
        model_config=model_config, max_steps=tr.max_steps, seed=cfg.seed, vqgan_checkpoint=cfg.proxy.vqgan_checkpoint,
        freeze_encoder=bool(cfg.finetune.freeze_encoder), rate_classes=len(getattr(train_set, "classes", None) or [0]),
        **{group: OmegaConf.to_container(cfg[group], resolve=True) for group in ("loss", "optim", "codebook")},
    )
    if init is not None:  # a resumed run overwrites these with its own checkpoint below
        weights = init.state_dict()
        for net in (module.model, module.ema):
            if net is not None:
                net.load_state_dict(weights)
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    figures = Figures(run_dir / "figures")
    callbacks: list[Callback] = [
        PeriodicLast(ckpt_dir, every_n_train_steps=cfg.checkpoint_every_n_steps),
        SaveLast(last), figures,
    ]
    trainer = build_trainer(
        trainer=OmegaConf.to_container(tr, resolve=True), run_dir=run_dir, batch_size=cfg.batch_size,
        callbacks=callbacks, logger=OmegaConf.to_container(cfg.logger) if OmegaConf.is_config(cfg.logger) else cfg.logger,
        name=str(cfg.name), check_val_every_n_epoch=None, num_sanity_val_steps=0,
    )
    # Two optimisers (manual optimisation): the module accumulates and clips gradients itself.
    module.take_over_optimisation(trainer)
    # After the Trainer is built (its settings are checked, and it knows each process's global rank on
    # any launcher); the other ranks start their work once rank 0 has checked the run.
    if trainer.is_global_zero:
        identity = {
            "dataset": {"root": os.path.abspath(cfg.data.root), "split": cfg.data.train_split,
                        "format": cfg.data.format, "builtin": builtin,
                        **dataset_fingerprint(cfg.data.root, cfg.data.train_split)},
            "model": model_config, "finetune": OmegaConf.to_container(cfg.finetune, resolve=True),
            "recipe": {group: OmegaConf.to_container(cfg[group], resolve=True)
                       for group in ("loss", "optim", "codebook", "proxy")}
            | {"batch_size": cfg.batch_size, "seed": cfg.seed, "hflip": cfg.data.hflip,
               "trainer": {k: cfg.trainer.get(k) for k in IDENTITY_TRAINER_KEYS}},
        }
        if start_run(run_dir, identity, resume=cfg.resume):
            log.info("%s: the same run, resuming", run_dir)
        with atomic_path(run_dir / "config.yaml") as tmp:  # this launch's whole config, for the record
            tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    resumed_from = None
    if last.is_file():
        # Our own Lightning checkpoints hold only tensors and plain containers: no pickled code.
        resumed_from = int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])
        log.info("resuming from %s (step %d)", last, resumed_from)
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(last) if resumed_from is not None else None,
                weights_only=True)
    if trainer.interrupted:  # Lightning catches Ctrl-C and returns; the checkpoints so far are complete
        raise KeyboardInterrupt
    global_step = trainer.global_step
    skipped = count_skipped(train_set)
    if skipped is not None:
        (log.warning if skipped else log.info)("%d unreadable training image(s) skipped", skipped)

    # Final figures with the weights that get exported.
    metrics = trainer.validate(module, val_loader, verbose=False)[0]
    result = {"run_dir": str(run_dir), "global_step": global_step, "resumed_from_step": resumed_from,
              "metrics": {k: float(v) for k, v in metrics.items()}, "num_skipped": skipped}
    if trainer.is_global_zero:
        result.update(figures.write(module, "final"))
        out = run_dir / "tokenizer.safetensors"
        extra = {"global_step": global_step, "ema": module.ema is not None, "data_root": str(cfg.data.root),
                 "data_builtin": cfg.data.builtin, "finetuned_from": cfg.finetune.init_from,
                 "metrics": result["metrics"]}
        save_model_file(out, kind="tokenizer", config=module.model.config.to_dict(),
                        state_dict=module.export_state_dict(), extra=extra)
        result["checkpoint"] = str(out)
    return result


def _main(cfg: DictConfig) -> None:
    with exit_on_user_error(FileExistsError):
        result = train(cfg)
    if "checkpoint" in result:
        m = result["metrics"]
        print(f"trained {result['global_step']} steps; held-out PSNR {m.get('val/psnr', float('nan')):.2f} dB, "
              f"codebook usage {m.get('val/codebook_usage', float('nan')):.0%}")
        print(f"tokenizer: {result['checkpoint']}")
        print(f"figures: {result.get('recon_grid')} {result.get('usage_figure')}")


main = hydra_entry(config="tokenizer/train", description=__doc__, renamed={
    "model.num_latent_tokens": "model.num_tokens", "model.quantize_mode": "model.quantizer"})(_main)


if __name__ == "__main__":
    main()
