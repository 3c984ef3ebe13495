"""TiTok tokenizer: images <-> 1D token sequences.

    from tokenizer import load_tokenizer
    tok = load_tokenizer("titok_l32", checkpoint="tokenizer_titok_l32.bin")
    tokens = tok.encode(images)   # float [B,3,H,W] in [0,1] -> int64 [B, num_tokens]
    images = tok.decode(tokens)   # int64 [B, num_tokens]   -> float [B,3,H,W] in [0,1]

    vae = load_tokenizer("titok_bl64_vae_c16", checkpoint="titok_bl64_vae_c16.bin")
    latents = vae.encode(images)  # -> float32 [B, num_tokens, 16], the posterior mean
    images = vae.decode(latents)  # (vae.encode(images, generator=g) draws a sample instead)
"""
from __future__ import annotations

import os
from pathlib import Path

from tokenizer import official
from tokenizer.assets import SHIPPED, shipped_path
from titok_core.checkpoints import CheckpointError, load_strict, read_own_model, read_state_dict, resolve_spec
from tokenizer.model import TiTok, fsq_codebook_size
from tokenizer.presets import PRESETS

__all__ = ["TiTok", "build_tokenizer", "load_tokenizer", "require_vq", "CheckpointError", "PRESETS"]

_CONFIG_KEYS = set(TiTok.__init__.__kwdefaults__)


def build_tokenizer(config: dict) -> TiTok:
    """Our TiTok config (constructor kwargs) -> a randomly initialised TiTok with ``.config``."""
    unknown = set(config) - _CONFIG_KEYS
    if unknown:
        raise CheckpointError(f"unknown tokenizer config key(s): {', '.join(sorted(unknown))}")
    config = dict(config)
    if config.get("quantizer") == "fsq":  # both follow from the levels
        config["codebook_size"] = fsq_codebook_size(config["fsq_levels"])
        config["token_size"] = len(config["fsq_levels"])
    model = TiTok(**config)
    model.config = config
    return model


def require_vq(tokenizer: TiTok, purpose: str) -> None:
    """Raise CheckpointError (one line) unless ``tokenizer`` makes discrete tokens, as ``purpose`` needs."""
    if getattr(tokenizer, "quantize_mode", "vq") != "vq":
        source = getattr(tokenizer, "source", "the tokenizer")
        raise CheckpointError(
            f"{purpose} needs a VQ tokenizer with discrete tokens; {source} is a continuous (VAE) tokenizer"
        )


def _config_from(raw: dict, source: str) -> dict:
    if official.is_official_config(raw):
        return official.config_from_official(raw)
    if set(raw) <= _CONFIG_KEYS and "enc_width" in raw:
        return dict(raw)
    raise CheckpointError(f"{source} is neither an official TiTok config nor a titok-gen tokenizer config")


def _resolve(spec: str | os.PathLike) -> tuple[dict | None, Path | None, str]:
    if isinstance(spec, str) and spec in PRESETS:
        return dict(PRESETS[spec]), None, f"preset:{spec}"
    if isinstance(spec, str) and spec in SHIPPED:
        return None, shipped_path(spec), f"shipped:{spec}"
    resolved = resolve_spec(spec)
    if resolved is None:
        raise CheckpointError(
            f"unknown tokenizer spec {str(spec)!r}: not a preset ({', '.join(PRESETS)}), shipped model "
            f"({', '.join(SHIPPED)}), file, directory or Hugging Face repo id"
        )
    config = _config_from(resolved.config, resolved.source) if resolved.config is not None else None
    return config, resolved.weights, resolved.source


def load_tokenizer(spec: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> TiTok:
    """Build a TiTok from ``spec`` and load ``checkpoint`` strictly; returns it in eval mode.

    spec: a preset name (the nine released tokenizers ``titok_l32``, ``titok_b64``,
    ``titok_s128``, ``titok_bl64_vq8k``, ``titok_bl128_vq8k``, ``titok_sl256_vq8k``,
    ``titok_ll32_vae_c16``, ``titok_bl64_vae_c16``, ``titok_bl128_vae_c16``, the small-data ``titok_small``), a shipped model (``titok_demo``: config and weights),
    an official config file (YAML or HF ``config.json``), a directory with ``config.json`` and
    ``model.safetensors``/``pytorch_model.bin``, a Hugging Face repo id, or one of our own
    ``.safetensors`` model files. checkpoint: official weights (``tokenizer_titok_l32.bin``
    state dicts, HF ``model.safetensors``) or our own model file; it overrides weights found
    through ``spec``. Without any weights the model is randomly initialised.
    """
    config, weights, source = _resolve(spec)
    if checkpoint is not None:
        weights = Path(checkpoint)
    state_dict = None
    if weights is not None:
        ours = read_own_model(weights, kind="tokenizer", config=config)
        if ours is not None:
            config, state_dict = ours
        else:
            state_dict = read_state_dict(weights)
            if config is None:
                raise CheckpointError(
                    f"{weights} is a bare state dict: pass a preset or config as spec and the file as checkpoint"
                )
            if official.is_official_state_dict(state_dict):
                state_dict = official.state_dict_from_official(state_dict, config)
    model = build_tokenizer(config)
    if state_dict is not None:
        load_strict(model, state_dict, what=f"tokenizer checkpoint {weights}")
    model.source = source if weights is None or source.startswith("shipped:") else str(weights)
    return model.eval()
