"""Reconstruct images through a TiTok tokenizer: inputs beside reconstructions, tokens printed.

    python -m tokenizer.reconstruct inputs=photos/ tokenizer.spec=titok_l32 tokenizer.checkpoint=tokenizer_titok_l32.bin
    python -m tokenizer.reconstruct inputs=photos/ tokenizer.spec=titok_bl64_vae_c16 tokenizer.checkpoint=titok_bl64_vae_c16.bin

A VAE tokenizer reconstructs from its posterior mean; its latents are summarised, not printed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig
from tqdm import tqdm

from titok_core.cli import Ranges, hydra_entry
from titok_core.data import list_images, load_image_rgb, preprocess
from titok_core.errors import MissingFileError, exit_on_user_error
from titok_core.images import save_png
from titok_core.metrics import psnr
from titok_core.runtime import autocast, pick_device
from tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def reconstruct(
    *, tokenizer: str, checkpoint: str | None, inputs: str | list[str], out_dir: str, batch_size: int = 8,
    device: str = "auto", dtype: str = "fp32",
) -> list[dict]:
    """Encode and decode every readable image; returns one record per image.

    Record: path, output (PNG of input beside reconstruction), psnr (dB), and ``tokens`` (list
    of ids) for a VQ tokenizer or ``latents`` (shape, mean, std of the posterior mean) for a VAE.
    """
    dev = pick_device(device)
    tok = load_tokenizer(tokenizer, checkpoint).to(dev)
    paths = list_images(inputs)
    if not paths:
        raise MissingFileError(f"no images found in {inputs}")
    out = Path(out_dir)
    records, skipped, used = [], 0, set()
    for start in tqdm(range(0, len(paths), batch_size), desc="reconstruct", unit="batch", disable=None):
        batch, kept = [], []
        for p in paths[start : start + batch_size]:
            img = load_image_rgb(p)
            if img is None:
                skipped += 1
                continue
            batch.append(preprocess(img, tok.image_size))
            kept.append(p)
        if not batch:
            continue
        x = torch.stack(batch).to(dev)
        with torch.no_grad(), autocast(dev, dtype):
            tokens = tok.encode(x)
            recon = tok.decode(tokens).float()
        for p, xi, ri, ti in zip(kept, x, recon, tokens):
            name = f"{p.stem}_recon.png"
            if name in used:  # the same file name in two folders: keep both outputs
                name = f"{p.stem}_{len(records)}_recon.png"
            used.add(name)
            target = save_png(torch.stack([xi, ri]), out / name, nrow=2)
            record = {"path": str(p), "output": str(target), "psnr": float(psnr(ri[None], xi[None].float()))}
            if not tok.is_discrete:
                ti = ti.float()
                record["latents"] = {"shape": list(ti.shape), "mean": float(ti.mean()), "std": float(ti.std())}
            else:
                record["tokens"] = ti.tolist()
            records.append(record)
    if skipped:
        log.warning("skipped %d unreadable image(s)", skipped)
    if not records:
        raise MissingFileError(f"none of the {len(paths)} file(s) in {inputs} could be read as an image")
    return records


def _main(cfg: DictConfig) -> None:
    inputs = list(cfg.inputs) if isinstance(cfg.inputs, ListConfig) else cfg.inputs
    with exit_on_user_error():
        records = reconstruct(
            tokenizer=cfg.tokenizer.spec, checkpoint=cfg.tokenizer.checkpoint, inputs=inputs, out_dir=cfg.out_dir,
            batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype,
        )
    for r in records:
        if "tokens" in r:
            detail = f"tokens {r['tokens']}"
        else:
            lat = r["latents"]
            detail = f"latents {lat['shape']} (posterior mean: mean {lat['mean']:.3f}, std {lat['std']:.3f})"
        print(f"{r['path']}: psnr {r['psnr']:.2f} dB -> {r['output']}\n  {detail}")
    print(f"{len(records)} image(s) reconstructed into {cfg.out_dir}")


main = hydra_entry(config="tokenizer/reconstruct", description=__doc__,
                   renamed={"checkpoint": "tokenizer.checkpoint"}, scalar_groups={"tokenizer": "tokenizer.spec"},
                   ranges=Ranges(at_least_one=("batch_size",)),
                   on_interrupt="interrupted: the PNGs written so far are complete")(_main)


if __name__ == "__main__":
    main()
