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
"""
from __future__ import annotations

import re

import torch
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
