"""Training TiTok, as a LightningModule.

Three recipes, picked by the model's ``decoder_output`` and ``finetune.freeze_encoder``:

* pixels (``"rgb"`` or ``"conv"``; single stage, as the official ``*_vq8k`` and ``*_vae_c16``
  releases): the official loss :class:`tokenizer.losses.ReconstructionLoss` -- L2 (or L1)
  reconstruction, the official perceptual loss (``loss.perceptual``: LPIPS, ConvNeXt-S or their
  mix) when ``perceptual_weight > 0``, the quantiser's codebook and commitment losses (VQ; none for
  FSQ) or the KL term (VAE), and a hinge GAN with the official discriminator from
  ``gan.start_step`` when ``gan.weight > 0`` -- plus this project's image-gradient term
  (``gradient_weight``) and rate term (``rate_weight``, FSQ).
* decoder fine-tuning in pixels (``"proxy_codes"`` with ``freeze_encoder``: the official stage 2):
  the same loss; encoder, latent tokens and quantiser frozen, the ViT decoder, the proxy codebook
  and the VQGAN pixel decoder trained.
* ``"proxy_codes"`` (the official stage 1): cross-entropy of the decoder's logits against the
  codes a frozen MaskGIT-VQGAN assigns to each patch (:mod:`tokenizer.proxy_codes`), plus the
  quantiser losses. The VQGAN decoder is copied in, frozen, so the model renders pixels.

Optimisation is manual, as the official loop runs it (:mod:`tokenizer.official`): per training
step the model's loss, backward, clipping, the model's AdamW step; then, from ``gan.start_step``
on, the discriminator's loss on the same detached reconstructions, backward, clipping and the
discriminator's own AdamW step (its own schedule, :func:`tokenizer.official.discriminator_lr_factor`);
then the EMA of the model. Gradients are accumulated over ``trainer.accumulate_grad_batches``
micro-batches (``trainer.global_batch`` sets it) and clipped to ``trainer.gradient_clip_val``
by this module (:meth:`TiTokModule.take_over_optimisation`).

Against codebook collapse (VQ): l2-normalised codes and a small code dimension (model config);
the official clustering VQ (``codebook.clustering_vq``, :class:`tokenizer.model.ClusteringVQ`);
or :class:`tokenizer.codebook_usage.CodeUsage`, which keeps an EMA of how often each code is
picked and, every k steps, moves codes that fell out of use onto random recent encoder outputs;
and an optional quantiser warm-up (``quantizer_warmup_steps``: the decoder first sees the
continuous latents, then every code restarts on a recent latent). FSQ (``quantizer="fsq"``) has no
codebook to collapse: no revival; its warm-up feeds the bounded, unrounded latents.

One class holds the training step of all three recipes because they share every part of it
(manual optimisation, accumulation, EMA, codebook care, validation); its option groups live in
:mod:`tokenizer.train_options`, its losses in :mod:`tokenizer.losses`.
"""
from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from titok_core.checkpoints import CheckpointError
from titok_core.errors import UsageError
from titok_core.lr_schedule import warmup_cosine
from titok_core.metrics import psnr
from titok_core.trainer import ema_update, param_groups
from tokenizer import build_tokenizer, official
from tokenizer.codebook_usage import CodeUsage, codebook_perplexity, codebook_usage, token_counts
from tokenizer.discriminator import NLayerDiscriminator
from tokenizer.losses import ReconstructionLoss, gradient_loss, reconstruction_loss
from tokenizer.model import FSQ, ClusteringVQ, VectorQuantizer
from tokenizer.perceptual import PerceptualLoss, build_perceptual
from tokenizer.token_prior import TokenPrior
from tokenizer.train_options import CodebookConfig, LossConfig, OptimConfig

log = logging.getLogger(__name__)
# Our checkpoints hold the state after step k, as they should (the resumed run continues from it);
# Lightning warns about that for every manual-optimisation run.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


@dataclass
class _Forward:
    """One training forward: latents [B,N,T] (VAE: [B,N,2T]), tokens [B,N] (None for VAE) and the
    reconstruction in pixels [B,3,H,W] (None for the stage-1 recipe)."""

    z: torch.Tensor
    tokens: torch.Tensor | None
    recon: torch.Tensor | None


def _no_closure() -> None:
    return None


# --------------------------------------------------------------------------- module

class TiTokModule(L.LightningModule):
    """Owns the losses, the two optimisers, the EMA and the codebook aids; the network is a plain TiTok.

    Batches are ``(images float [B,3,H,W] in [0,1], labels)``; labels are used by the rate term only.
    ``model`` and ``ema`` are TiTok instances; export ``ema`` (or ``model`` without EMA).
    ``loss_module`` is the official :class:`ReconstructionLoss` (pixel recipes; None for stage 1),
    holding the discriminator, the perceptual networks and the LeCAM EMAs.
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
        self.automatic_optimization = False  # two optimisers, accumulation and clipping as the official loop
        self.loss_cfg = LossConfig.from_mapping(loss or {})
        self.optim_cfg = OptimConfig(**dict(optim or {}))
        self.codebook_cfg = CodebookConfig(**dict(codebook or {}))
        lc, oc, cc = self.loss_cfg, self.optim_cfg, self.codebook_cfg
        config = dict(model_config)
        self.proxy = None
        proxy_codes = config.get("decoder_output", "proxy_codes") == "proxy_codes"
        if proxy_codes and freeze_encoder and vqgan_checkpoint:
            raise UsageError("a proxy-codes tokenizer with a frozen encoder fine-tunes its decoder in pixels (TiTok's "
                             "stage 2) and needs no proxy.vqgan_checkpoint (that is the stage-1 recipe)")
        if proxy_codes and not freeze_encoder:
            if not vqgan_checkpoint:
                raise UsageError("decoder_output 'proxy_codes' is the stage-1 recipe: give a MaskGIT-VQGAN "
                                 "checkpoint (proxy.vqgan_checkpoint), or use decoder_output 'rgb'")
            from tokenizer.proxy_codes import load_maskgit_vqgan

            self.proxy, implied, pixel_state = load_maskgit_vqgan(vqgan_checkpoint)
            for key, value in implied.items():
                if config.setdefault(key, value) != value:
                    raise UsageError(f"model {key}={config[key]} does not match the VQGAN ({value})")
        self.model = build_tokenizer(config)
        self.vae = not self.model.is_discrete
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
                if part is not None:
                    part.requires_grad_(False)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if oc.ema else None
        q = self.model.quantize
        learned_codebook = isinstance(q, VectorQuantizer) and not freeze_encoder
        self.clustering = None
        if cc.clustering_vq:
            if not learned_codebook:
                raise UsageError("codebook.clustering_vq updates a VQ codebook: it needs quantizer vq and an encoder "
                                 "that trains (not finetune.freeze_encoder)")
            self.clustering = ClusteringVQ(q.embedding.num_embeddings)
        # FSQ has no learned codebook: nothing can die, so there is nothing to revive; a frozen
        # codebook (decoder fine-tuning) must not change either; the clustering VQ keeps codes alive itself.
        self.usage = CodeUsage(
            codebook_size=q.embedding.num_embeddings, token_size=q.embedding.embedding_dim, decay=cc.usage_decay,
            dead_ratio=cc.dead_ratio, buffer_size=cc.latent_buffer_size,
        ) if learned_codebook and self.clustering is None else None
        self.register_buffer("revived_total", torch.zeros((), dtype=torch.long))
        self.prior = None
        if lc.rate_weight > 0:
            if not isinstance(q, FSQ) or freeze_encoder:
                raise UsageError("loss.rate_weight needs an FSQ tokenizer whose encoder trains (not frozen)")
            self.prior = TokenPrior(levels=q.levels.tolist(), num_tokens=self.model.num_tokens,
                                    num_classes=max(1, rate_classes))
        self.loss_module = None
        if self.proxy is None:
            self.loss_module = self._build_loss()
        elif lc.gan.weight > 0 or lc.perceptual_weight > 0:
            raise UsageError("loss.gan and loss.perceptual_weight train in pixels; the stage-1 recipe (proxy codes) "
                             "has no use for them")
        # Set by take_over_optimisation (the Trainer's settings); 1 and None without it.
        self.accumulate, self.clip, self.clip_algorithm = 1, None, "norm"
        self._micro = 0  # micro-batches accumulated since the last optimiser step
        self._last_step = -1
        self._val_counts: torch.Tensor | None = None
        self.val_preview: tuple[torch.Tensor, torch.Tensor] | None = None  # (inputs, recon) [8,3,H,W]
        self.val_counts: torch.Tensor | None = None  # code counts [K] of the last validation

    def _build_loss(self) -> ReconstructionLoss:
        lc = self.loss_cfg
        perceptual = None
        if lc.perceptual_weight > 0:
            # The pretrained networks, from the given files, the torch hub cache or a download;
            # offline and missing, one line names the file and its source (tokenizer.perceptual).
            perceptual = build_perceptual(
                lc.perceptual, vgg_weights=lc.lpips.vgg_weights, lpips_weights=lc.lpips.lpips_weights,
                convnext_weights=lc.convnext.weights, random_weights=lc.random_weights)
            log.info("perceptual loss: %s, weight %g%s", lc.perceptual, lc.perceptual_weight,
                     " (random weights)" if lc.random_weights else "")
        discriminator = None
        if lc.gan.weight > 0:
            if lc.gan.channels < 32 or lc.gan.channels % 32:
                raise UsageError(f"loss.gan.channels={lc.gan.channels}: the official discriminator's width must be "
                                 "a multiple of 32 (GroupNorm(32)); its default is 128")
            if lc.gan.schedule_processes < 1:
                raise UsageError(f"loss.gan.schedule_processes must be >= 1, got {lc.gan.schedule_processes}")
            discriminator = NLayerDiscriminator(hidden_channels=lc.gan.channels, num_stages=lc.gan.layers)
        elif lc.gan.lecam_weight > 0:
            raise UsageError("loss.gan.lecam_weight regularises the discriminator: it needs loss.gan.weight > 0")
        return ReconstructionLoss(
            discriminator=discriminator, perceptual=perceptual, reconstruction=lc.reconstruction,
            reconstruction_weight=lc.reconstruction_weight, quantizer_weight=lc.quantizer_weight,
            perceptual_weight=lc.perceptual_weight, gan_start_step=lc.gan.start_step, gan_factor=lc.gan.factor,
            gan_weight=lc.gan.weight, lecam_weight=lc.gan.lecam_weight, lecam_ema_decay=lc.gan.lecam_ema_decay,
            vae=self.vae, kl_weight=lc.kl_weight, logvar_init=lc.logvar_init,
        )

    @property
    def discriminator(self) -> NLayerDiscriminator | None:
        return None if self.loss_module is None else self.loss_module.discriminator

    @property
    def perceptual(self) -> PerceptualLoss | None:
        return None if self.loss_module is None else self.loss_module.perceptual_loss

    def take_over_optimisation(self, trainer: L.Trainer) -> None:
        """Move the Trainer's ``accumulate_grad_batches`` and ``gradient_clip_val`` into this module.

        Lightning refuses both with manual optimisation (two optimisers); this module then steps
        every ``accumulate_grad_batches`` micro-batches, each loss divided by that number, and clips
        each optimiser's gradients to ``gradient_clip_val`` (the official ``max_grad_norm``) before
        its step. Call it once, after building the Trainer and before ``trainer.fit``.
        """
        self.accumulate = int(trainer.accumulate_grad_batches)
        self.clip = trainer.gradient_clip_val or None
        self.clip_algorithm = trainer.gradient_clip_algorithm or "norm"
        trainer.accumulate_grad_batches, trainer.gradient_clip_val = 1, None

    # ----- forward pieces
    def _quantizing(self) -> bool:
        return self.hparams.freeze_encoder or self.global_step >= self.codebook_cfg.quantizer_warmup_steps

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        """The VAE's posterior noise, float32 like ``like``: drawn from a generator seeded by the run's
        seed, step, micro-batch and rank, so a resumed run draws what the uninterrupted one drew."""
        g = torch.Generator(device=like.device)
        g.manual_seed(((self.hparams.seed * 1_000_003 + self.global_step) * 1_009 + self._micro) * 1_031
                      + self.global_rank)
        return torch.randn(like.shape, generator=g, device=like.device, dtype=torch.float32)

    def _reconstruct(self, model: nn.Module, images: torch.Tensor, *, quantize: bool = True, sample: bool = False):
        """-> (latents, tokens or None, quantiser losses or None, the ViT decoder's output).
        VAE: the decoder sees a posterior sample with ``sample``, else the mean."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.hparams.freeze_encoder):
            z = model.encode_latents(images)  # (B, N, T); VAE (B, N, 2T)
            if model.quantize is None:  # VAE
                mean, std = official.diagonal_gaussian(z)
                z_q, tokens, qlosses = (mean + std * self._noise(mean) if sample else mean), None, None
            else:
                z_q, tokens, qlosses = model.quantize(z)
        if not quantize and model.quantize is not None:
            # Quantiser warm-up: the decoder sees the continuous (normalised) latents, so
            # encoder and decoder learn an informative latent before codes can cut it off.
            if isinstance(model.quantize, VectorQuantizer):
                z_q = F.normalize(z.float(), dim=-1) if model.quantize.use_l2_norm else z
            else:  # FSQ: bounded but not rounded
                z_q = model.quantize.continuous(z)
        out = model.decoder(z_q.to(z.dtype))  # rgb [B,3,H,W], proxy-code logits [B,K,G,G] or features
        return z, tokens, qlosses, out

    def _model_loss(self, batch, step: int) -> tuple[torch.Tensor, dict, _Forward]:
        """The model's loss on one micro-batch (its mean over the micro-batch), the terms to log and the forward."""
        images = batch[0]
        z, tokens, qlosses, out = self._reconstruct(self.model, images, quantize=self._quantizing(), sample=True)
        if self.proxy is not None:
            codes = self.proxy(images)  # (B, G, G)
            ce = F.cross_entropy(out.float(), codes)
            loss = ce + self.loss_cfg.quantizer_weight * qlosses["quantizer_loss"]
            logs = {"train/ce_loss": ce, "train/proxy_acc": (out.argmax(1) == codes).float().mean(),
                    "train/quantizer_loss": qlosses["quantizer_loss"], "train/commitment_loss": qlosses["commitment_loss"]}
            return loss, logs, _Forward(z, tokens, None)
        recon = self.model.render(out)  # pixels [B,3,H,W], unclamped
        loss, terms = self.loss_module.generator_loss(
            images, recon, global_step=step, quantizer_losses=qlosses, posterior=z if self.vae else None)
        logs = {f"train/{k}": v for k, v in terms.items() if k not in ("total_loss", "d_weight")}
        if self.loss_cfg.gradient_weight > 0:
            edge = gradient_loss(recon, images)
            loss = loss + self.loss_cfg.gradient_weight * edge
            logs["train/gradient_loss"] = edge
        if self.prior is not None:
            labels = batch[1].to(self.device).long()
            u = self.model.quantize.digit_positions(z)
            rate = self.prior(u, labels).mean()
            loss = loss + self.rate_weight_at(step) * rate
            logs.update({"train/rate": rate, "train/code_bits": self.prior.code_bits(u, labels)})
            self.prior.update(self.all_gather(u.detach()).reshape(-1, *u.shape[1:]), self.all_gather(labels).flatten())
        return loss, logs, _Forward(z, tokens, recon)

    def rate_weight_at(self, step: int) -> float:
        """``loss.rate_weight``, grown linearly from 0 over ``loss.rate_warmup_steps``: the codes take
        shape under the reconstruction first, before their rate is pressed down (at full weight from the
        first step, the demo shapes' codes collapsed to one per position within 250 steps)."""
        warmup = self.loss_cfg.rate_warmup_steps
        return self.loss_cfg.rate_weight * (min(1.0, step / warmup) if warmup > 0 else 1.0)

    # ----- training
    def _optimisers(self) -> list:
        opts = self.optimizers()
        return list(opts) if isinstance(opts, (list, tuple)) else [opts]

    def _schedulers(self) -> list:
        scheds = self.lr_schedulers()
        return list(scheds) if isinstance(scheds, (list, tuple)) else [scheds]

    def training_step(self, batch, batch_idx):
        if batch is None:  # every image of the batch was unreadable (collate_skip_bad)
            return None
        images, step = batch[0], self.global_step
        opts, scheds = self._optimisers(), self._schedulers()
        lrs = {"train/lr": opts[0].param_groups[0]["lr"]}  # this step's, before the schedulers move
        if self.discriminator is not None:
            lrs["train/discriminator_lr"] = opts[1].param_groups[0]["lr"]
        loss, logs, fwd = self._model_loss(batch, step)
        self.manual_backward(loss / self.accumulate)
        if self.clustering is not None:
            # After the backward, before the step: the official order (see ClusteringVQ); every
            # rank moves the same codes onto the same (gathered) latents.
            self.clustering.update(self.model.quantize, self.all_gather(fwd.z.detach()))
        if self.usage is not None:
            # All ranks see every rank's tokens, so they revive the same codes with the same latents.
            self.usage.update(self.all_gather(fwd.tokens), self.all_gather(fwd.z.detach()))
            logs.update({"train/dead_codes": self.usage.dead().float().sum(), "train/revived": self.revived_total.float()})
        self._micro += 1
        stepping = self._micro >= self.accumulate
        if stepping:  # counted by Lightning: trainer.global_step is the number of these steps
            opts[0].step()
            opts[0].zero_grad(set_to_none=True)
            scheds[0].step()
        if self.discriminator is not None and self.loss_module.discriminator_active(step):
            d_loss, d_terms = self.loss_module.discriminator_loss(images, fwd.recon, global_step=step)
            self.manual_backward(d_loss / self.accumulate)
            if stepping:
                # Part of the same training step: through the strategy (precision, clipping hook)
                # but not through Lightning's step counter.
                self.trainer.strategy.optimizer_step(opts[1].optimizer, _no_closure, model=self)
                opts[1].zero_grad(set_to_none=True)
                scheds[1].step()
            logs.update({f"train/{k}": v for k, v in d_terms.items()})
        if stepping:
            self._micro = 0
        logs.update({"train/loss": loss.detach(), **lrs})
        self.log_dict(logs, batch_size=images.shape[0])
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=images.shape[0])

    def on_before_optimizer_step(self, optimizer):
        if self.clip:  # each optimiser's own gradients (model, discriminator), as the official max_grad_norm
            self.clip_gradients(optimizer, gradient_clip_val=self.clip, gradient_clip_algorithm=self.clip_algorithm)

    def on_train_start(self):
        self._micro = 0  # a resumed run starts a fresh accumulation window (gradients are not checkpointed)

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
        state = self._optimisers()[0].optimizer.state.get(weight, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][idx] = 0
        self.revived_total += idx.numel()

    # ----- validation: PSNR and codebook usage on held-out images, with the EMA weights
    def on_validation_epoch_start(self):
        self._val_counts = None if self.vae else torch.zeros(self.model.codebook_size, device=self.device)
        self.val_preview = None

    def validation_step(self, batch, batch_idx):
        if batch is None:
            return
        images = batch[0]
        model = self.ema if self.ema is not None else self.model
        _, tokens, _, out = self._reconstruct(model, images)
        recon = model.render(out).float().clamp(0, 1)
        if self._val_counts is not None:
            self._val_counts += token_counts(tokens, self._val_counts.numel())
        logs = {"val/psnr": psnr(recon, images).mean(), "val/rec_loss": reconstruction_loss(recon, images, "l2")}
        if self.proxy is not None:
            logs["val/proxy_acc"] = (out.argmax(1) == self.proxy(images)).float().mean()
        self.log_dict(logs, sync_dist=True, batch_size=images.shape[0], prog_bar=False)
        if batch_idx == 0:
            self.val_preview = (images[:8].detach().float().cpu(), recon[:8].cpu())

    def on_validation_epoch_end(self):
        if self._val_counts is None:  # continuous tokens: no codebook
            return
        counts = self.trainer.strategy.reduce(self._val_counts, reduce_op="sum")
        usage, ppl = codebook_usage(counts), codebook_perplexity(counts)
        self.log_dict({"val/codebook_usage": usage, "val/perplexity": ppl}, prog_bar=False)
        self.val_counts = counts.cpu()

    def configure_optimizers(self):
        """AdamW for the model (and one for the discriminator), the official betas, weight decay and
        exemptions (``official.NO_WEIGHT_DECAY_KEYS``); warm-up then cosine (the discriminator's:
        :func:`official.discriminator_lr_factor`). Stepped by :meth:`training_step`."""
        hp, oc, gan = self.hparams, self.optim_cfg, self.loss_cfg.gan

        def adamw(named, lr):
            groups = param_groups(named, weight_decay=oc.weight_decay, no_decay_keys=official.NO_WEIGHT_DECAY_KEYS)
            # foreach on every device (PyTorch's default takes it on GPUs only): on a CPU the per-tensor loop
            # cost more than the update. Not the fused kernel, which Lightning's precision plugins refuse to clip.
            return torch.optim.AdamW(groups, lr=lr, betas=tuple(oc.betas), foreach=True)

        opt = adamw(self.model.named_parameters(), oc.lr)
        # hp.max_steps is read at each step: a time budget (FitScheduleToTime) moves the cosine's horizon.
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(
            step, warmup_steps=oc.warmup_steps, max_steps=hp.max_steps, base_lr=oc.lr, end_lr=oc.end_lr) / oc.lr)
        if self.discriminator is None:
            return [opt], [sched]
        opt_d = adamw(self.discriminator.named_parameters(), gan.lr or oc.lr)
        sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lambda d_step: official.discriminator_lr_factor(
            d_step, warmup_steps=oc.warmup_steps, max_steps=hp.max_steps, start_step=gan.start_step,
            processes=gan.schedule_processes, base_lr=oc.lr, end_lr=oc.end_lr))
        return [opt, opt_d], [sched, sched_d]

    # Frozen helpers loaded from their own files (the perceptual networks, the VQGAN) stay out of checkpoints.
    _FROZEN = ("loss_module.perceptual_loss.", "proxy.")

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
