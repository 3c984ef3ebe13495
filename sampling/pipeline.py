"""Generator + tokenizer + sampling settings, loaded together and checked against each other.

Used by ``sampling.generate``, ``eval.gfid`` and the sampling benchmark.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import logging

import torch

from tokenizer import CheckpointError, load_tokenizer, require_vq
from tokenizer.checkpoints import read_model_extra

log = logging.getLogger(__name__)
DEMO_CHECKPOINT = Path("runs/generator/demo/generator.safetensors")
SAMPLING_KEYS = (
    "num_steps", "guidance_scale", "guidance_decay", "guidance_scale_pow", "randomize_temperature",
    "softmax_temperature_annealing",
)


@dataclass
class Pipeline:
    generator: torch.nn.Module
    tokenizer: torch.nn.Module
    sampling: dict
    classes: list[str] = field(default_factory=list)
    source: str = ""
    extra: dict = field(default_factory=dict)  # what the checkpoint recorded (data, tokenizer, metrics)

    def to(self, device: torch.device) -> "Pipeline":
        self.generator.to(device)
        self.tokenizer.to(device)
        return self


def load_pipeline(
    *, generator: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None, tokenizer_checkpoint: str | os.PathLike | None = None,
    sampling: dict | None = None,
) -> Pipeline:
    """Load a generator and the tokenizer it was trained on; sampling settings from preset/checkpoint,
    overridden by the non-None entries of ``sampling``.

    Nothing given: the latest demo run of ``python -m generator.train``.
    """
    from generator import load_generator
    from generator.presets import PRESETS as GENERATOR_PRESETS

    if generator is None and checkpoint is None:
        if not DEMO_CHECKPOINT.is_file():
            raise CheckpointError(
                f"no generator given and no demo run at {DEMO_CHECKPOINT}: run python -m generator.train first, "
                "or pass checkpoint=... (and generator=<preset> for official weights)"
            )
        checkpoint = DEMO_CHECKPOINT
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise CheckpointError(f"generator checkpoint not found: {checkpoint}")
    spec = generator if generator is not None else checkpoint
    gen = load_generator(spec, checkpoint if generator is not None else None)
    extra = read_model_extra(checkpoint) if checkpoint is not None else {}
    settings = dict(getattr(gen, "sampling", None) or {})
    settings.update(extra.get("sampling", {}))
    settings.update({k: v for k, v in (sampling or {}).items() if v is not None})
    missing = [k for k in SAMPLING_KEYS if k not in settings and k != "guidance_scale_pow"]
    if missing:
        raise CheckpointError(f"no sampling settings for {', '.join(missing)}: pass them on the command line")

    trained_on = extra.get("tokenizer", {})
    tok_spec = tokenizer if tokenizer is not None else trained_on.get("spec")
    if tok_spec is None and generator is not None and Path(generator).suffix in (".yaml", ".yml", ".json"):
        tok_spec = generator  # an official config describes both models
    if tok_spec is None and generator in GENERATOR_PRESETS:
        tok_spec = GENERATOR_PRESETS[generator]["tokenizer"]
    tok_ckpt = tokenizer_checkpoint if tokenizer_checkpoint is not None else trained_on.get("checkpoint")
    if tok_spec is None:
        raise CheckpointError("which tokenizer decodes this generator's tokens? pass tokenizer=... (and tokenizer_checkpoint=...)")
    tok = load_tokenizer(tok_spec, tok_ckpt)
    require_vq(tok, "MaskGIT generation")
    if tok.source.startswith("preset:"):
        log.warning("tokenizer %s has no weights (pass tokenizer_checkpoint=...): images will be noise", tok_spec)
    if tok.codebook_size != gen.codebook_size or tok.num_tokens != gen.seq_len:
        raise CheckpointError(
            f"tokenizer {tok_spec} ({tok.num_tokens} tokens, {tok.codebook_size} codes) does not match the generator "
            f"({gen.seq_len} tokens, {gen.codebook_size} codes)"
        )
    return Pipeline(gen.eval(), tok.eval(), settings, list(extra.get("classes", [])), str(spec), extra)


def parse_classes(value, *, n: int, num_classes: int, rng: torch.Generator) -> torch.Tensor:
    """``class`` from the command line -> int64 [n] labels.

    One id (all n samples of it), a list (cycled to n), or "random" (uniform).
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if isinstance(value, str) and value == "random":
        return torch.randint(0, num_classes, (n,), generator=rng)
    ids = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        ids = [int(i) for i in ids]
    except (TypeError, ValueError):
        raise ValueError(f"class must be an id, a list of ids or 'random', got {value!r}") from None
    bad = [i for i in ids if not 0 <= i < num_classes]
    if bad or not ids:
        raise ValueError(f"class {bad[0] if bad else value} is out of range: this generator has classes 0..{num_classes - 1}")
    return torch.tensor(ids, dtype=torch.long).repeat((n + len(ids) - 1) // len(ids))[:n]
