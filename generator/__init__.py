"""Class-conditional MaskGIT generators over TiTok tokens.

    from generator import load_generator
    gen = load_generator("maskgit_l32", checkpoint="generator_titok_l32.bin")
    logits = gen(tokens, labels)   # int64 [B,N], int64 [B] -> float [B,N,codebook_size]
    gen.sampling                   # the released sampling settings, for sampling.sample_tokens
"""
from __future__ import annotations

import os
from pathlib import Path

from generator import official
from generator.assets import SHIPPED, shipped_path
from generator.model import (
    CONFIG_KEYS,
    LEGACY_KEYS,
    ImageBert,
    MaskedTokenGenerator,
    UViT,
    build_generator,
    config_from_file,
)
from generator.presets import HUB_REPOS, IN_BIN_REPO, PRESETS, RELEASED_FILES
from titok_core.checkpoints import (
    CheckpointError,
    load_strict,
    read_model_extra,
    read_own_model,
    read_state_dict,
    require_weights,
    resolve_spec,
)
from titok_core.errors import UsageError

__all__ = [
    "ImageBert", "UViT", "MaskedTokenGenerator", "build_generator", "load_generator", "CheckpointError", "PRESETS",
]

# Config entries that do not change the weights: a checkpoint may differ from the spec in them.
_NON_WEIGHT_KEYS = {"dropout", "attn_drop"}


def _config_from(raw: dict, source: str) -> tuple[dict, dict]:
    if official.is_official_config(raw):
        return official.config_from_official(raw)
    if "hidden_size" in raw and set(raw) <= set(CONFIG_KEYS) | set(LEGACY_KEYS):
        return {"arch": "imagebert", **config_from_file(raw)}, {}  # our own config.json, of any version
    raise CheckpointError(f"{source} is neither an official generator config nor a titok-gen generator config")


def _resolve(spec: str | os.PathLike) -> tuple[dict | None, dict, Path | None, str]:
    """spec -> (our config or None, sampling settings, weights file or None, source)."""
    if isinstance(spec, str) and not spec.strip():  # Path("") is the working directory: say what is wrong
        raise UsageError(f"generator.spec is empty: name a preset ({', '.join(PRESETS)}), a shipped generator "
                         f"({', '.join(SHIPPED)}), a file, a folder or a Hugging Face repo id")
    if isinstance(spec, str) and spec in PRESETS:
        preset = PRESETS[spec]
        return dict(preset["model"]), dict(preset["sampling"]), None, f"preset:{spec}"
    if isinstance(spec, str) and shipped_path(spec) is not None:
        spec = shipped_path(spec)  # a generator shipped inside the package (maskgit_demo)
    resolved = resolve_spec(spec)
    if resolved is None:
        raise CheckpointError(
            f"unknown generator spec {str(spec)!r}: not a preset ({', '.join(PRESETS)}), shipped generator "
            f"({', '.join(SHIPPED)}), file, directory or Hugging Face repo id"
        )
    if resolved.config is None:
        return None, {}, resolved.weights, resolved.source
    config, sampling = _config_from(resolved.config, resolved.source)
    return config, sampling, resolved.weights, resolved.source


def load_generator(
    spec: str | os.PathLike, checkpoint: str | os.PathLike | None = None, *, random_weights: bool = False,
) -> MaskedTokenGenerator:
    """Build a generator from ``spec`` and load ``checkpoint`` strictly; returns it in eval mode.

    spec: a preset name (``maskgit_l32``, ``maskgit_b64``, ``uvit_s128``), a shipped generator
    (``maskgit_demo``), an official config
    file (YAML such as ``configs/infer/TiTok/titok_l32.yaml``, or an HF ``config.json``), a
    directory with ``config.json`` and ``model.safetensors``/``pytorch_model.bin``, a Hugging
    Face repo id (``yucornetto/generator_titok_l32_imagenet``), or one of our own
    ``.safetensors`` model files. checkpoint: official weights (``generator_titok_l32.bin``,
    HF ``model.safetensors``) or our own model file; it overrides weights found through
    ``spec``. A released preset without weights is refused (one-line CheckpointError naming its
    hub repo and file) unless ``random_weights`` asks for a randomly initialised model.

    The model carries ``.config`` (rebuilds it with ``build_generator``), ``.sampling`` (the
    released or trained-with sampling settings; {} if unknown) and ``.source``. Any mismatch
    raises one CheckpointError naming it.
    """
    config, sampling, weights, source = _resolve(spec)
    if checkpoint is not None:
        weights = Path(checkpoint)
    if weights is None and not random_weights:
        require_weights(spec, kind="generator", hub_repos=HUB_REPOS, files=RELEASED_FILES, in_bin_repo=IN_BIN_REPO)
    state_dict = None
    if weights is not None:
        ours = read_own_model(
            weights, kind="generator", config=None if config is None else {"arch": "imagebert", **config},
            ignore=tuple(_NON_WEIGHT_KEYS), translate=config_from_file,
        )
        if ours is not None:
            config, state_dict = ours
            sampling = {**sampling, **read_model_extra(weights).get("sampling", {})}
        else:
            if config is None:
                raise CheckpointError(
                    f"{weights} is a bare state dict: pass a preset or config as spec and the file as checkpoint"
                )
            state_dict = read_state_dict(weights)
            if official.is_official_state_dict(state_dict):
                state_dict = official.state_dict_from_official(
                    state_dict, {"arch": "imagebert", **config}, what=f"generator checkpoint {weights}"
                )
    model = build_generator(config)
    if state_dict is not None:
        load_strict(model, state_dict, what=f"generator checkpoint {weights}")
    model.sampling = dict(sampling)
    model.source = source if weights is None else str(weights)
    return model.eval()
