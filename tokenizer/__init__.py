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
from collections.abc import Mapping
from pathlib import Path

from titok_core.checkpoints import (
    CheckpointError,
    load_strict,
    read_own_model,
    read_state_dict,
    require_weights,
    resolve_spec,
)
from titok_core.errors import UsageError
from tokenizer import official
from tokenizer.assets import SHIPPED, shipped_path
from tokenizer.config import FIELDS, LEGACY_KEYS, TiTokConfig, config_from_file, make_config
from tokenizer.model import TiTok
from tokenizer.presets import HUB_REPOS, IN_BIN_REPO, PRESETS, RELEASED_FILES

__all__ = [
    "TiTok", "TiTokConfig", "build_tokenizer", "load_tokenizer", "require_discrete", "CheckpointError", "PRESETS",
]


def build_tokenizer(config: TiTokConfig | Mapping) -> TiTok:
    """A TiTokConfig, or a mapping of some of its fields (a preset, ``model.*`` of tokenizer.train;
    the rest keep their defaults) -> a randomly initialised TiTok whose ``.config`` is the full
    TiTokConfig. An old key name (``num_latent_tokens``) or an unknown key raises CheckpointError
    with one line; files written with old names are translated by ``load_tokenizer`` instead."""
    return TiTok(make_config(config))


def require_discrete(tokenizer: TiTok, purpose: str) -> None:
    """Raise CheckpointError (one line) unless ``tokenizer`` makes discrete tokens (vq, fsq), as ``purpose`` needs."""
    if not tokenizer.is_discrete:
        source = getattr(tokenizer, "source", "the tokenizer")
        raise CheckpointError(
            f"{purpose} needs a VQ tokenizer with discrete tokens; {source} is a continuous (VAE) tokenizer"
        )


def _config_from(raw: dict, source: str) -> TiTokConfig:
    if official.is_official_config(raw):
        return make_config(official.config_from_official(raw))
    if set(raw) <= FIELDS | set(LEGACY_KEYS) and "enc_width" in raw:
        return config_from_file(raw)  # our own config.json, of any version
    raise CheckpointError(f"{source} is neither an official TiTok config nor a titok-gen tokenizer config")


def _resolve(spec: str | os.PathLike) -> tuple[TiTokConfig | None, Path | None, str]:
    if isinstance(spec, str) and not spec.strip():  # Path("") is the working directory: say what is wrong
        raise UsageError(f"tokenizer.spec is empty: name a preset ({', '.join(PRESETS)}), a shipped model "
                         f"({', '.join(SHIPPED)}), a file, a folder or a Hugging Face repo id")
    if isinstance(spec, str) and spec in PRESETS:
        return make_config(PRESETS[spec]), None, f"preset:{spec}"
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


def load_tokenizer(
    spec: str | os.PathLike, checkpoint: str | os.PathLike | None = None, *, random_weights: bool = False,
) -> TiTok:
    """Build a TiTok from ``spec`` and load ``checkpoint`` strictly; returns it in eval mode.

    spec: a preset name (the nine released tokenizers ``titok_l32``, ``titok_b64``,
    ``titok_s128``, ``titok_bl64_vq8k``, ``titok_bl128_vq8k``, ``titok_sl256_vq8k``,
    ``titok_ll32_vae_c16``, ``titok_bl64_vae_c16``, ``titok_bl128_vae_c16``, the small-data ``titok_small``),
    a shipped model (``titok_demo``: config and weights),
    an official config file (YAML or HF ``config.json``), a directory with ``config.json`` and
    ``model.safetensors``/``pytorch_model.bin``, a Hugging Face repo id, or one of our own
    ``.safetensors`` model files. checkpoint: official weights (``tokenizer_titok_l32.bin``
    state dicts, HF ``model.safetensors``) or our own model file; it overrides weights found
    through ``spec``. A released preset without weights is refused (one-line CheckpointError naming
    its hub repo and file) unless ``random_weights`` asks for a randomly initialised model.
    """
    config, weights, source = _resolve(spec)
    if checkpoint is not None:
        weights = Path(checkpoint)
    if weights is None and not random_weights:
        require_weights(spec, kind="tokenizer", hub_repos=HUB_REPOS, files=RELEASED_FILES, in_bin_repo=IN_BIN_REPO)
    state_dict = None
    if weights is not None:
        ours = read_own_model(
            weights, kind="tokenizer", config=None if config is None else config.to_dict(),
            translate=lambda raw: config_from_file(raw).to_dict(),  # compared in the complete form
        )
        if ours is not None:
            config, state_dict = TiTokConfig(**ours[0]), ours[1]
        else:
            state_dict = read_state_dict(weights)
            if config is None:
                raise CheckpointError(
                    f"{weights} is a bare state dict: pass a preset or config as spec and the file as checkpoint"
                )
            if official.is_official_state_dict(state_dict):
                state_dict = official.state_dict_from_official(state_dict, config.to_dict())
    model = build_tokenizer(config)
    if state_dict is not None:
        load_strict(model, state_dict, what=f"tokenizer checkpoint {weights}")
    model.source = source if weights is None or source.startswith("shipped:") else str(weights)
    return model.eval()
