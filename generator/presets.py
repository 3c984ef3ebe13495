"""Released TiTok generators (ImageNet 256x256, 1000 classes, TiTok codebook 4096).

Each preset is ``{"model": our generator config, "sampling": the released sampling settings,
"tokenizer": the tokenizer preset whose tokens it models}``. The settings are those of the
official ``configs/infer/TiTok/*.yaml`` as run by ``sample_imagenet_titok.py`` (which always
turns softmax temperature annealing on and keeps guidance_scale_pow at 3.0).
"""
from __future__ import annotations

from titok_core.errors import UsageError


def _maskgit(num_tokens: int) -> dict:
    return {
        "arch": "imagebert", "hidden_size": 768, "depth": 24, "num_heads": 16, "mlp_dim": 3072,
        "codebook_size": 4096, "num_tokens": num_tokens, "num_classes": 1000, "dropout": 0.1, "attn_drop": 0.1,
    }


def _sampling(num_steps: int, guidance_scale: float, guidance_decay: str, randomize_temperature: float) -> dict:
    return {
        "num_steps": num_steps, "guidance_scale": guidance_scale, "guidance_decay": guidance_decay,
        "guidance_scale_pow": 3.0, "randomize_temperature": randomize_temperature,
        "softmax_temperature_annealing": True,
    }


PRESETS: dict[str, dict] = {
    "maskgit_l32": {
        "model": _maskgit(32), "sampling": _sampling(8, 4.5, "linear", 9.5), "tokenizer": "titok_l32",
    },
    "maskgit_b64": {
        "model": _maskgit(64), "sampling": _sampling(8, 3.0, "linear", 11.0), "tokenizer": "titok_b64",
    },
    # Official num_hidden_layers 20 = 10 in-blocks + mid block + 10 out-blocks (see official.uvit_depth);
    # U-ViT blocks carry no dropout in the official code.
    "uvit_s128": {
        "model": {
            "arch": "uvit", "hidden_size": 1024, "depth": 21, "num_heads": 16, "mlp_dim": 4096,
            "codebook_size": 4096, "num_tokens": 128, "num_classes": 1000, "dropout": 0.0, "attn_drop": 0.0,
        },
        "sampling": _sampling(64, 6.9, "power-cosine", 2.8),
        "tokenizer": "titok_s128",
    },
}

# Hugging Face repos (config.json + model.safetensors), the file names of the .bin release, and
# which of those are in titok_core.checkpoints.BIN_REPO (all three).
HUB_REPOS = {
    "maskgit_l32": "yucornetto/generator_titok_l32_imagenet",
    "maskgit_b64": "yucornetto/generator_titok_b64_imagenet",
    "uvit_s128": "yucornetto/generator_titok_s128_imagenet",
}
RELEASED_FILES = {
    "maskgit_l32": "generator_titok_l32.bin",
    "maskgit_b64": "generator_titok_b64.bin",
    "uvit_s128": "generator_titok_s128.bin",
}
IN_BIN_REPO = frozenset(RELEASED_FILES)


def resolve_model(model: dict, *, codebook_size: int, num_tokens: int, num_classes: int) -> tuple[dict, dict]:
    """The ``model`` group of generator.train (``model.preset=<name>`` plus ``model.<field>``
    overrides) -> (our generator config, the preset's sampling settings), sized to the token cache.

    Keys set to None keep the preset's value (or the constructor's default without a preset);
    codebook_size, num_tokens and num_classes come from the data, and a value given for one must agree.
    """
    config = {k: v for k, v in model.items() if v is not None}
    if "sampling" in config:
        raise UsageError("model.sampling was renamed: write the settings under sampling (sampling.guidance_scale=...)")
    preset, sampling = config.pop("preset", None), {}
    if preset is not None:
        if preset not in PRESETS:
            raise UsageError(f"unknown generator preset {preset!r}; known: {', '.join(PRESETS)}")
        config, sampling = {**PRESETS[preset]["model"], **config}, dict(PRESETS[preset]["sampling"])
    for key, value in (("codebook_size", codebook_size), ("num_tokens", num_tokens), ("num_classes", num_classes)):
        if config.setdefault(key, value) != value:
            raise UsageError(f"generator {key}={config[key]} does not match the token cache ({value})")
    return config, sampling
