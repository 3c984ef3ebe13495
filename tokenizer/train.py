"""Train a TiTok tokenizer from scratch (Lightning + Hydra).

    python -m tokenizer.train                              # the built-in demo (experiment=demo)
    python -m tokenizer.train experiment=demo trainer.max_time=00:00:10:00
    python -m tokenizer.train experiment=imagenet_l32_stage1 data.root=/data/imagenet \
        proxy.vqgan_checkpoint=maskgit-vqgan-imagenet-f16-256.bin

Steps: build the demo dataset if asked and missing -> train on the ``data.split`` images (resuming
from ``<run_dir>/checkpoints/last.ckpt`` after a kill), validating on held-out images every
``trainer.val_check_interval`` steps (PSNR, codebook usage, a reconstruction grid and a
code-usage figure under ``<run_dir>/figures``) -> export the EMA weights as
``<run_dir>/tokenizer.safetensors``, which ``load_tokenizer`` reads. The run itself (directory,
identity, resume, export) is :mod:`titok_core.training`'s.
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset

from titok_core import training
from titok_core.builtin import NATIVE_SIZE
from titok_core.cli import Ranges, hydra_entry
from titok_core.data import collate_skip_bad, count_skipped
from titok_core.errors import UsageError, exit_on_user_error
from titok_core.runs import require_dataset
from titok_core.stopping import ignore_stop_signals
from tokenizer.figures import Figures
from tokenizer.lightning_module import TiTokModule
from tokenizer.presets import resolve_model
from tokenizer.train_data import build_datasets, first_image_side

log = logging.getLogger(__name__)
# Options added after runs were recorded without them, with the value those runs trained with: they resume.
ADDED_RECORD_KEYS = {"recipe.loss.rate_warmup_steps": 0}


def train(cfg: DictConfig) -> dict:
    """Run the whole job; returns paths and final figures (global_step, metrics, checkpoint, ...)."""
    run = training.start(cfg, package="tokenizer")
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
            raise UsageError("finetune.freeze_encoder needs finetune.init_from (a trained tokenizer)")
        model = OmegaConf.to_container(cfg.model, resolve=True)
        side = None
        if model.get("image_size") == "auto":
            if run.builtin:
                side = NATIVE_SIZE[run.builtin]
            else:
                require_dataset(cfg.data.root)
                side = first_image_side(Path(cfg.data.root) / cfg.data.split)
        model_config = resolve_model(model, image_side=side)
    log.info("tokenizer %s", model_config)
    training.prepare_data(run, image_size=model_config["image_size"])
    train_set, val_set = build_datasets(cfg.data, image_size=model_config["image_size"], seed=cfg.seed)
    # The workers ignore Ctrl-C and SIGTERM: the training stops after the step in hand and shuts them down.
    loader_kw = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                     collate_fn=collate_skip_bad, worker_init_fn=ignore_stop_signals)
    if isinstance(train_set, IterableDataset):  # streamed shards: shuffled by the stream itself
        train_loader = DataLoader(train_set, drop_last=True, **loader_kw)
    else:
        train_loader = DataLoader(train_set, shuffle=True, drop_last=len(train_set) >= cfg.batch_size, **loader_kw)
    val_loader = DataLoader(val_set, shuffle=False, **loader_kw)

    groups = {group: OmegaConf.to_container(cfg[group], resolve=True) for group in ("loss", "optim", "codebook")}
    module = TiTokModule(
        model_config=model_config, max_steps=cfg.trainer.max_steps, seed=cfg.seed,
        vqgan_checkpoint=cfg.proxy.vqgan_checkpoint, freeze_encoder=bool(cfg.finetune.freeze_encoder),
        rate_classes=len(getattr(train_set, "classes", None) or [0]), **groups,
    )
    if init is not None:  # a resumed run overwrites these with its own checkpoint
        for net in (module.model, module.ema):
            if net is not None:
                net.load_state_dict(init.state_dict())
    figures = Figures(run.dir / "figures")
    trainer = training.fit(
        run, module, train_dataloaders=train_loader, val_dataloaders=val_loader, callbacks=[figures],
        trainer_args=dict(check_val_every_n_epoch=None, num_sanity_val_steps=0),
        identity={"model": model_config, "finetune": OmegaConf.to_container(cfg.finetune, resolve=True)},
        recipe={**groups, "proxy": OmegaConf.to_container(cfg.proxy, resolve=True)},
        added_record=ADDED_RECORD_KEYS,
        # Two optimisers (manual optimisation): the module accumulates and clips gradients itself.
        on_trainer=module.take_over_optimisation,
    )
    skipped = count_skipped(train_set)
    if skipped is not None:
        (log.warning if skipped else log.info)("%d unreadable training image(s) skipped", skipped)
    # Final figures with the weights that get exported.
    metrics = {k: float(v) for k, v in trainer.validate(module, val_loader, verbose=False)[0].items()}
    result = {"run_dir": str(run.dir), "global_step": trainer.global_step, "resumed_from_step": run.resumed_from,
              "metrics": metrics, "num_skipped": skipped}
    if trainer.is_global_zero:
        result.update(figures.write(module, "final"))
    out = training.export(run, trainer, config=module.model.config.to_dict(), state_dict=module.export_state_dict(),
                          extra={"ema": module.ema is not None, "finetuned_from": cfg.finetune.init_from,
                                 "metrics": metrics})
    if out is not None:
        result["checkpoint"] = str(out)
    return result


def _main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        result = train(cfg)
    if "checkpoint" in result:
        m = result["metrics"]
        print(f"trained {result['global_step']} steps; held-out PSNR {m.get('val/psnr', float('nan')):.2f} dB, "
              f"codebook usage {m.get('val/codebook_usage', float('nan')):.0%}")
        print(f"tokenizer: {result['checkpoint']}")
        print(f"figures: {result.get('recon_grid')} {result.get('usage_figure')}")
        print(f"train a generator on its tokens: {next_command(cfg, result['checkpoint'])}")


def next_command(cfg: DictConfig, checkpoint: str) -> str:
    """The generator.train command for this run's tokenizer and data (with the experiment of the
    same name, where generator.train has one)."""
    from hydra.core.hydra_config import HydraConfig

    from titok_core.cli import CONF

    experiment = HydraConfig.get().runtime.choices.get("experiment") if HydraConfig.initialized() else None
    words = ["python -m generator.train"]
    if experiment and (CONF / "generator" / "experiment" / f"{experiment}.yaml").is_file():
        words.append(f"experiment={experiment}")
    return " ".join([*words, f"data.root={cfg.data.root}", f"tokenizer.spec={checkpoint}"])


main = hydra_entry(
    config="tokenizer/train", description=__doc__,
    renamed={"model.num_latent_tokens": "model.num_tokens", "model.quantize_mode": "model.quantizer",
             "data.train_split": "data.split"},
    ranges=training.TRAINER_RANGES | Ranges(
        at_least_one=("data.val_images", "loss.gan.schedule_processes"), positive=("loss.gan.lr",),
        not_negative=("loss.kl_weight", "loss.rate_weight", "loss.rate_warmup_steps", "loss.gan.weight",
                      "loss.gan.start_step", "loss.gan.factor",
                      "loss.gan.lecam_weight", "loss.gan.lecam_ema_decay")),
)(_main)


if __name__ == "__main__":
    main()
