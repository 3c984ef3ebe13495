"""Generator + tokenizer + sampling settings, loaded together and checked against each other,
and the batch loop that turns labels into images with them.

Used by ``sampling.generate``, ``sampling.serve``, ``eval.gfid`` and the sampling benchmark.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from generator.sampler import SAMPLING_DEFAULTS, SAMPLING_KEYS, sample_tokens, sampling_overrides
from titok_core.checkpoints import read_model_extra
from titok_core.errors import UsageError
from titok_core.images import save_png
from titok_core.runtime import autocast
from tokenizer import CheckpointError, load_tokenizer, require_discrete

log = logging.getLogger(__name__)
# The old spellings of sampling.generate, sampling.serve and eval.gfid, refused with the new name.
RENAMED_MODEL_KEYS = {
    "checkpoint": "generator.checkpoint", "tokenizer_checkpoint": "tokenizer.checkpoint",
    **{k: f"sampling.{k}" for k in SAMPLING_KEYS},
}
DEMO_CHECKPOINT = Path("runs/generator/demo/generator.safetensors")


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
    *, generator: Mapping | None = None, tokenizer: Mapping | None = None, sampling: Mapping | None = None,
    random_weights: bool = False,
) -> Pipeline:
    """Load a generator and the tokenizer it was trained on; sampling settings from preset/checkpoint,
    overridden by the non-None entries of ``sampling``.

    generator, tokenizer: the entry points' groups ``{"spec": ..., "checkpoint": ...}`` (either may
    be None). Nothing given: the latest demo run of ``python -m generator.train`` in this directory
    (``runs/generator/demo``), else the shipped demo generator. A shipped generator (``maskgit_demo``)
    or one of our generator files may be given as ``spec`` or as ``checkpoint``: either way the
    tokenizer and sampling settings it records come with it. A released preset without weights is refused
    unless ``random_weights`` (benchmarks) asks for untrained models.
    """
    generator, checkpoint = (generator or {}).get("spec"), (generator or {}).get("checkpoint")
    tokenizer, tokenizer_checkpoint = (tokenizer or {}).get("spec"), (tokenizer or {}).get("checkpoint")
    from generator import load_generator
    from generator.assets import shipped_path
    from generator.presets import PRESETS as GENERATOR_PRESETS

    if generator is None and checkpoint is None:
        checkpoint = DEMO_CHECKPOINT if DEMO_CHECKPOINT.is_file() else "maskgit_demo"
        log.info("generator: %s", checkpoint)
    if isinstance(checkpoint, str) and shipped_path(checkpoint) is not None:
        checkpoint = shipped_path(checkpoint)
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise CheckpointError(f"generator checkpoint not found: {checkpoint}")
    spec = generator if generator is not None else checkpoint
    gen = load_generator(spec, checkpoint if generator is not None else None, random_weights=random_weights)
    # What the generator's own file records (sampling settings, its tokenizer, classes): the checkpoint,
    # or a spec that is such a file itself (a shipped generator, one of our .safetensors).
    own_file = checkpoint if checkpoint is not None else _own_file(generator)
    extra = read_model_extra(own_file) if own_file is not None else {}
    settings = dict(getattr(gen, "sampling", None) or {})
    settings.update(extra.get("sampling", {}))
    settings.update(sampling_overrides(sampling or {}))
    missing = [k for k in SAMPLING_KEYS if k not in settings and k not in SAMPLING_DEFAULTS]
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
        raise CheckpointError("which tokenizer decodes this generator's tokens? "
                              "pass tokenizer.spec=... (and tokenizer.checkpoint=...)")
    tok = load_tokenizer(tok_spec, tok_ckpt, random_weights=random_weights)
    require_discrete(tok, "MaskGIT generation")
    if tok.codebook_size != gen.codebook_size or tok.num_tokens != gen.num_tokens:
        raise CheckpointError(
            f"tokenizer {tok_spec} ({tok.num_tokens} tokens, {tok.codebook_size} codes) does not match the generator "
            f"({gen.num_tokens} tokens, {gen.codebook_size} codes)"
        )
    return Pipeline(gen.eval(), tok.eval(), settings, list(extra.get("classes", [])), str(spec), extra)


def _own_file(spec) -> Path | None:
    """The file a generator spec names when it is one of ours: a shipped generator or an existing file."""
    from generator.assets import shipped_path

    if spec is None:
        return None
    if isinstance(spec, str) and shipped_path(spec) is not None:
        return shipped_path(spec)
    return Path(spec) if Path(spec).is_file() else None


def pipeline_kwargs(cfg: Mapping) -> dict:
    """The :func:`load_pipeline` arguments of an entry point's config: its ``generator``,
    ``tokenizer`` and ``sampling`` groups, whole (null means the checkpoint's or preset's value)."""
    return {k: _plain(cfg[k]) for k in ("generator", "tokenizer", "sampling")}


def _plain(group) -> dict:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(group, resolve=True) if isinstance(group, DictConfig) else dict(group or {})


def sample_images(
    pipe: Pipeline, labels: torch.Tensor, *, seed: int, batch_size: int = 32, dtype: str = "auto",
    sampling: dict | None = None, on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Sample one image per label, ``batch_size`` at a time, on the device the pipeline is on.

    labels: int64 [n] in [0, num_classes). seed: seeds one torch.Generator on that device that
    every batch draws from in turn, so (seed, batch_size, settings) fix every image. sampling:
    overrides of ``pipe.sampling``. on_step(done, total): called after every sampler step and
    every decode, total = batches * (num_steps + 1). Returns float32 [n,3,H,W] in [0,1] on the CPU.
    """
    settings = {**pipe.sampling, **(sampling or {})}
    device = next(pipe.generator.parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed)
    num_batches = math.ceil(len(labels) / batch_size)
    total, done = num_batches * (settings["num_steps"] + 1), 0

    def step(_):
        nonlocal done
        done += 1
        if on_step is not None:
            on_step(done, total)

    images = []
    for start in range(0, len(labels), batch_size):
        batch = labels[start : start + batch_size].to(device)
        with torch.inference_mode(), autocast(device, dtype):
            tokens = sample_tokens(pipe.generator, batch, rng=rng, on_step=step, **settings)
            images.append(pipe.tokenizer.decode(tokens).float().clamp(0, 1).cpu())
        step(None)
    return torch.cat(images)


def save_samples(images: torch.Tensor, labels: torch.Tensor, out_dir: str | os.PathLike) -> tuple[list[Path], Path]:
    """Write float [n,3,H,W] in [0,1] as ``sample_<i>_class<label>.png`` each and ``grid.png``
    (8 a row at most); returns (the sample paths in order, the grid path)."""
    out = Path(out_dir)
    paths = [
        save_png(img, out / f"sample_{i:05d}_class{int(label)}.png") for i, (img, label) in enumerate(zip(images, labels))
    ]
    grid = save_png(images, out / "grid.png", nrow=min(8, len(images)))
    return paths, grid


def parse_classes(
    value, *, n: int, num_classes: int, rng: torch.Generator, names: Sequence[str] | None = None,
) -> torch.Tensor:
    """``class`` from the command line -> int64 [n] labels.

    One class (all n samples of it), a list (cycled to n), or "random" (uniform). A class is an
    id or, given ``names`` (see :func:`sampling.classes.class_names`), a name or a unique part of
    one ("star", "golden retriever"); an ambiguous part lists what it matches.
    """
    from sampling.classes import find_class

    if n <= 0:
        raise UsageError(f"n must be positive, got {n}")
    if isinstance(value, str) and value == "random":
        return torch.randint(0, num_classes, (n,), generator=rng)
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise UsageError("class is an empty list: give an id, a name, a list of them or 'random'")
    ids = []
    for item in items:
        if isinstance(item, int) or (isinstance(item, str) and item.strip().lstrip("-").isdigit()):
            label = int(item)
            if not 0 <= label < num_classes:
                raise UsageError(f"class {label} is out of range: this generator has classes 0..{num_classes - 1}")
            ids.append(label)
        elif names:
            ids.append(find_class(item, names))
        else:
            raise UsageError(f"class must be an id, a name, a list of them or 'random', got {item!r}")
    return torch.tensor(ids, dtype=torch.long).repeat((n + len(ids) - 1) // len(ids))[:n]
