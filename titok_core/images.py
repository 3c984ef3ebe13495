"""Images as tensors <-> bytes: the uint8 rounding every saved sample goes through, and PNG grids."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from titok_core.checkpoints import atomic_path


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [B,3,H,W] in [0,1] -> uint8 [B,3,H,W], rounded (what saving a PNG would give)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def save_png(images: torch.Tensor, path: str | os.PathLike, *, nrow: int = 8) -> Path:
    """Write float [B,3,H,W] (or [3,H,W]) in [0,1] as one PNG grid, atomically."""
    from torchvision.utils import save_image

    path = Path(path)
    with atomic_path(path) as tmp:
        save_image(images.float().clamp(0, 1), tmp, format="png", nrow=nrow, padding=2, pad_value=1.0)
    return path
