"""Sample class-conditional images: generator -> tokens -> tokenizer -> PNGs.

    python -m sampling.generate class=207 n=16
    python -m sampling.generate class=star n=8 sampling.guidance_scale=3.0
    python -m sampling.generate class=[1,2,3] n=12 generator.checkpoint=runs/generator/demo/generator.safetensors
Writes one PNG per sample and a grid, and prints their paths.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

from sampling.pipeline import (
    RENAMED_MODEL_KEYS, load_pipeline, parse_classes, pipeline_kwargs, sample_images, save_samples,
)
from generator.sampler import SAMPLING_RANGES
from sampling.classes import class_names
from titok_core.errors import UsageError, exit_on_user_error
from titok_core.cli import Ranges, hydra_entry
from titok_core.runtime import pick_device


def generate(
    *, classes, n: int, seed: int = 0, generator: dict | None = None, tokenizer: dict | None = None,
    out_dir: str = "outputs/samples", batch_size: int = 32, device: str = "auto", dtype: str = "auto",
    sampling: dict | None = None,
) -> dict:
    """Sample n images; returns {"images": [paths], "grid": path, "labels": [...], "sampling": {...}}.

    generator, tokenizer, sampling: the config groups (see :func:`sampling.pipeline.load_pipeline`)."""
    if n <= 0:
        raise UsageError(f"n must be positive, got {n}")
    dev = pick_device(device)
    pipe = load_pipeline(generator=generator, tokenizer=tokenizer, sampling=sampling).to(dev)
    names = class_names(pipe.generator.num_classes, pipe.classes)
    labels = parse_classes(classes, n=n, num_classes=pipe.generator.num_classes, names=names,
                           rng=torch.Generator().manual_seed(seed))
    with tqdm(desc="sampling", unit="step", disable=None) as bar:
        def on_step(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        images = sample_images(pipe, labels, seed=seed, batch_size=batch_size, dtype=dtype, on_step=on_step)
    paths, grid = save_samples(images, labels, out_dir)
    return {"images": [str(p) for p in paths], "grid": str(grid), "labels": labels.tolist(), "sampling": pipe.sampling}


def generate_kwargs(cfg: DictConfig) -> dict:
    """conf/sampling/generate.yaml (composed) -> the keyword arguments of :func:`generate`."""
    classes = cfg["class"]
    if isinstance(classes, ListConfig):
        classes = OmegaConf.to_container(classes)
    return dict(
        classes=classes, n=cfg.n, seed=cfg.seed, out_dir=cfg.out_dir, batch_size=cfg.batch_size, device=cfg.device,
        dtype=cfg.dtype, **pipeline_kwargs(cfg),
    )


def _main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        result = generate(**generate_kwargs(cfg))
    for path in result["images"]:
        print(path)
    print(f"grid: {result['grid']}")


main = hydra_entry(config="sampling/generate", description=__doc__, renamed=RENAMED_MODEL_KEYS,
                   scalar_groups={"generator": "generator.spec", "tokenizer": "tokenizer.spec"},
                   ranges=SAMPLING_RANGES | Ranges(at_least_one=("n", "batch_size"), not_negative=("seed",)),
                   on_interrupt="interrupted: the PNGs written so far are complete")(_main)


if __name__ == "__main__":
    main()
