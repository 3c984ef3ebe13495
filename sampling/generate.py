"""Sample class-conditional images: generator -> tokens -> tokenizer -> PNGs.

    python -m sampling.generate class=207 n=16
    python -m sampling.generate class=[1,2,3] n=12 guidance_scale=3.0 checkpoint=runs/generator/demo/generator.safetensors
Writes one PNG per sample and a grid, and prints their paths.
"""
from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

from sampling.pipeline import load_pipeline, parse_classes, pipeline_kwargs, sample_images, save_samples
from titok_core.runtime import exit_on_user_error, pick_device


def generate(
    *, classes, n: int, seed: int = 0, generator=None, checkpoint=None, tokenizer=None, tokenizer_checkpoint=None,
    out_dir: str = "outputs/samples", batch_size: int = 32, device: str = "auto", dtype: str = "auto",
    sampling: dict | None = None,
) -> dict:
    """Sample n images; returns {"images": [paths], "grid": path, "labels": [...], "sampling": {...}}."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    dev = pick_device(device)
    pipe = load_pipeline(
        generator=generator, checkpoint=checkpoint, tokenizer=tokenizer, tokenizer_checkpoint=tokenizer_checkpoint,
        sampling=sampling,
    ).to(dev)
    labels = parse_classes(classes, n=n, num_classes=pipe.generator.num_classes, rng=torch.Generator().manual_seed(seed))
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


@hydra.main(config_path="../conf/sampling", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        result = generate(**generate_kwargs(cfg))
    for path in result["images"]:
        print(path)
    print(f"grid: {result['grid']}")


if __name__ == "__main__":
    main()
