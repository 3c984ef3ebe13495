"""Training TiTok from scratch, as a LightningModule.

Two recipes, picked by the model's ``decoder_output``:

* ``"rgb"`` or ``"conv"`` (single stage): reconstruction loss (L2 or L1) + the quantiser's
  codebook and commitment (0.25) losses (none for FSQ), plus an image-gradient L1 term when
  ``gradient_weight > 0``, the official perceptual loss (``loss.perceptual``: LPIPS, ConvNeXt-S
  or their mix, :mod:`tokenizer.perceptual`) when ``perceptual_weight > 0``, and a hinge GAN
  with the official discriminator (:mod:`tokenizer.discriminator`) from ``gan.start_step`` when
  ``gan.weight > 0``. The official loss module itself (separate discriminator step, LeCAM, the
  VAE's KL term) is :class:`tokenizer.losses.ReconstructionLoss`.
* ``"proxy_codes"`` (the official stage 1): cross-entropy of the decoder's logits against the
  codes a frozen MaskGIT-VQGAN assigns to each patch (:mod:`tokenizer.proxy_codes`), plus the
  quantiser losses. The VQGAN decoder is copied in, frozen, so the model renders pixels.

Against codebook collapse: l2-normalised codes and a small code dimension (model config);
:class:`tokenizer.codebook_usage.CodeUsage`, which keeps an EMA of how often each code is
picked and, every k steps, moves codes that fell out of use onto random recent encoder outputs;
and an optional
quantiser warm-up (``quantizer_warmup_steps``: the decoder first sees the continuous latents,
then every code restarts on a recent latent). Without the warm-up a run can stall where
every image maps to the same code per position and the decoder learns the mean image.
FSQ (``quantizer="fsq"``) has no codebook to collapse: no revival; its warm-up feeds the
bounded, unrounded latents.
Optimiser: AdamW, linear warm-up then cosine; EMA of the weights (exported).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
import logging

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from tokenizer import build_tokenizer
from titok_core.errors import UsageError
from titok_core.checkpoints import CheckpointError
from tokenizer.codebook_usage import CodeUsage, codebook_perplexity, codebook_usage, token_counts
from tokenizer.discriminator import NLayerDiscriminator
from tokenizer.losses import frozen, gradient_loss, hinge_d_loss, reconstruction_loss
from tokenizer.model import FSQ, VectorQuantizer
from tokenizer.perceptual import build_perceptual
from tokenizer.token_prior import TokenPrior
from titok_core.lr_schedule import warmup_cosine
from titok_core.metrics import psnr
from titok_core.trainer import ema_update, param_groups

log = logging.getLogger(__name__)

# Besides vectors: embeddings, the latent tokens, norms and biases get no weight decay.
NO_DECAY_KEYS = ("embedding", "latent_tokens", "norm", "bias")


# --------------------------------------------------------------------------- module

@dataclass(frozen=True)
class LpipsConfig:
    vgg_weights: str | None = None  # torchvision vgg16-397923af.pth
    lpips_weights: str | None = None  # the lpips package's weights/v0.1/vgg.pth


@dataclass(frozen=True)
class ConvnextConfig:
    weights: str | None = None  # torchvision convnext_small-0c510722.pth


@dataclass(frozen=True)
class GanConfig:
    """The official discriminator (tokenizer.discriminator.NLayerDiscriminator) and its hinge loss."""

    weight: float = 0.0  # 0: no discriminator
    start_step: int = 20000
    lr: float | None = None  # None: optim.lr
    channels: int = 128  # the discriminator's hidden_channels (a multiple of 32)
    layers: int = 3  # its num_stages


@dataclass(frozen=True)
class LossConfig:
    """The ``loss`` group of tokenizer.train (conf/tokenizer/train.yaml says what each key does)."""

    reconstruction: str = "l2"
    reconstruction_weight: float = 1.0
    rate_weight: float = 0.0
    gradient_weight: float = 0.0
    quantizer_weight: float = 1.0
    perceptual: str = "lpips"  # lpips | convnext_s | lpips-convnext_s-<w_lpips>-<w_convnext> (official names)
    perceptual_weight: float = 0.0
    random_weights: bool = False  # the perceptual networks untrained (tests, timings); never a fallback
    lpips: LpipsConfig = LpipsConfig()
    convnext: ConvnextConfig = ConvnextConfig()
    gan: GanConfig = GanConfig()

    @classmethod
    def from_mapping(cls, group: Mapping) -> "LossConfig":
        group = dict(group)
        lpips, gan = LpipsConfig(**dict(group.pop("lpips", {}))), GanConfig(**dict(group.pop("gan", {})))
        convnext = ConvnextConfig(**dict(group.pop("convnext", {})))
        return cls(**group, lpips=lpips, convnext=convnext, gan=gan)


@dataclass(frozen=True)
class OptimConfig:
    """The ``optim`` group: AdamW, linear warm-up then cosine to end_lr, EMA of the weights (exported)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 1e-4
    warmup_steps: int = 1000
    end_lr: float = 1e-5
    ema: bool = True
    ema_decay: float = 0.999


@dataclass(frozen=True)
class CodebookConfig:
    """The ``codebook`` group: against collapse (see :class:`CodeUsage`)."""

    quantizer_warmup_steps: int = 0
    revive_every_n_steps: int = 100
    usage_decay: float = 0.99
    dead_ratio: float = 0.03
    latent_buffer_size: int = 4096


class TiTokModule(L.LightningModule):
    """Owns the losses, optimiser, EMA and dead-code re-init; the network is a plain TiTok.

    Batches are ``(images float [B,3,H,W] in [0,1], labels)``; labels are ignored.
    ``model`` and ``ema`` are TiTok instances; export ``ema`` (or ``model`` without EMA).
    """

    def __init__(
        self, *, model_config: dict, loss: Mapping | None = None, optim: Mapping | None = None,
        codebook: Mapping | None = None, vqgan_checkpoint: str | None = None, max_steps: int = 100_000, seed: int = 0,
        freeze_encoder: bool = False, rate_classes: int = 1,
    ):
        """loss, optim, codebook: the config groups of ``tokenizer.train``, handed over whole (see
        :class:`LossConfig`, :class:`OptimConfig`, :class:`CodebookConfig`; an unknown key is an error).
        vqgan_checkpoint: the MaskGIT-VQGAN of the stage-1 recipe (``proxy.vqgan_checkpoint``)."""
        super().__init__()
        self.save_hyperparameters()
        self.loss_cfg = LossConfig.from_mapping(loss or {})
        self.optim_cfg = OptimConfig(**dict(optim or {}))
        self.codebook_cfg = CodebookConfig(**dict(codebook or {}))
        lc, oc, cc = self.loss_cfg, self.optim_cfg, self.codebook_cfg
        config = dict(model_config)
        self.proxy = None
        if config.get("decoder_output", "proxy_codes") == "proxy_codes":
            if not vqgan_checkpoint:
                raise UsageError("decoder_output 'proxy_codes' is the stage-1 recipe: give a MaskGIT-VQGAN "
                                 "checkpoint (proxy.vqgan_checkpoint), or use decoder_output 'rgb'")
            from tokenizer.proxy_codes import load_maskgit_vqgan

            self.proxy, implied, pixel_state = load_maskgit_vqgan(vqgan_checkpoint)
            for key, value in implied.items():
                if config.setdefault(key, value) != value:
                    raise UsageError(f"model {key}={config[key]} does not match the VQGAN ({value})")
        self.model = build_tokenizer(config)
        if self.proxy is not None:
            factor = 2 ** (len(self.proxy.encoder.down) - 1)
            if factor != self.model.config.patch_size:
                raise UsageError(f"the VQGAN downsamples by {factor}, the model's patch_size must match")
            missing = self.model.load_state_dict(pixel_state, strict=False)
            if missing.unexpected_keys:
                raise CheckpointError(f"VQGAN decoder keys not in the model: {missing.unexpected_keys[:3]}")
            self.model.pixel_decoder.requires_grad_(False)
            self.model.proxy_codebook.requires_grad_(False)
        if freeze_encoder:
            # Decoder fine-tuning (TiTok's stage 2): the tokens of every image stay as they are, so
            # generators trained on them and token caches stay valid; only the decoder learns.
            for part in (self.model.encoder, self.model.latent_tokens, self.model.quantize):
                part.requires_grad_(False)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if oc.ema else None
        q = self.model.quantize
        # FSQ has no learned codebook: nothing can die, so there is nothing to revive; a frozen
        # codebook (decoder fine-tuning) must not change either.
        self.usage = CodeUsage(
            codebook_size=q.embedding.num_embeddings, token_size=q.embedding.embedding_dim, decay=cc.usage_decay,
            dead_ratio=cc.dead_ratio, buffer_size=cc.latent_buffer_size,
        ) if isinstance(q, VectorQuantizer) and not freeze_encoder else None
        self.register_buffer("revived_total", torch.zeros((), dtype=torch.long))
        self.prior = None
        if lc.rate_weight > 0:
            if not isinstance(q, FSQ) or freeze_encoder:
                raise UsageError("loss.rate_weight needs an FSQ tokenizer whose encoder trains (not frozen)")
            self.prior = TokenPrior(levels=q.levels.tolist(), num_tokens=self.model.num_tokens,
                                    num_classes=max(1, rate_classes))
        self.perceptual = None
        if lc.perceptual_weight > 0:
            # The pretrained networks, from the given files, the torch hub cache or a download;
            # offline and missing, one line names the file and its source (tokenizer.perceptual).
            self.perceptual = build_perceptual(
                lc.perceptual, vgg_weights=lc.lpips.vgg_weights, lpips_weights=lc.lpips.lpips_weights,
                convnext_weights=lc.convnext.weights, random_weights=lc.random_weights)
            log.info("perceptual loss: %s, weight %g%s", lc.perceptual, lc.perceptual_weight,
                     " (random weights)" if lc.random_weights else "")
        self.discriminator = None
        if lc.gan.weight > 0:
            if lc.gan.channels < 32 or lc.gan.channels % 32:
                raise UsageError(f"loss.gan.channels={lc.gan.channels}: the official discriminator's width must be "
                                 "a multiple of 32 (GroupNorm(32)); its default is 128")
            self.discriminator = NLayerDiscriminator(hidden_channels=lc.gan.channels, num_stages=lc.gan.layers)
        self._last_step = -1
        self._val_counts: torch.Tensor | None = None
        self.val_preview: tuple[torch.Tensor, torch.Tensor] | None = None  # (inputs, recon) [8,3,H,W]
        self.val_counts: torch.Tensor | None = None  # code counts [K] of the last validation

    # ----- forward pieces
    def _quantizing(self) -> bool:
        return self.hparams.freeze_encoder or self.global_step >= self.codebook_cfg.quantizer_warmup_steps

    def _reconstruct(self, model: nn.Module, images: torch.Tensor, *, quantize: bool = True):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.hparams.freeze_encoder):
            z = model.encode_latents(images)  # (B, N, T)
            z_q, tokens, qlosses = model.quantize(z)
        if not quantize:
            # Quantiser warm-up: the decoder sees the continuous (normalised) latents, so
            # encoder and decoder learn an informative latent before codes can cut it off.
            if isinstance(model.quantize, VectorQuantizer):
                z_q = F.normalize(z.float(), dim=-1) if model.quantize.use_l2_norm else z
            else:  # FSQ: bounded but not rounded
                z_q = model.quantize.continuous(z)
        out = model.decoder(z_q.to(z.dtype))  # rgb [B,3,H,W], proxy-code logits [B,K,G,G] or features
        return z, tokens, qlosses, out

    # ----- training
    def training_step(self, batch, batch_idx):
        if batch is None:  # every image of the batch was unreadable (collate_skip_bad)
            return None
        images = batch[0]
        z, tokens, qlosses, out = self._reconstruct(self.model, images, quantize=self._quantizing())
        logs = {"train/quantizer_loss": qlosses["quantizer_loss"], "train/commitment_loss": qlosses["commitment_loss"]}
        loss = self.loss_cfg.quantizer_weight * qlosses["quantizer_loss"]
        if self.proxy is not None:
            codes = self.proxy(images)  # (B, G, G)
            ce = F.cross_entropy(out.float(), codes)
            loss = loss + ce
            logs.update({"train/ce_loss": ce, "train/proxy_acc": (out.argmax(1) == codes).float().mean()})
        else:
            out = self.model.render(out)  # pixels [B,3,H,W]
            rec = reconstruction_loss(out, images, self.loss_cfg.reconstruction)
            loss = loss + self.loss_cfg.reconstruction_weight * rec
            logs["train/rec_loss"] = rec
            if self.loss_cfg.gradient_weight > 0:
                edge = gradient_loss(out, images)
                loss = loss + self.loss_cfg.gradient_weight * edge
                logs["train/gradient_loss"] = edge
            if self.perceptual is not None:
                with torch.autocast(images.device.type, enabled=False):  # float32, as the official loss
                    p = self.perceptual(images.float(), out.float()).mean()
                loss = loss + self.loss_cfg.perceptual_weight * p
                logs["train/perceptual_loss"] = p
            if self.discriminator is not None:
                # Generator and discriminator share one backward: the discriminator is frozen
                # while it scores the generator's output and sees only detached images itself.
                factor = 1.0 if self.global_step >= self.loss_cfg.gan.start_step else 0.0
                with frozen(self.discriminator):
                    g_loss = -self.discriminator(out.float()).mean()
                d_loss = hinge_d_loss(self.discriminator(images.float()), self.discriminator(out.detach().float()))
                loss = loss + factor * (self.loss_cfg.gan.weight * g_loss + d_loss)
                logs.update({"train/g_loss": g_loss, "train/d_loss": d_loss})
        if self.prior is not None:
            labels = batch[1].to(self.device).long()
            u = self.model.quantize.digit_positions(z)
            rate = self.prior(u, labels).mean()
            loss = loss + self.loss_cfg.rate_weight * rate
            logs.update({"train/rate": rate, "train/code_bits": self.prior.code_bits(u, labels)})
            self.prior.update(self.all_gather(u.detach()).reshape(-1, *u.shape[1:]), self.all_gather(labels).flatten())
        logs.update({"train/loss": loss, "train/lr": self.optimizers().param_groups[0]["lr"]})
        if self.usage is not None:
            # All ranks see every rank's tokens, so they revive the same codes with the same latents.
            self.usage.update(self.all_gather(tokens), self.all_gather(z.detach()))
            logs.update({"train/dead_codes": self.usage.dead().float().sum(), "train/revived": self.revived_total.float()})
        self.log_dict(logs, batch_size=images.shape[0])
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=images.shape[0])
        return loss

    def configure_callbacks(self):
        return [_AfterOptimizerStep()]

    def after_optimizer_step(self) -> None:
        """EMA update and dead-code revival after each optimiser step (see :class:`_AfterOptimizerStep`)."""
        step = self.global_step
        if step == self._last_step:  # gradient accumulation: no optimiser step happened
            return
        self._last_step = step
        if self.usage is not None:  # a learned codebook (VQ): keep every code in use
            if step == self.codebook_cfg.quantizer_warmup_steps > 0:
                self.usage.usage.zero_()  # the warm-up ends: every code restarts on a recent latent
                self._revive_dead_codes(step)
            elif self.codebook_cfg.revive_every_n_steps and step % self.codebook_cfg.revive_every_n_steps == 0:
                self._revive_dead_codes(step)
        if self.ema is not None:
            ema_update(self.ema, self.model, step=step, max_decay=self.optim_cfg.ema_decay)

    @torch.no_grad()
    def _revive_dead_codes(self, step: int) -> None:
        weight = self.model.quantize.embedding.weight
        g = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + step)
        idx = self.usage.revive(weight, l2_norm=self.model.quantize.use_l2_norm, generator=g)
        if idx.numel() == 0:
            return
        if self.ema is not None:
            self.ema.quantize.embedding.weight[idx] = weight[idx]
        # Stale Adam moments would drag the new codes back towards where the old ones sat.
        state = self.optimizers().optimizer.state.get(weight, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][idx] = 0
        self.revived_total += idx.numel()

    # ----- validation: PSNR and codebook usage on held-out images, with the EMA weights
    def on_validation_epoch_start(self):
        self._val_counts = torch.zeros(self.model.codebook_size, device=self.device)
        self.val_preview = None

    def validation_step(self, batch, batch_idx):
        if batch is None:
            return
        images = batch[0]
        model = self.ema if self.ema is not None else self.model
        _, tokens, _, out = self._reconstruct(model, images)
        recon = model.render(out).float().clamp(0, 1)
        self._val_counts += token_counts(tokens, self._val_counts.numel())
        logs = {"val/psnr": psnr(recon, images).mean(), "val/rec_loss": reconstruction_loss(recon, images, "l2")}
        if self.proxy is not None:
            logs["val/proxy_acc"] = (out.argmax(1) == self.proxy(images)).float().mean()
        self.log_dict(logs, sync_dist=True, batch_size=images.shape[0], prog_bar=False)
        if batch_idx == 0:
            self.val_preview = (images[:8].detach().float().cpu(), recon[:8].cpu())

    def on_validation_epoch_end(self):
        counts = self.trainer.strategy.reduce(self._val_counts, reduce_op="sum")
        usage, ppl = codebook_usage(counts), codebook_perplexity(counts)
        self.log_dict({"val/codebook_usage": usage, "val/perplexity": ppl}, prog_bar=False)
        self.val_counts = counts.cpu()

    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups(self.model.named_parameters(), weight_decay=self.optim_cfg.weight_decay, no_decay_keys=NO_DECAY_KEYS)
        if self.discriminator is not None:
            groups.append({"params": list(self.discriminator.parameters()), "weight_decay": self.optim_cfg.weight_decay,
                           "lr": self.loss_cfg.gan.lr or self.optim_cfg.lr})
        opt = torch.optim.AdamW(groups, lr=self.optim_cfg.lr, betas=tuple(self.optim_cfg.betas))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, warmup_steps=self.optim_cfg.warmup_steps, max_steps=hp.max_steps,
                                            base_lr=self.optim_cfg.lr, end_lr=self.optim_cfg.end_lr) / self.optim_cfg.lr,
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # Frozen helpers loaded from their own files (the perceptual networks, the VQGAN) stay out of checkpoints.
    _FROZEN = ("perceptual.", "proxy.")

    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(self._FROZEN)}

    def on_load_checkpoint(self, checkpoint):
        own = {k: v for k, v in self.state_dict().items() if k.startswith(self._FROZEN)}
        checkpoint["state_dict"] = {**{k: v for k, v in checkpoint["state_dict"].items()
                                       if not k.startswith(self._FROZEN)}, **own}

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights to ship: the EMA copy when on, else the trained model."""
        return (self.ema if self.ema is not None else self.model).state_dict()


class _AfterOptimizerStep(Callback):
    """Runs :meth:`TiTokModule.after_optimizer_step` as a callback, not as the module's own hook:
    Lightning calls module hooks after every callback, ModelCheckpoint's included, so a checkpoint
    written at step k would miss step k's EMA update and codebook revival, and a run resumed from
    it would never apply them. Lightning keeps checkpoint callbacks last, after this one."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.after_optimizer_step()
