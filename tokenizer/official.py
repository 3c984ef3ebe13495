"""Everything the official TiTok code and its released checkpoints need, in one place.

Official code: github.com/bytedance/1d-tokenizer (``modeling/titok.py``, ``modeling/modules``).
This module converts official configs and state dicts into this project's model and names
the computational quirks that the released weights depend on. Each quirk is pinned by a test
in ``tests/test_tokenizer_parity.py``:

* ``legacy_latent_layout`` — the released encoders (``is_legacy``, the official default)
  reshape the [B,N,D] latent features to [B,D,N,1] without a transpose before the 1x1 output
  convolution, mixing features across tokens. Checkpoints were trained with it.
* ``resblock_shortcut_on_output`` — the MaskGIT-VQGAN residual block, when its channel count
  changes, passes its *output* through the 1x1 shortcut and drops the input.
* Quantisation in float32 with the expanded squared distance (see VectorQuantizer).
* The ViT decoder predicts logits over the 1024 MaskGIT-VQGAN codes; their softmax weights
  that codebook and the VQGAN decoder renders pixels (``finetune_decoder``).
* ``diagonal_gaussian`` — the continuous tokenizers (official ``quantize_mode: vae``, our
  ``quantizer: vae``): the encoder's
  2T channels per token are the posterior mean (first T) and log-variance (last T), the
  log-variance clamped to ``LOGVAR_RANGE`` = [-30, 20], std = exp(logvar / 2), all in float32.
  The decoder takes the latents as they are (no scale factor; the one in the official MaskGen
  code belongs to that generator, not to the tokenizer).

The single-stage VQ tokenizers (``*_vq8k``) need no quirk of their own: they are the
non-legacy layout (a per-token output projection, an RGB decoder head) with an 8192 x 64
codebook that is not l2-normalised.

Training (official ``modeling/modules/losses.py``, ``discriminator.py``, ``perceptual_loss.py``,
``lpips.py`` and the quantiser's ``clustering_vq``), pinned by ``tests/test_training_parity.py``
on the golden outputs of tests/fixtures/official_tiny/{discriminator,perceptual,losses,clustering_vq}:

* ``same_padding`` — the discriminator's convolutions pad as TensorFlow's "SAME" (the smaller
  half before, the larger after); its ``BlurBlock`` pads as if its kernel had 4 taps
  (``BLUR_PAD_TAPS``) whatever its size, then filters with stride 2.
* ``DISCRIMINATOR_GRID`` — the discriminator max-pools its features to 16 x 16 whatever the
  image size (small maps are repeated up), so its logits are [B,1,16,16]; it sees images in
  [0, 1] as they are (no rescaling to [-1, 1]).
* The generator's adversarial weight is plain (``ReconstructionLoss.generator_loss``):
  ``discriminator_weight`` times ``discriminator_factor`` from ``discriminator_start`` on, 0
  before; no adaptive weight (the ratio of last-layer gradients of taming-transformers) is
  computed, although the loss reports a ``d_weight`` (= ``discriminator_weight``).
* The discriminator's loss is ``factor * hinge + lecam_weight * lecam``: LeCAM is not gated by the
  factor (the official loop calls the discriminator side only from ``discriminator_start``). LeCAM
  (``lecam_loss``) compares this step's mean logits with the EMAs *before* they move; the EMAs
  (``LECAM_EMA_DECAY`` = 0.999) start at 0 and follow the mean real and fake logits.
* The reconstruction term is reported already weighted; the VAE divides it by ``exp(logvar)``,
  a fixed (untrained) scalar ``logvar_init`` (0); ``gaussian_kl`` sums the KL over channels and
  tokens and divides by the batch size.
* The perceptual loss (``perceptual_mix``): ``lpips``, ``convnext_s`` or
  ``lpips-convnext_s-<a>-<b>`` = (a * LPIPS + b * ConvNeXt) / (a + b); LPIPS sees ``2x - 1``
  shifted and scaled by ``LPIPS_SHIFT`` / ``LPIPS_SCALE`` at the image's own size, normalises
  each feature vector by ``lpips_normalize`` (eps added to the norm) and returns [B,1,1,1];
  ConvNeXt-S sees the images resized by ``convnext_resize`` (bilinear, antialiased, to 224 x 224
  whatever the aspect) and normalised with the ImageNet mean and std, and its loss is the mean
  squared difference of the 1000 class logits.
* ``clustering_replace_weight`` — the clustering VQ (``clustering_vq``, VQ-8k): an EMA
  (``CLUSTERING_DECAY`` = 0.99) of each code's share of the batch's tokens, and every code moves
  towards the latent nearest to it (the unnormalised latent) by ``exp(-share * K * 10 / (1 - 0.99) - 1e-3)``:
  almost all the way for an unused code, not at all for a used one. It runs on every training
  forward, after the codes of that forward were picked.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from titok_core.checkpoints import CheckpointError

# Official ViT size names -> (width, depth, heads). "tiny", "micro" and "mini" are not in the
# official tables: they are the sizes that the parity fixtures (tests/fixtures/official_tiny,
# tests/fixtures/official_vq8k_tiny and official_vae_tiny) added to them.
VIT_SIZES = {
    "micro": (24, 2, 2),
    "mini": (32, 1, 4),
    "tiny": (64, 2, 4),
    "small": (512, 8, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
PIXEL_DECODER_LEVELS = 5  # channel_mult (1, 1, 2, 2, 4) of the MaskGIT-VQGAN decoder
LOGVAR_RANGE = (-30.0, 20.0)  # the official DiagonalGaussianDistribution's clamp of the log-variance


def legacy_latent_layout(x: torch.Tensor) -> torch.Tensor:
    """The legacy encoder's token mixing: [B,N,D] -> [B,N,D] as the official reshape does.

    Official: ``x.reshape(B, D, N, 1)`` then a 1x1 conv over D; as a per-token Linear that
    is ``x.reshape(B, D, N).transpose(1, 2)``.
    """
    b, n, d = x.shape
    return x.reshape(b, d, n).transpose(1, 2)


def resblock_shortcut_on_output(h: torch.Tensor, shortcut: nn.Module) -> torch.Tensor:
    """MaskGIT-VQGAN residual with a channel change: ``h + shortcut(h)``, the input is dropped."""
    return h + shortcut(h)


def diagonal_gaussian(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official VAE posterior: params float [B,N,2T] -> (mean, std), each float32 [B,N,T].

    Official: ``torch.chunk(parameters.float(), 2, dim=1)`` on [B,2T,1,N] (mean first),
    ``logvar.clamp(-30, 20)``, ``std = exp(0.5 * logvar)``, with autocast off.
    """
    with torch.autocast(params.device.type, enabled=False):
        mean, logvar = params.float().chunk(2, dim=-1)
        logvar = logvar.clamp(*LOGVAR_RANGE)
        return mean, torch.exp(0.5 * logvar)


def is_official_config(config: dict) -> bool:
    return isinstance(config.get("model"), dict) and "vq_model" in config["model"]


def config_from_official(config: dict) -> dict:
    """An official TiTok config (YAML or HF config.json, as a dict) -> our TiTok config (TiTokConfig fields).

    The official names map to ours: ``num_latent_tokens`` -> ``num_tokens``, ``quantize_mode``
    (vq | vae) -> ``quantizer`` (vq | vae; fsq is not an official mode), ``is_legacy`` ->
    ``legacy_layout``, ``finetune_decoder`` -> ``decoder_output`` proxy_codes (else rgb).
    """
    vq = config["model"]["vq_model"]
    crop = config.get("dataset", {}).get("preprocessing", {}).get("crop_size", 256)
    mode = vq.get("quantize_mode", "vq")
    if mode not in ("vq", "vae"):
        raise CheckpointError(f"quantize_mode {mode!r} is not supported (only 'vq' and 'vae')")
    sizes = {}
    for part in ("enc", "dec"):
        name = vq[f"vit_{part}_model_size"]
        if name not in VIT_SIZES:
            raise CheckpointError(f"unknown vit_{part}_model_size {name!r}; known: {', '.join(VIT_SIZES)}")
        sizes[part] = VIT_SIZES[name]
    if vq["vit_enc_patch_size"] != vq["vit_dec_patch_size"]:
        raise CheckpointError("encoder and decoder patch sizes differ; not supported")
    legacy = bool(vq.get("is_legacy", True))
    finetune_decoder = bool(vq.get("finetune_decoder", True))
    if legacy and not finetune_decoder:
        raise CheckpointError(
            "a stage-1 TiTok (legacy decoder without finetune_decoder) renders no pixels on its own; "
            "use its stage-2 checkpoint"
        )
    if finetune_decoder and not legacy:
        raise CheckpointError("finetune_decoder with is_legacy: false is not an official combination")
    if finetune_decoder and mode == "vae":
        raise CheckpointError("finetune_decoder needs quantize_mode: vq (as in the official code)")
    config = {
        "image_size": int(crop),
        "patch_size": int(vq["vit_enc_patch_size"]),
        "enc_width": sizes["enc"][0], "enc_depth": sizes["enc"][1], "enc_heads": sizes["enc"][2],
        "dec_width": sizes["dec"][0], "dec_depth": sizes["dec"][1], "dec_heads": sizes["dec"][2],
        "num_tokens": int(vq["num_latent_tokens"]),
        "quantizer": mode,
        "codebook_size": int(vq["codebook_size"]) if mode == "vq" else None,
        "token_size": int(vq["token_size"]),
        "use_l2_norm": bool(vq.get("use_l2_norm", False)),
        "commitment_cost": float(vq.get("commitment_cost", 0.25)),
        "legacy_layout": legacy,
        "decoder_output": "proxy_codes" if finetune_decoder else "rgb",
        "pixel_decoder_hidden_channels": int(vq.get("pixel_decoder_hidden_channels", 128)),
    }
    if mode == "vae":  # no codebook, so no code normalisation nor commitment either
        del config["use_l2_norm"], config["commitment_cost"]
    return config


def is_official_state_dict(state_dict: dict) -> bool:
    return any(".transformer." in k or k.startswith("pixel_quantize.") for k in state_dict)


# (official pattern, our replacement), applied in order to every key.
_RENAMES = [
    (r"\.latent_token_positional_embedding$", ".latent_positional_embedding"),
    (r"\.transformer\.(\d+)\.", r".blocks.\1."),
    (r"\.ln_1\.", ".norm1."),
    (r"\.ln_2\.", ".norm2."),
    (r"\.ln_pre\.", ".norm_pre."),
    (r"\.ln_post\.", ".norm_post."),
    (r"\.attn\.in_proj_weight$", ".attn.qkv.weight"),
    (r"\.attn\.in_proj_bias$", ".attn.qkv.bias"),
    (r"\.attn\.out_proj\.", ".attn.proj."),
    (r"\.mlp\.c_fc\.", ".mlp.0."),
    (r"\.mlp\.c_proj\.", ".mlp.2."),
    (r"^encoder\.conv_out\.", "encoder.proj_out."),
    (r"^decoder\.decoder_embed\.", "decoder.embed."),
    (r"^pixel_quantize\.embedding\.", "proxy_codebook."),
    (r"\.nin_shortcut\.", ".shortcut."),
]


def state_dict_from_official(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Official TiTok key names and layouts -> ours. ``config`` is our (converted) TiTok config."""
    rgb = config["decoder_output"] == "rgb"
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _RENAMES:
            new = re.sub(pattern, repl, new)
        m = re.match(r"^decoder\.ffn\.(\d+)\.(weight|bias)$", new)
        if m:
            new = f"decoder.head.{m.group(2)}" if rgb else f"decoder.head.{m.group(1)}.{m.group(2)}"
        m = re.match(r"^pixel_decoder\.up\.(\d+)\.(block\.)?(.*)$", new)
        if m:
            # Official keeps the up-blocks highest resolution first and runs them reversed.
            level = PIXEL_DECODER_LEVELS - 1 - int(m.group(1))
            new = f"pixel_decoder.up.{level}.{'blocks.' if m.group(2) else ''}{m.group(3)}"
        if new in ("encoder.proj_out.weight",) or re.match(r"^decoder\.head\.(\d+\.)?weight$", new):
            value = value.reshape(value.shape[0], -1)  # 1x1 conv [O,I,1,1] -> Linear [O,I]
        if new in out:
            raise CheckpointError(f"two official keys map to {new}")
        out[new] = value
    return out


# --------------------------------------------------------------------------- training quirks

DISCRIMINATOR_GRID = 16  # AdaptiveMaxPool2d((16, 16)) before the discriminator's logits
BLUR_KERNELS = {3: (1, 2, 1), 4: (1, 3, 3, 1), 5: (1, 4, 6, 4, 1)}  # blur_kernel_size -> binomial taps
BLUR_PAD_TAPS = 4  # BlurBlock pads for a 4-tap, stride-2 filter whatever its kernel size
LECAM_EMA_DECAY = 0.999
CLUSTERING_DECAY = 0.99
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_EPS = 1e-10
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONVNEXT_SIZE = 224
PERCEPTUAL_NAMES = ("lpips", "convnext_s", "lpips-convnext_s-<w_lpips>-<w_convnext>")


def same_padding(size: int, kernel: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one axis: (before, after), the larger half after.

    Official ``Conv2dSame.calc_same_pad``: ``max((ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)``.
    """
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def lecam_loss(real_mean: torch.Tensor, fake_mean: torch.Tensor, ema_real: torch.Tensor,
               ema_fake: torch.Tensor) -> torch.Tensor:
    """LeCAM regularisation (Tseng et al. 2021) as the official ``compute_lecam_loss``, unweighted.

    real_mean, fake_mean: float32 scalars, this step's mean logits; ema_real, ema_fake: float32
    [1], their EMAs before this step's update -> float32 scalar >= 0:
    ``mean(relu(real_mean - ema_fake)^2) + mean(relu(ema_real - fake_mean)^2)``.
    """
    loss = torch.mean(torch.pow(torch.relu(real_mean - ema_fake), 2))
    return loss + torch.mean(torch.pow(torch.relu(ema_real - fake_mean), 2))


def gaussian_kl(params: torch.Tensor) -> torch.Tensor:
    """The VAE's KL term against N(0, 1) as the official loss takes it: params float [B,N,2T]
    (the encoder's mean and log-variance per token) -> float32 scalar.

    Official: ``DiagonalGaussianDistribution.kl()`` (``0.5 * sum(mean^2 + var - 1 - logvar)`` over
    the channels and the token axis, with the log-variance clamped to ``LOGVAR_RANGE`` and
    ``var = exp(logvar)``), then ``sum(kl) / batch``.
    """
    with torch.autocast(params.device.type, enabled=False):
        mean, logvar = params.float().chunk(2, dim=-1)
        logvar = logvar.clamp(*LOGVAR_RANGE)
        kl = 0.5 * torch.sum(mean.pow(2) + torch.exp(logvar) - 1.0 - logvar, dim=(1, 2))  # (B,)
        return kl.sum() / kl.shape[0]


def lpips_normalize(x: torch.Tensor) -> torch.Tensor:
    """LPIPS's unit-length features: float [B,C,H,W] -> x / (||x||_C + 1e-10) (eps added, not a floor)."""
    return x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + LPIPS_EPS)


def convnext_resize(images: torch.Tensor) -> torch.Tensor:
    """The ConvNeXt perceptual loss's input size: float [B,3,H,W] -> [B,3,224,224], bilinear with
    antialiasing (align_corners False), the aspect ratio not kept."""
    return F.interpolate(images, size=CONVNEXT_SIZE, mode="bilinear", align_corners=False, antialias=True)


def perceptual_mix(name: str) -> tuple[float | None, float | None]:
    """An official perceptual loss name -> (LPIPS weight, ConvNeXt weight); None: that network is
    not used. ``"lpips"`` -> (1, None), ``"convnext_s"`` -> (None, 1),
    ``"lpips-convnext_s-1.0-0.1"`` -> (1.0, 0.1); the loss is the weighted mean of the two.

    Raises ValueError (one line) for any other name.
    """
    has_lpips, has_convnext = "lpips" in name, "convnext_s" in name
    if has_lpips and has_convnext:
        parts = name.split("-")
        try:
            a, b = float(parts[-2]), float(parts[-1])
        except (ValueError, IndexError):
            a = b = None
        if a is None or name != f"lpips-convnext_s-{parts[-2]}-{parts[-1]}" or a < 0 or b < 0 or a + b <= 0:
            raise ValueError(f"perceptual loss {name!r}: the mix is spelled lpips-convnext_s-<w_lpips>-<w_convnext>, "
                             "e.g. lpips-convnext_s-1.0-0.1")
        return a, b
    if name == "lpips":
        return 1.0, None
    if name == "convnext_s":
        return None, 1.0
    raise ValueError(f"unknown perceptual loss {name!r}; known: {', '.join(PERCEPTUAL_NAMES)}")


def clustering_replace_weight(embed_prob: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """How far each code moves onto its nearest latent in the clustering VQ: float32 [K] in (0, 1).

    Official: ``exp(-(embed_prob * K * 10) / (1 - decay) - 1e-3)`` with decay 0.99, i.e. about
    0.999 for a code nobody picks and ~0 for one picked at the uniform rate 1/K or more.
    """
    return torch.exp(-(embed_prob * codebook_size * 10) / (1 - CLUSTERING_DECAY) - 1e-3)
