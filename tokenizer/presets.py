"""The nine released TiTok tokenizers (all 256x256, patch 16) and the built-in demo.

Each preset is our TiTok config (fields of :class:`tokenizer.config.TiTokConfig`; unset fields
keep their defaults); ``HUB_REPOS`` and ``RELEASED_FILES`` say where the released weights live.
The kinds:

* legacy two-stage VQ (L-32, B-64, S-128): codebook 4096 x 12, l2-normalised codes, the
  legacy latent layout, a ViT decoder predicting MaskGIT-VQGAN proxy codes;
* single-stage VQ (``*_vq8k``): codebook 8192 x 64 without l2-normalisation, a base or
  small encoder with a large RGB decoder;
* continuous VAE (``*_vae_c16``): a diagonal Gaussian posterior of 16 channels per token.

The official configs are ``configs/infer/TiTok/<preset>.yaml`` in the official repository.
"""
from __future__ import annotations

from titok_core.errors import UsageError
from tokenizer.config import check_keys
from tokenizer.official import VIT_SIZES


def _titok(enc: str, dec: str, num_tokens: int, *, kind: str) -> dict:
    (enc_width, enc_depth, enc_heads), (dec_width, dec_depth, dec_heads) = VIT_SIZES[enc], VIT_SIZES[dec]
    config = {
        "image_size": 256, "patch_size": 16,
        "enc_width": enc_width, "enc_depth": enc_depth, "enc_heads": enc_heads,
        "dec_width": dec_width, "dec_depth": dec_depth, "dec_heads": dec_heads,
        "num_tokens": num_tokens, "quantizer": "vae" if kind == "vae" else "vq",
    }
    if kind == "legacy_vq":
        config.update(codebook_size=4096, token_size=12, use_l2_norm=True, commitment_cost=0.25, legacy_layout=True,
                      decoder_output="proxy_codes", pixel_decoder_hidden_channels=128)
    elif kind == "vq8k":
        config.update(codebook_size=8192, token_size=64, use_l2_norm=False, commitment_cost=0.25, legacy_layout=False,
                      decoder_output="rgb", pixel_decoder_hidden_channels=128)
    else:  # vae: as tokenizer.official.config_from_official writes it
        config.update(codebook_size=None, token_size=16, legacy_layout=False, decoder_output="rgb",
                      pixel_decoder_hidden_channels=128)
    return config


def titok_small(image_size: int = 64) -> dict:
    """The small-data recipe's TiTok (``experiment=small``) for 16, 32 or 64 pixel images.

    A ViT encoder (with a conv stem) and decoder on an 8x8 patch grid (patch = image_size / 8), 32 tokens quantised by
    FSQ with levels 8-5-5-5 (1000 codes, about 10 bits a token), and a small conv pixel decoder
    (MaskGIT-VQGAN blocks ending in a 2x sub-pixel convolution) that keeps edges sharp. Dense
    token-mixing paths (patches -> latents, latents -> patch queries) let it learn in hundreds of
    steps instead of thousands: +2 dB held-out at 300 steps on the demo in an A/B run. Patch
    positions start as 2D sin-cos codes (+0.3 dB at 400 steps).
    """
    if image_size not in (16, 32, 64):
        raise UsageError(f"the small TiTok takes 16, 32 or 64 pixel images, got {image_size}")
    patch = image_size // 8
    levels = patch.bit_length() - 1  # conv upsamplings: patch = 2^levels, the last one sub-pixel
    return {
        "image_size": image_size, "patch_size": patch,
        "enc_width": 128, "enc_depth": 3, "enc_heads": 4,
        "dec_width": 128, "dec_depth": 3, "dec_heads": 4,
        "num_tokens": 32, "quantizer": "fsq", "fsq_levels": [8, 5, 5, 5],
        "codebook_size": 1000, "token_size": 4, "legacy_layout": False, "decoder_output": "conv",
        "pixel_decoder_hidden_channels": 32, "pixel_decoder_channel_mult": [1, 2, 2][-levels:],
        "pixel_decoder_res_blocks": 1, "pixel_decoder_out_upscale": 2, "conv_stem": True,
        "dense_mixing": 8, "sincos_positions": True,
    }


def small_image_size(side: int) -> int:
    """The small TiTok's input size for images whose shorter side is ``side``: 16, 32 or 64."""
    for size in (16, 32):
        if side <= size:
            return size
    return 64


PRESETS: dict[str, dict] = {
    "titok_l32": _titok("large", "large", 32, kind="legacy_vq"),
    "titok_b64": _titok("base", "base", 64, kind="legacy_vq"),
    "titok_s128": _titok("small", "small", 128, kind="legacy_vq"),
    "titok_bl64_vq8k": _titok("base", "large", 64, kind="vq8k"),
    "titok_bl128_vq8k": _titok("base", "large", 128, kind="vq8k"),
    "titok_sl256_vq8k": _titok("small", "large", 256, kind="vq8k"),
    "titok_ll32_vae_c16": _titok("large", "large", 32, kind="vae"),
    "titok_bl64_vae_c16": _titok("base", "large", 64, kind="vae"),
    "titok_bl128_vae_c16": _titok("base", "large", 128, kind="vae"),
    # The small-data recipe (experiment=small, experiment=demo): see titok_small.
    "titok_small": titok_small(64),
}

# Where a user online gets the released weights (Hugging Face repos with config.json +
# model.safetensors, as listed in the official README_TiTok.md), the file names of the
# original .bin release (the official configs' experiment.tokenizer_checkpoint), and which of
# those files are in titok_core.checkpoints.BIN_REPO (the ones the official sampling script fetches).
HUB_REPOS = {
    "titok_l32": "yucornetto/tokenizer_titok_l32_imagenet",
    "titok_b64": "yucornetto/tokenizer_titok_b64_imagenet",
    "titok_s128": "yucornetto/tokenizer_titok_s128_imagenet",
    "titok_bl64_vq8k": "yucornetto/tokenizer_titok_bl64_vq8k_imagenet",
    "titok_bl128_vq8k": "yucornetto/tokenizer_titok_bl128_vq8k_imagenet",
    "titok_sl256_vq8k": "yucornetto/tokenizer_titok_sl256_vq8k_imagenet",
    "titok_ll32_vae_c16": "yucornetto/tokenizer_titok_ll32_vae_c16_imagenet",
    "titok_bl64_vae_c16": "yucornetto/tokenizer_titok_bl64_vae_c16_imagenet",
    "titok_bl128_vae_c16": "yucornetto/tokenizer_titok_bl128_vae_c16_imagenet",
}
RELEASED_FILES = {
    "titok_l32": "tokenizer_titok_l32.bin",
    "titok_b64": "tokenizer_titok_b64.bin",
    "titok_s128": "tokenizer_titok_s128.bin",
    "titok_bl64_vq8k": "tokenizer_titok_bl64_vq8k.bin",
    "titok_bl128_vq8k": "tokenizer_titok_bl128_vq8k.bin",
    "titok_sl256_vq8k": "tokenizer_titok_sl256_vq8k.bin",
    "titok_ll32_vae_c16": "titok_ll32_vae_c16.bin",
    "titok_bl64_vae_c16": "titok_bl64_vae_c16.bin",
    "titok_bl128_vae_c16": "titok_bl128_vae_c16.bin",
}
IN_BIN_REPO = frozenset({"titok_l32", "titok_b64", "titok_s128"})


def resolve_model(model: dict, *, image_side: int | None = None) -> dict:
    """The ``model`` group of tokenizer.train, ``{preset: name, **overrides}`` (``model.preset=<name>``
    plus ``model.<field>`` overrides, or plain TiTokConfig fields) -> our TiTok config (a dict of them).

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
            raise UsageError("model.image_size=auto needs model.preset=titok_small")
        if image_side is None:
            raise UsageError("model.image_size=auto needs the size of the training images")
        config.pop("image_size")
        return {**titok_small(small_image_size(image_side)), **config}
    if preset is not None:
        if preset not in PRESETS:
            raise UsageError(f"unknown tokenizer preset {preset!r}; known: {', '.join(PRESETS)}")
        config = {**PRESETS[preset], **config}
    return config
