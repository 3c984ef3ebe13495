"""Tokenizer training losses: the pixel terms, the hinge GAN, and the official loss module.

:class:`ReconstructionLoss` is the official ``ReconstructionLoss_Stage2`` (stage 2: the decoder
fine-tuned in pixels) and ``ReconstructionLoss_Single_Stage`` (VQ or VAE tokenizers trained end to
end) of ``modeling/modules/losses.py`` in one class: the generator side (reconstruction,
perceptual, quantiser or KL, adversarial) and the discriminator side (hinge, LeCAM). Its quirks
are named in :mod:`tokenizer.official`; its submodules and buffers carry the official names
(``discriminator``, ``perceptual_loss``, ``ema_real_logits_mean``, ``ema_fake_logits_mean``,
``logvar``), so an official loss module's state dict loads into it.

The training loop calls it as the official one does: per batch the generator side
(:meth:`ReconstructionLoss.generator_loss`), a backward and the model's optimiser step; then,
from ``gan_start_step`` on (:meth:`ReconstructionLoss.discriminator_active`), the discriminator
side on the same images (:meth:`ReconstructionLoss.discriminator_loss`), a backward and the
discriminator's optimiser step.
"""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from titok_core.errors import UsageError
from tokenizer import official
from tokenizer.discriminator import NLayerDiscriminator
from tokenizer.perceptual import PerceptualLoss


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean L2 (``"l2"``) or L1 (``"l1"``) distance, in float32."""
    if kind == "l2":
        return F.mse_loss(recon.float(), target.float())
    if kind == "l1":
        return F.l1_loss(recon.float(), target.float())
    raise UsageError(f"reconstruction loss must be 'l1' or 'l2', got {kind!r}")


def gradient_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the images' horizontal and vertical pixel differences, in float32.

    The image-gradient difference loss of Mathieu et al. (2016): a blurred edge has small
    differences where the target has one large one, so L2 alone, which averages over uncertain
    edge positions, is pushed back towards sharp edges. Needs no pretrained network."""
    r, t = recon.float(), target.float()
    dx = F.l1_loss(r[..., :, 1:] - r[..., :, :-1], t[..., :, 1:] - t[..., :, :-1])
    dy = F.l1_loss(r[..., 1:, :] - r[..., :-1, :], t[..., 1:, :] - t[..., :-1, :])
    return dx + dy


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: ``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``, a scalar."""
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


@contextmanager
def frozen(module: nn.Module):
    """Within the block, ``module``'s parameters take no gradient (its output still passes them on
    to its input); their requires_grad flags are restored afterwards."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class ReconstructionLoss(nn.Module):
    """The official tokenizer loss (stage 2 or single stage, VQ or VAE).

    discriminator: the official :class:`NLayerDiscriminator` (None: no adversarial term; then
    ``gan_weight`` must be 0); perceptual: a :class:`PerceptualLoss` (None: no perceptual term;
    then ``perceptual_weight`` must be 0).
    reconstruction: "l2" | "l1"; quantizer_weight: the VQ loss's weight (VQ only).
    gan_start_step, gan_factor, gan_weight: the official ``discriminator_start``,
    ``discriminator_factor`` and ``discriminator_weight``; lecam_weight, lecam_ema_decay: the
    official ``lecam_regularization_weight`` and ``lecam_ema_decay``.
    vae: the KL term (``kl_weight``) instead of the quantiser's, and the reconstruction divided
    by ``exp(logvar_init)``.

    Official recipes: stage 2 ``perceptual "convnext_s"`` at 0.1, ``gan_weight`` 0.01 from step
    20,000, ``lecam_weight`` 0.001, quantizer_weight 0; single stage the mix
    ``lpips-convnext_s-1.0-0.1`` at 1.1, ``gan_weight`` 0.1 from step 200,000, quantizer_weight 1
    (VQ) or kl_weight 1e-6 (VAE).
    """

    def __init__(
        self, *, discriminator: NLayerDiscriminator | None, perceptual: PerceptualLoss | None,
        reconstruction: str = "l2", reconstruction_weight: float = 1.0, quantizer_weight: float = 1.0,
        perceptual_weight: float = 0.1, gan_start_step: int = 20_000, gan_factor: float = 1.0,
        gan_weight: float = 0.01, lecam_weight: float = 0.001, lecam_ema_decay: float = official.LECAM_EMA_DECAY,
        vae: bool = False, kl_weight: float = 1e-6, logvar_init: float = 0.0,
    ):
        super().__init__()
        if reconstruction not in ("l1", "l2"):
            raise UsageError(f"reconstruction loss must be 'l1' or 'l2', got {reconstruction!r}")
        if discriminator is None and (gan_weight > 0 or lecam_weight > 0):
            raise ValueError("gan_weight and lecam_weight need a discriminator")
        if perceptual is None and perceptual_weight > 0:
            raise ValueError("perceptual_weight needs a perceptual loss")
        self.discriminator = discriminator
        self.perceptual_loss = perceptual
        self.reconstruction = reconstruction
        self.reconstruction_weight = reconstruction_weight
        self.quantizer_weight = quantizer_weight
        self.perceptual_weight = perceptual_weight
        self.gan_start_step, self.gan_factor, self.gan_weight = gan_start_step, gan_factor, gan_weight
        self.lecam_weight, self.lecam_ema_decay = lecam_weight, lecam_ema_decay
        if lecam_weight > 0:
            self.register_buffer("ema_real_logits_mean", torch.zeros(1))
            self.register_buffer("ema_fake_logits_mean", torch.zeros(1))
        self.vae = vae
        if vae:
            self.kl_weight = kl_weight
            self.logvar = nn.Parameter(torch.ones(()) * logvar_init, requires_grad=False)

    def discriminator_active(self, global_step: int) -> bool:
        """Whether the discriminator trains (and the adversarial term counts) at ``global_step``."""
        return global_step >= self.gan_start_step

    def generator_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor, *, global_step: int,
        quantizer_losses: Mapping[str, torch.Tensor] | None = None, posterior: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The model's loss: inputs, reconstructions float [B,3,H,W] in [0,1] (the reconstructions
        carry the graph) -> (total float32 scalar, terms).

        VQ: ``quantizer_losses`` as the quantiser returns them (``quantizer_loss``,
        ``commitment_loss``, ``codebook_loss``; zeros when the quantiser is frozen). VAE:
        ``posterior``, the encoder's output float [B,N,2T] (mean and log-variance per token).
        Terms (detached, the official names): total_loss, reconstruction_loss, perceptual_loss,
        quantizer_loss (VQ) or kl_loss (VAE), weighted_gan_loss (each as it enters the total),
        gan_loss (-mean fake logits, unweighted), discriminator_factor, d_weight, and for VQ
        commitment_loss and codebook_loss (unweighted).
        """
        if self.vae == (posterior is None) or (not self.vae and quantizer_losses is None):
            raise ValueError("generator_loss needs posterior= for a VAE loss and quantizer_losses= otherwise")
        with torch.autocast(inputs.device.type, enabled=False):
            inputs = inputs.float().contiguous()
            reconstructions = reconstructions.float().contiguous()
            loss_fn = F.mse_loss if self.reconstruction == "l2" else F.l1_loss
            rec = loss_fn(inputs, reconstructions, reduction="mean") * self.reconstruction_weight
            if self.perceptual_loss is not None:
                perceptual = self.perceptual_loss(inputs, reconstructions).mean()
            else:
                perceptual = torch.zeros((), device=inputs.device)
            gan = torch.zeros((), device=inputs.device)
            factor = self.gan_factor if self.discriminator_active(global_step) else 0
            if factor > 0 and self.gan_weight > 0:
                with frozen(self.discriminator):
                    gan = -torch.mean(self.discriminator(reconstructions))
            d_weight = 1.0 * self.gan_weight  # plain: no adaptive weight (see tokenizer.official)
            weighted_gan = d_weight * factor * gan
            terms = {}
            if self.vae:
                rec = rec / torch.exp(self.logvar)
                kl = official.gaussian_kl(posterior)
                total = rec + self.perceptual_weight * perceptual + self.kl_weight * kl + weighted_gan
                terms["kl_loss"] = self.kl_weight * kl
            else:
                q = quantizer_losses["quantizer_loss"]
                total = rec + self.perceptual_weight * perceptual + self.quantizer_weight * q + weighted_gan
                terms.update(quantizer_loss=self.quantizer_weight * q,
                             commitment_loss=quantizer_losses["commitment_loss"],
                             codebook_loss=quantizer_losses["codebook_loss"])
        terms.update(total_loss=total, reconstruction_loss=rec, perceptual_loss=self.perceptual_weight * perceptual,
                     weighted_gan_loss=weighted_gan, gan_loss=gan,
                     discriminator_factor=torch.tensor(float(factor)), d_weight=torch.tensor(d_weight))
        return total, {k: v.detach() for k, v in terms.items()}

    def discriminator_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor, *, global_step: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss on real ``inputs`` and (detached) ``reconstructions``, float
        [B,3,H,W] in [0,1] -> (float32 scalar, terms). Updates the LeCAM EMAs (when lecam_weight > 0).

        ``factor * hinge + lecam_weight * lecam``, factor = gan_factor from gan_start_step on (0
        before). Terms (detached): discriminator_loss, logits_real, logits_fake (mean logits),
        lecam_loss (weighted).
        """
        if self.discriminator is None:
            raise ValueError("this loss has no discriminator")
        with torch.autocast(inputs.device.type, enabled=False):
            factor = self.gan_factor if self.discriminator_active(global_step) else 0
            logits_real = self.discriminator(inputs.float().detach())
            logits_fake = self.discriminator(reconstructions.float().detach())
            loss = factor * hinge_d_loss(logits_real, logits_fake)
            lecam = torch.zeros((), device=inputs.device)
            if self.lecam_weight > 0:
                real_mean, fake_mean = torch.mean(logits_real), torch.mean(logits_fake)
                lecam = official.lecam_loss(real_mean, fake_mean, self.ema_real_logits_mean,
                                            self.ema_fake_logits_mean) * self.lecam_weight
                self.update_lecam(real_mean, fake_mean)
            loss = loss + lecam
        terms = {"discriminator_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean(),
                 "lecam_loss": lecam}
        return loss, {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def update_lecam(self, real_mean: torch.Tensor, fake_mean: torch.Tensor) -> None:
        """Move the LeCAM EMAs towards this step's mean logits (after the loss has used them)."""
        decay = self.lecam_ema_decay
        self.ema_real_logits_mean.copy_(self.ema_real_logits_mean * decay + real_mean.detach() * (1 - decay))
        self.ema_fake_logits_mean.copy_(self.ema_fake_logits_mean * decay + fake_mean.detach() * (1 - decay))
