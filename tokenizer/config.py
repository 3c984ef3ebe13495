"""TiTok's configuration: one dataclass, the only spelling our code and our model files use.

    from tokenizer.config import TiTokConfig
    config = TiTokConfig(image_size=64, patch_size=8, num_tokens=32, quantizer="fsq", fsq_levels=(8, 5, 5, 5))

A :class:`TiTokConfig` is complete and canonical: every field has a value, the quantiser's
derived sizes are filled in (FSQ: ``codebook_size`` = prod(levels), ``token_size`` =
len(levels); VAE: no codebook) and sequences are tuples. Two configs that build the same
model compare equal, and ``dataclasses.asdict`` of one is what our ``.safetensors`` files
store (``titok_gen.config``), so the token-cache fingerprint (``generator.cache``) does not
depend on how a config was spelt.

Spellings of older files are translated in one place, :func:`config_from_file` (see
``LEGACY_KEYS``); a config written by hand or by an experiment with an old key fails with one
line naming the new key (:func:`check_keys`). Official configs are converted by
:func:`tokenizer.official.config_from_official`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from titok_core.checkpoints import CheckpointError
from titok_core.errors import UsageError

QUANTIZERS = ("vq", "fsq", "vae")
DECODER_OUTPUTS = ("proxy_codes", "rgb", "conv")


@dataclass(frozen=True)
class TiTokConfig:
    """Everything that builds a :class:`tokenizer.model.TiTok`. The defaults are TiTok-L-32's.

    ``quantizer`` is the one switch between token kinds:

    * ``"vq"``: TiTok's nearest-code quantiser, ``codebook_size`` x ``token_size`` codes
      (l2-normalised with ``use_l2_norm``); discrete tokens;
    * ``"fsq"``: finite scalar quantisation with ``fsq_levels`` per channel; discrete tokens,
      ``codebook_size`` = prod(levels) and ``token_size`` = len(levels) follow from the levels;
    * ``"vae"``: continuous tokens (the released ``*_vae_c16`` tokenizers), a diagonal Gaussian
      posterior of ``token_size`` channels per token; no codebook (``codebook_size`` is None).

    ``decoder_output``: ``"proxy_codes"`` (the released two-stage design), ``"rgb"`` (single
    stage) or ``"conv"`` (a ViT feature grid that a small conv pixel decoder upsamples); see
    :class:`tokenizer.model.TiTok`.
    """

    image_size: int = 256
    patch_size: int = 16
    # ViT encoder and decoder
    enc_width: int = 1024
    enc_depth: int = 24
    enc_heads: int = 16
    dec_width: int = 1024
    dec_depth: int = 24
    dec_heads: int = 16
    num_tokens: int = 32  # latent tokens per image (the official num_latent_tokens)
    # quantiser
    quantizer: str = "vq"  # vq | fsq | vae
    codebook_size: int | None = 4096
    token_size: int = 12
    use_l2_norm: bool = True  # vq
    commitment_cost: float = 0.25  # vq
    fsq_levels: tuple[int, ...] = ()  # fsq
    # layouts and pixel decoders
    legacy_layout: bool = True  # only the released legacy checkpoints need it
    decoder_output: str = "proxy_codes"  # proxy_codes | rgb | conv
    proxy_codebook_size: int = 1024  # proxy_codes: the MaskGIT-VQGAN codebook
    proxy_code_dim: int = 256
    pixel_decoder_hidden_channels: int = 128  # proxy_codes and conv
    pixel_decoder_channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # conv
    pixel_decoder_res_blocks: int = 2  # conv
    pixel_decoder_out_upscale: int = 1  # conv: a last sub-pixel upsampling
    # small-scale training aids
    conv_stem: bool = False
    dense_mixing: int = 0
    sincos_positions: bool = False

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise UsageError(f"quantizer must be one of {' | '.join(QUANTIZERS)}, got {self.quantizer!r}")
        if self.decoder_output not in DECODER_OUTPUTS:
            raise UsageError(f"decoder_output must be 'proxy_codes', 'rgb' or 'conv', got {self.decoder_output!r}")
        set_ = object.__setattr__  # frozen: the canonical form is fixed here, once
        set_(self, "fsq_levels", tuple(int(n) for n in self.fsq_levels))
        set_(self, "pixel_decoder_channel_mult", tuple(int(m) for m in self.pixel_decoder_channel_mult))
        set_(self, "commitment_cost", float(self.commitment_cost))
        if self.quantizer == "fsq":
            if not self.fsq_levels or any(n < 2 for n in self.fsq_levels):
                raise UsageError(f"quantizer fsq needs fsq_levels, integers >= 2, got {list(self.fsq_levels)}")
            size = 1
            for n in self.fsq_levels:
                size *= n
            set_(self, "codebook_size", size)
            set_(self, "token_size", len(self.fsq_levels))
        elif self.quantizer == "vae":
            set_(self, "codebook_size", None)
        elif self.codebook_size is None:
            raise UsageError("quantizer vq needs a codebook_size")
        if self.codebook_size is not None:
            set_(self, "codebook_size", int(self.codebook_size))

    @property
    def is_discrete(self) -> bool:
        """True when the tokens are ids into a codebook (vq, fsq); False for continuous latents (vae)."""
        return self.quantizer != "vae"

    def to_dict(self) -> dict:
        """The plain-JSON form that our model files store (``dataclasses.asdict``)."""
        return dataclasses.asdict(self)


FIELDS = frozenset(f.name for f in dataclasses.fields(TiTokConfig))

# Keys that files written before the rename spell differently, and what became of each. Only
# files are translated (config_from_file); a config passed in with an old key fails (check_keys).
LEGACY_KEYS = {
    "num_latent_tokens": "num_latent_tokens was renamed num_tokens",
    "quantize_mode": "quantize_mode was merged into quantizer: vq | fsq | vae",
}


def check_keys(config: Mapping, what: str = "tokenizer config") -> None:
    """Raise CheckpointError (one line) for an old spelling or an unknown key in ``config``."""
    old = [LEGACY_KEYS[k] for k in sorted(set(config) & set(LEGACY_KEYS))]
    if old:
        raise CheckpointError("; ".join(old))
    unknown = set(config) - FIELDS
    if unknown:
        raise CheckpointError(f"unknown {what} key(s): {', '.join(sorted(unknown))}")


def make_config(config: TiTokConfig | Mapping) -> TiTokConfig:
    """A TiTokConfig, or a mapping of its fields (any subset; the rest keep their defaults) -> TiTokConfig.

    Old spellings and unknown keys raise CheckpointError with one line.
    """
    if isinstance(config, TiTokConfig):
        return config
    check_keys(config)
    return TiTokConfig(**config)


def translate_legacy_keys(raw: Mapping) -> dict:
    """A config as files written before the rename spell it -> today's keys (a newer one is unchanged).

    ``num_latent_tokens`` -> ``num_tokens``; ``quantize_mode: vae`` -> ``quantizer: vae``
    (with ``quantize_mode: vq``, the file's ``quantizer`` key, vq or fsq, already says which).
    """
    config = dict(raw)
    if "num_latent_tokens" in config:
        config.setdefault("num_tokens", config["num_latent_tokens"])
        del config["num_latent_tokens"]
    mode = config.pop("quantize_mode", "vq")
    if mode == "vae":
        config["quantizer"] = "vae"
    elif mode != "vq":
        raise CheckpointError(f"quantize_mode {mode!r} is not supported (only 'vq' and 'vae')")
    return config


def config_from_file(raw: Mapping) -> TiTokConfig:
    """The tokenizer config stored in a file (our ``titok_gen.config`` metadata or our own JSON
    config), whichever version wrote it -> TiTokConfig. The one place where old spellings are read."""
    return make_config(translate_legacy_keys(raw))
