"""Training TiTok from scratch, as a LightningModule.

Two recipes, picked by the model's ``decoder_output``:

* ``"rgb"`` or ``"conv"`` (single stage): reconstruction loss (L2 or L1) + the quantiser's
  codebook and commitment (0.25) losses (none for FSQ), plus an image-gradient L1 term when
  ``loss.gradient_weight > 0``, LPIPS when its weights are given and a hinge PatchGAN loss from
  step ``loss.gan.start_step`` when ``loss.gan.weight > 0``.
* ``"proxy_codes"`` (the official stage 1): cross-entropy of the decoder's logits against the
  codes a frozen MaskGIT-VQGAN assigns to each patch (:mod:`tokenizer.proxy_codes`), plus the
  quantiser losses. The VQGAN decoder is copied in, frozen, so the model renders pixels.

Against codebook collapse: l2-normalised codes and a small code dimension (model config);
:class:`CodeUsage`, which keeps an EMA of how often each code is picked and, every k steps,
moves codes that fell out of use onto random recent encoder outputs; and an optional
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
import math
import os

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from tokenizer import build_tokenizer
from titok_core.errors import UsageError
from titok_core.checkpoints import CheckpointError, read_state_dict
from tokenizer.model import FSQ, VectorQuantizer
from titok_core.lr_schedule import warmup_cosine
from titok_core.metrics import psnr
from titok_core.trainer import ema_update, param_groups

log = logging.getLogger(__name__)

# Besides vectors: embeddings, the latent tokens, norms and biases get no weight decay.
NO_DECAY_KEYS = ("embedding", "latent_tokens", "norm", "bias")


# --------------------------------------------------------------------------- metrics

def token_counts(tokens: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """int64 tokens of any shape -> float32 [codebook_size] counts per code."""
    return torch.bincount(tokens.reshape(-1), minlength=codebook_size).float()


def codebook_usage(counts: torch.Tensor) -> float:
    """Fraction of codes picked at least once: counts [K] -> value in [0, 1]."""
    return float((counts > 0).float().mean())


def codebook_perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of the code frequencies: 1 (one code) .. K (uniform use)."""
    p = counts / counts.sum().clamp(min=1)
    return float(torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum()))


# --------------------------------------------------------------------------- dead codes

class CodeUsage(nn.Module):
    """EMA of code usage plus a ring buffer of recent encoder latents, for dead-code re-init.

    ``usage`` is the EMA of each code's share of the picked tokens (uniform use: 1/K). A code
    is dead when its share is below ``dead_ratio / K``. Buffers travel in the Lightning
    checkpoint, so a resumed run continues with the same statistics.
    """

    def __init__(self, *, codebook_size: int, token_size: int, decay: float = 0.99, dead_ratio: float = 0.03,
                 buffer_size: int = 4096):
        super().__init__()
        self.decay, self.dead_ratio = decay, dead_ratio
        self.register_buffer("usage", torch.zeros(codebook_size))
        self.register_buffer("latents", torch.zeros(buffer_size, token_size))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, tokens: torch.Tensor, latents: torch.Tensor) -> None:
        """tokens int64 [...]; latents float [..., T], the encoder outputs before quantisation."""
        counts = token_counts(tokens, self.usage.numel())
        self.usage.mul_(self.decay).add_(counts / counts.sum(), alpha=1 - self.decay)
        flat = latents.detach().reshape(-1, self.latents.shape[1]).float()[-self.latents.shape[0]:]
        rows = (self.seen + torch.arange(flat.shape[0], device=flat.device)) % self.latents.shape[0]
        self.latents[rows] = flat
        self.seen += flat.shape[0]

    def dead(self) -> torch.Tensor:
        """bool [K]: codes whose usage share fell below dead_ratio / K."""
        return self.usage * self.usage.numel() < self.dead_ratio

    @torch.no_grad()
    def revive(self, codebook: nn.Parameter, *, l2_norm: bool, generator: torch.Generator) -> torch.Tensor:
        """Overwrite dead rows of ``codebook`` [K,T] with random recent latents; returns their indices.

        With l2-normalised codes the new rows get the codebook's mean row norm, so the
        optimiser moves them as fast as the others. Revived codes restart at uniform usage.
        """
        idx = self.dead().nonzero().flatten()
        filled = int(min(self.seen, self.latents.shape[0]))
        if idx.numel() == 0 or filled == 0:
            return idx[:0]
        if idx.numel() <= filled:  # distinct latents where there are enough
            pick = torch.randperm(filled, generator=generator)[: idx.numel()]
        else:
            pick = torch.randint(filled, (idx.numel(),), generator=generator)
        pick = pick.to(self.latents.device)
        new = self.latents[pick]
        if l2_norm:
            new = F.normalize(new, dim=-1) * codebook.norm(dim=-1).mean()
        codebook[idx] = new.to(codebook.dtype)
        self.usage[idx] = 1.0 / self.usage.numel()
        return idx


# --------------------------------------------------------------------------- losses

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


class TokenPrior(nn.Module):
    """A factorised prior over FSQ digits, for a rate term that makes tokens easy to generate.

    It keeps, per class, token position and FSQ channel, an EMA of how often each level is used
    and scores the encoder's unrounded latents under it: the rate of an image is the sum over its
    digits of -log p(level), interpolated linearly between the two levels a latent sits between,
    so the gradient moves each latent towards the more common of its neighbours. A small rate under
    a prior that treats every digit as independent (given the class) asks the encoder for codes
    whose digits carry little shared information, which a generator can learn from few examples.
    Same idea as the factorised entropy model of learned compression (Balle et al. 2017).
    """

    def __init__(self, *, levels: list[int], num_tokens: int, num_classes: int = 1, decay: float = 0.995,
                 smoothing: float = 0.01):
        super().__init__()
        lv = torch.tensor([int(n) for n in levels], dtype=torch.long)
        self.register_buffer("levels", lv, persistent=False)
        top = int(lv.max())
        # Levels a channel does not have get no mass.
        self.register_buffer("valid", torch.arange(top)[None] < lv[:, None], persistent=False)  # (T, Lmax)
        start = self.valid.float() / lv[:, None]  # uniform; each (class, token, channel) row sums to 1
        self.register_buffer("counts", start.expand(num_classes, num_tokens, -1, -1).clone())
        self.decay, self.smoothing = decay, smoothing

    def _rows(self, labels: torch.Tensor) -> torch.Tensor:
        """The prior's row of each label: the label itself, or row 0 for all when the prior has one."""
        return labels.long().clamp(max=self.counts.shape[0] - 1)

    def log_probs(self, labels: torch.Tensor) -> torch.Tensor:
        """int64 [B] -> float32 [B,N,T,Lmax] log-probabilities of each level (-inf where none)."""
        c = self.counts[self._rows(labels)] + self.smoothing
        c = c.masked_fill(~self.valid, 0.0)
        return (c / c.sum(-1, keepdim=True)).log()

    def _weights(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lo = u.detach().floor().clamp(min=0).minimum((self.levels - 2).float()).long()
        return lo, lo + 1, u - lo

    def forward(self, u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """u: digit positions float [B,N,T] (FSQ.digit_positions); labels int64 [B] -> rate in nats [B,N]."""
        logp = self.log_probs(labels)
        lo, hi, f = self._weights(u)
        lp = (1 - f) * logp.gather(-1, lo[..., None])[..., 0] + f * logp.gather(-1, hi[..., None])[..., 0]
        return -lp.sum(-1)

    @torch.no_grad()
    def update(self, u: torch.Tensor, labels: torch.Tensor) -> None:
        """Move the counts towards the levels of this batch (all ranks' batches: gather first)."""
        lo, hi, f = self._weights(u.float())
        add = torch.zeros(*u.shape, self.valid.shape[1], device=u.device)
        add.scatter_add_(-1, lo[..., None], (1 - f)[..., None]).scatter_add_(-1, hi[..., None], f[..., None])
        labels = self._rows(labels)
        batch = torch.zeros_like(self.counts).index_add_(0, labels, add)
        seen = torch.bincount(labels, minlength=self.counts.shape[0]).float()[:, None, None, None]
        # Each class decays by the images it got, so rare classes keep their counts.
        keep = self.decay ** seen
        self.counts.mul_(keep).add_(batch * (1 - self.decay))

    @torch.no_grad()
    def code_bits(self, u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Bits per token of the rounded codes under the prior: float32 scalar."""
        digits = u.round().long()
        return -self.log_probs(labels).gather(-1, digits[..., None]).sum((-1, -2)).mean() / math.log(2)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: strided 4x4 convs -> one logit per patch. [B,3,H,W] in [0,1] -> [B,1,h,w]."""

    def __init__(self, *, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(c, out, 4, stride=stride, padding=1), nn.GroupNorm(min(32, out // 4), out),
                       nn.LeakyReLU(0.2)]
            c = out
        layers.append(nn.Conv2d(c, 1, 4, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1)


class LPIPS(nn.Module):
    """LPIPS (VGG16, v0.1) from two local files, never downloaded.

    vgg_weights: torchvision's ``vgg16-397923af.pth`` (keys ``features.N.*``);
    lpips_weights: the lpips package's ``weights/v0.1/vgg.pth`` (keys ``linK.model.1.weight``).
    forward: two float [B,3,H,W] in [0,1] -> float [B] distances.
    """

    CUTS = (4, 9, 16, 23, 30)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self, vgg_weights: str | os.PathLike, lpips_weights: str | os.PathLike):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        features = make_layers(cfgs["D"])[: self.CUTS[-1]]
        vgg = {k[len("features."):]: v for k, v in read_state_dict(vgg_weights).items() if k.startswith("features.")}
        vgg = {k: v for k, v in vgg.items() if int(k.split(".")[0]) < self.CUTS[-1]}
        features.load_state_dict(vgg, strict=True)
        starts = (0, *self.CUTS[:-1])
        self.slices = nn.ModuleList(features[a:b] for a, b in zip(starts, self.CUTS))
        lin = read_state_dict(lpips_weights)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS)
        for k, conv in enumerate(self.lins):
            key = f"lin{k}.model.1.weight"
            if key not in lin:
                raise CheckpointError(f"{lpips_weights} is not an LPIPS v0.1 VGG file (no {key})")
            conv.weight.data.copy_(lin[key])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = ((torch.cat([a, b]) * 2 - 1) - self.shift) / self.scale
        total = 0.0
        for block, lin in zip(self.slices, self.lins):
            x = block(x)
            fa, fb = F.normalize(x.float(), dim=1, eps=1e-10).chunk(2)
            total = total + lin((fa - fb).pow(2)).mean(dim=(1, 2, 3))
        return total


# --------------------------------------------------------------------------- module

@dataclass(frozen=True)
class LpipsConfig:
    vgg_weights: str | None = None  # torchvision vgg16-397923af.pth
    lpips_weights: str | None = None  # the lpips package's weights/v0.1/vgg.pth


@dataclass(frozen=True)
class GanConfig:
    weight: float = 0.0  # 0: no discriminator
    start_step: int = 20000
    lr: float | None = None  # None: optim.lr
    channels: int = 64
    layers: int = 3


@dataclass(frozen=True)
class LossConfig:
    """The ``loss`` group of tokenizer.train (conf/tokenizer/train.yaml says what each key does)."""

    reconstruction: str = "l2"
    reconstruction_weight: float = 1.0
    rate_weight: float = 0.0
    gradient_weight: float = 0.0
    quantizer_weight: float = 1.0
    perceptual_weight: float = 0.0
    lpips: LpipsConfig = LpipsConfig()
    gan: GanConfig = GanConfig()

    @classmethod
    def from_mapping(cls, group: Mapping) -> "LossConfig":
        group = dict(group)
        lpips, gan = LpipsConfig(**dict(group.pop("lpips", {}))), GanConfig(**dict(group.pop("gan", {})))
        return cls(**group, lpips=lpips, gan=gan)


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
        self.lpips = None
        if lc.perceptual_weight > 0:
            paths = [p for p in (lc.lpips.vgg_weights, lc.lpips.lpips_weights) if p]
            if len(paths) == 2 and all(os.path.isfile(p) for p in paths):
                self.lpips = LPIPS(lc.lpips.vgg_weights, lc.lpips.lpips_weights)
                log.info("perceptual loss: LPIPS-VGG, weight %g", lc.perceptual_weight)
            else:
                log.warning("perceptual loss skipped: LPIPS weights not found (loss.lpips.vgg_weights=%s, "
                            "loss.lpips.lpips_weights=%s)", lc.lpips.vgg_weights, lc.lpips.lpips_weights)
        self.discriminator = None
        if lc.gan.weight > 0:
            self.discriminator = PatchDiscriminator(channels=lc.gan.channels, num_layers=lc.gan.layers)
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
            if self.lpips is not None:
                p = self.lpips(images, out).mean()
                loss = loss + self.loss_cfg.perceptual_weight * p
                logs["train/perceptual_loss"] = p
            if self.discriminator is not None:
                # Generator and discriminator share one backward: the discriminator is frozen
                # while it scores the generator's output and sees only detached images itself.
                factor = 1.0 if self.global_step >= self.loss_cfg.gan.start_step else 0.0
                self.discriminator.requires_grad_(False)
                g_loss = -self.discriminator(out.float()).mean()
                self.discriminator.requires_grad_(True)
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

    # Frozen helpers loaded from their own files (LPIPS, the VQGAN) stay out of checkpoints.
    _FROZEN = ("lpips.", "proxy.")

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
