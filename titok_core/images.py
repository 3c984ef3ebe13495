"""Images as tensors <-> bytes: the uint8 rounding every saved sample goes through, and PNG grids.

The grids are torchvision's ``save_image`` pixel for pixel (a test pins it), written here with
PIL: importing ``torchvision.utils`` loads torchvision's models and ops, seconds of start-up for
every command that saves a PNG."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from titok_core.checkpoints import atomic_path


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [B,3,H,W] in [0,1] -> uint8 [B,3,H,W], rounded (what saving a PNG would give)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def grid(images: torch.Tensor, *, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """float [B,C,H,W] (or [C,H,W]) -> float [C, rows*(H+p)+p, cols*(W+p)+p]: ``nrow`` images a row,
    ``padding`` pixels of ``pad_value`` around each; one image comes back as it is (as make_grid)."""
    if images.shape[-3] == 1:  # grey -> three equal channels, as make_grid
        images = images.expand(*images.shape[:-3], 3, *images.shape[-2:])
    if images.dim() == 3 or len(images) == 1:
        return images.reshape(images.shape[-3:])
    b, c, h, w = images.shape
    cols = min(nrow, b)
    rows = -(-b // cols)
    out = images.new_full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for k in range(b):
        y, x = divmod(k, cols)
        top, left = y * (h + padding) + padding, x * (w + padding) + padding
        out[:, top: top + h, left: left + w] = images[k]
    return out


def save_png(images: torch.Tensor, path: str | os.PathLike, *, nrow: int = 8) -> Path:
    """Write float [B,3,H,W] (or [3,H,W]) in [0,1] as one PNG grid (2 white pixels between), atomically."""
    from PIL import Image

    path = Path(path)
    pixels = grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow)
    pixels = (pixels * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()  # save_image's rounding
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="png")
    return path
