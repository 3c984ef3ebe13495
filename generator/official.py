"""Everything the official MaskGIT generators and their released checkpoints need, in one place.

Official code: github.com/bytedance/1d-tokenizer, ``modeling/maskgit.py`` (``ImageBert``, a
Hugging Face ``BertModel`` inside, and ``UViTBert``) and ``modeling/modules/blocks.py``
(``UViTBlock``). This module converts official configs and state dicts to this project's
models and names each quirk that the released weights or the released samples depend on.
Each is pinned by a test in ``tests/test_generator_parity.py``:

* ``BERT_LAYER_NORM_EPS`` — ImageBert is a post-LN BERT with LayerNorm eps 1e-12 (U-ViT uses
  the PyTorch default 1e-5).
* BERT's token-type embedding: row 0 is added at every position (the official forward never
  passes token types); row 1 is never used, so the conversion keeps row 0 only.
* ``uvit_depth`` — ``num_hidden_layers: 20`` builds 10 in-blocks, a mid block and 10
  out-blocks: 21 blocks.
* U-ViT blocks are built without dropout whatever ``dropout``/``attn_drop`` say.
* ``guidance_scale_at`` — the scale schedules of ``ImageBert.generate``: "linear" updates the
  scale *after* each step, so step i uses (i / num_steps) * guidance_scale and the first step
  is unguided (one conditional forward only); "power-cosine" uses step / num_steps and is
  computed in float32 tensors.
* ``apply_guidance`` — "constant" and "linear" extrapolate from the *conditional* logits,
  cond + s * (cond - uncond), so a scale s is the usual CFG scale s + 1; "power-cosine" uses
  the usual form uncond + s * (cond - uncond).
* ``num_to_remask`` — the number of tokens re-masked after a step is clamped with the masked
  count of the batch's *first* row, and applied to every row.
* Released sampling: ``sample_imagenet_titok.py`` always passes
  ``softmax_temperature_annealing=True`` and the default ``guidance_scale_pow=3.0``.
"""
from __future__ import annotations

import math
import re

import torch

from titok_core.checkpoints import CheckpointError, key_mismatches
from titok_core.errors import UsageError

BERT_LAYER_NORM_EPS = 1e-12
GUIDANCE_DECAYS = ("constant", "linear", "power-cosine")
_ARCHS = {"ViT": "imagebert", "UViT": "uvit"}


# --------------------------------------------------------------------------- configs


def is_official_config(config: dict) -> bool:
    return isinstance(config.get("model"), dict) and "generator" in config["model"]


def uvit_depth(num_hidden_layers: int) -> int:
    """Official UViTBert block count: num_hidden_layers // 2 in and out blocks plus a mid block."""
    return 2 * (num_hidden_layers // 2) + 1


def config_from_official(config: dict) -> tuple[dict, dict]:
    """An official config (YAML, or the HF config.json dump) -> (our generator config, sampling settings).

    The HF ``config.json`` files were written without resolving OmegaConf interpolations
    (``image_seq_len: "${model.vq_model.num_latent_tokens}"``), so they are resolved here.
    """
    from omegaconf import OmegaConf

    try:
        config = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
        gen, vq = config["model"]["generator"], config["model"]["vq_model"]
        model_type = gen.get("model_type", "ViT")
        if model_type not in _ARCHS:
            known = ", ".join(_ARCHS)
            raise CheckpointError(f"official generator model_type {model_type!r} is not supported ({known})")
        arch = _ARCHS[model_type]
        hidden, layers, inter = int(gen["hidden_size"]), int(gen["num_hidden_layers"]), int(gen["intermediate_size"])
        ours = {
            "arch": arch,
            "hidden_size": hidden,
            "depth": layers if arch == "imagebert" else uvit_depth(layers),
            "num_heads": int(gen["num_attention_heads"]),
            # UViTBlock rebuilds the width from mlp_ratio = intermediate / hidden.
            "mlp_dim": inter if arch == "imagebert" else int(hidden * (inter / hidden)),
            "codebook_size": int(vq["codebook_size"]),
            "num_tokens": int(gen["image_seq_len"]),
            "num_classes": int(gen["condition_num_classes"]),
            "dropout": float(gen.get("dropout", 0.1)) if arch == "imagebert" else 0.0,
            "attn_drop": float(gen.get("attn_drop", 0.1)) if arch == "imagebert" else 0.0,
        }
        sampling = {
            "num_steps": int(gen.get("num_steps", 8)),
            "guidance_scale": float(gen.get("guidance_scale", 3.0)),
            "guidance_decay": str(gen.get("guidance_decay", "constant")),
            "guidance_scale_pow": 3.0,
            "randomize_temperature": float(gen.get("randomize_temperature", 4.5)),
            "softmax_temperature_annealing": True,
        }
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a missing key or a bad value in a foreign file
        raise CheckpointError(f"not a usable official generator config: {type(exc).__name__}: {exc}") from exc
    return ours, sampling


# --------------------------------------------------------------------------- state dicts


def is_official_state_dict(state_dict: dict) -> bool:
    return "model.embeddings.word_embeddings.weight" in state_dict or "embeddings.weight" in state_dict


# Buffers that some transformers versions saved with BertModel; not weights.
_IGNORED = {"model.embeddings.position_ids", "model.embeddings.token_type_ids"}

# ImageBert: (official key, our key) per layer; query/key/value are fused into qkv below.
_BERT_LAYER = [
    ("attention.output.dense", "attn.proj"),
    ("attention.output.LayerNorm", "norm1"),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
    ("output.LayerNorm", "norm2"),
]
_BERT_TOP = [
    ("model.embeddings.word_embeddings.weight", "token_embed.weight"),
    ("model.embeddings.LayerNorm.weight", "embed_norm.weight"),
    ("model.embeddings.LayerNorm.bias", "embed_norm.bias"),
    ("model.lm_head.weight", "head.weight"),
    ("model.lm_head.bias", "head.bias"),
]
# UViT: regex renames inside a block, and top-level renames.
_UVIT_BLOCK = [(r"\.skip_linear\.", ".skip_proj.")]
_UVIT_TOP = [("embeddings.weight", "token_embed.weight"), ("lm_head.", "head.")]


def official_key_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every key of the official state dict for our ``config``, with its shape."""
    d, k, n, m = config["hidden_size"], config["codebook_size"], config["num_tokens"], config["mlp_dim"]
    vocab = k + config["num_classes"] + 2
    shapes: dict[str, tuple[int, ...]] = {}
    if config["arch"] == "imagebert":
        shapes.update({
            "model.embeddings.word_embeddings.weight": (vocab, d),
            "model.embeddings.position_embeddings.weight": (n + 1, d),
            "model.embeddings.token_type_embeddings.weight": (2, d),
            "model.embeddings.LayerNorm.weight": (d,), "model.embeddings.LayerNorm.bias": (d,),
        })
        for i in range(config["depth"]):
            p = f"model.encoder.layer.{i}."
            for name in ("query", "key", "value"):
                shapes[f"{p}attention.self.{name}.weight"] = (d, d)
                shapes[f"{p}attention.self.{name}.bias"] = (d,)
            shapes.update({
                f"{p}attention.output.dense.weight": (d, d), f"{p}attention.output.dense.bias": (d,),
                f"{p}attention.output.LayerNorm.weight": (d,), f"{p}attention.output.LayerNorm.bias": (d,),
                f"{p}intermediate.dense.weight": (m, d), f"{p}intermediate.dense.bias": (m,),
                f"{p}output.dense.weight": (d, m), f"{p}output.dense.bias": (d,),
                f"{p}output.LayerNorm.weight": (d,), f"{p}output.LayerNorm.bias": (d,),
            })
        shapes.update({"model.lm_head.weight": (k, d), "model.lm_head.bias": (k,)})
        return shapes
    shapes.update({"pos_embed": (1, n + 1, d), "embeddings.weight": (vocab, d)})
    half = config["depth"] // 2
    blocks = [f"in_blocks.{i}" for i in range(half)] + ["mid_block"] + [f"out_blocks.{i}" for i in range(half)]
    for b in blocks:
        shapes.update({
            f"{b}.norm1.weight": (d,), f"{b}.norm1.bias": (d,), f"{b}.attn.qkv.weight": (3 * d, d),
            f"{b}.attn.proj.weight": (d, d), f"{b}.attn.proj.bias": (d,),
            f"{b}.norm2.weight": (d,), f"{b}.norm2.bias": (d,),
            f"{b}.mlp.fc1.weight": (m, d), f"{b}.mlp.fc1.bias": (m,),
            f"{b}.mlp.fc2.weight": (d, m), f"{b}.mlp.fc2.bias": (d,),
        })
        if b.startswith("out_blocks"):
            shapes.update({f"{b}.skip_linear.weight": (d, 2 * d), f"{b}.skip_linear.bias": (d,)})
    shapes.update({"norm.weight": (d,), "norm.bias": (d,), "lm_head.weight": (k, d), "lm_head.bias": (k,)})
    return shapes


def check_official_state_dict(state_dict: dict[str, torch.Tensor], config: dict, *, what: str) -> None:
    """Raise one CheckpointError naming the missing, unexpected and mis-shaped official keys."""
    expected = official_key_shapes(config)
    got = {k: tuple(v.shape) for k, v in state_dict.items() if k not in _IGNORED}
    problems = key_mismatches(expected, got)
    if problems:
        raise CheckpointError(f"{what} does not match the official {config['arch']} layout: " + "; ".join(problems))


def state_dict_from_official(
    state_dict: dict[str, torch.Tensor], config: dict, *, what: str = "official checkpoint"
) -> dict[str, torch.Tensor]:
    """Official generator key names and layouts -> ours. ``config`` is our (converted) config.

    The official keys and shapes are checked first (one CheckpointError naming them); every
    official key is used exactly once and the result has exactly our model's keys.
    """
    check_official_state_dict(state_dict, config, what=what)
    sd = {k: v for k, v in state_dict.items() if k not in _IGNORED}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return sd[key]

    if config["arch"] == "imagebert":
        for old, new in _BERT_TOP:
            out[new] = take(old)
        out["pos_embed"] = take("model.embeddings.position_embeddings.weight").unsqueeze(0)  # (1, L, D)
        out["type_embed"] = take("model.embeddings.token_type_embeddings.weight")[0].clone()  # row 0 only
        for i in range(config["depth"]):
            p, q = f"model.encoder.layer.{i}.", f"blocks.{i}."
            for part in ("weight", "bias"):
                out[f"{q}attn.qkv.{part}"] = torch.cat(
                    [take(f"{p}attention.self.{name}.{part}") for name in ("query", "key", "value")]
                )
                for old, new in _BERT_LAYER:
                    out[f"{q}{new}.{part}"] = take(f"{p}{old}.{part}")
    else:
        for key in sd:
            new = key
            for old, repl in _UVIT_TOP:
                if new.startswith(old):
                    new = repl + new[len(old):]
            for pattern, repl in _UVIT_BLOCK:
                new = re.sub(pattern, repl, new)
            out[new] = take(key)
    assert used == set(sd), f"official keys not converted: {sorted(set(sd) - used)[:3]}"
    return out


# --------------------------------------------------------------------------- sampling quirks


def guidance_scale_at(
    step: int, num_steps: int, *, guidance_scale: float, guidance_decay: str, guidance_scale_pow: float = 3.0
) -> float:
    """The guidance scale that official ``generate`` uses at ``step`` (0-based).

    constant: guidance_scale. linear: (step / num_steps) * guidance_scale, because the official
    loop updates the scale to ratio * guidance_scale at the *end* of each step (0 at step 0).
    power-cosine (MDT): (g - 1) * (1 - cos(pi * (step / num_steps) ** pow)) / 2 + 1, in float32.
    """
    if guidance_decay == "constant":
        return guidance_scale
    if guidance_decay == "linear":
        return 0.0 if step == 0 else (step / num_steps) * guidance_scale
    if guidance_decay == "power-cosine":
        pow_ = torch.ones(1) * guidance_scale_pow  # float32, as official
        scale_step = (1 - torch.cos(((step / num_steps) ** pow_) * torch.pi)) * 1 / 2
        return float(((guidance_scale - 1) * scale_step + 1).item())
    raise UsageError(f"unknown guidance_decay {guidance_decay!r}; known: {', '.join(GUIDANCE_DECAYS)}")


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float, guidance_decay: str) -> torch.Tensor:
    """Official classifier-free guidance: logits float [B,N,K] x2 -> float [B,N,K].

    power-cosine: uncond + s * (cond - uncond); constant / linear: cond + s * (cond - uncond).
    """
    if guidance_decay == "power-cosine":
        return uncond + (cond - uncond) * scale
    return cond + (cond - uncond) * scale


def num_to_remask(step_ratio: float, num_tokens: int, is_mask: torch.Tensor) -> torch.Tensor:
    """How many of the least confident tokens to re-mask after a step, as official.

    floor(num_tokens * arccos(r) / (pi/2)), at most (masked - 1) of the batch's *first* row and at
    least 1. is_mask bool [B,N] (before the step) -> int64 0-dim tensor (no host sync).
    """
    return clamp_remask(remask_target(step_ratio, num_tokens), is_mask)


def remask_target(step_ratio: float, num_tokens: int) -> int:
    """floor(num_tokens * arccos(r) / (pi/2)), in float64 as the official numpy: the count before clamping."""
    from generator.mask_schedule import arccos_mask_ratio

    return math.floor(num_tokens * arccos_mask_ratio(step_ratio))


def clamp_remask(target: int | torch.Tensor, is_mask: torch.Tensor) -> torch.Tensor:
    """The official clamp of the re-mask count: min(target, masked in the *first* row - 1), at least 1.

    target: a Python int or an int64 0-dim tensor; is_mask bool [B,N] -> int64 0-dim tensor.
    """
    return (is_mask[0].sum() - 1).clamp(max=target).clamp(min=1)
