"""The figures tokenizer.train writes after each validation: inputs beside their reconstructions,
and how often each code is used."""
from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from titok_core.images import save_png


def usage_figure(counts: torch.Tensor, height: int = 96, width_per_code: int = 2) -> torch.Tensor:
    """Bar chart of code counts, most used first: counts [K] -> image float [3,height,K*w] in [0,1].

    Dead codes show as empty columns on the right; a collapsed codebook is a few bars.
    """
    ordered = counts.float().sort(descending=True).values
    bars = (ordered / ordered.max().clamp(min=1) * height).round()
    rows = torch.arange(height, 0, -1, dtype=torch.float32)[:, None]  # top row = tallest
    filled = (rows <= bars[None, :]).float().repeat_interleave(width_per_code, dim=1)
    image = torch.ones(3, height, filled.shape[1])
    image[0] -= 0.8 * filled
    image[1] -= 0.5 * filled
    return image


class Figures(Callback):
    """After each validation: inputs-vs-reconstruction grid and code-usage figure, as PNGs in ``out_dir``.

    Reads the module's ``val_preview`` (inputs, reconstructions) and ``val_counts`` (codes [K])."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.latest: dict[str, str] = {}

    def write(self, pl_module, tag: str) -> dict[str, str]:
        if pl_module.val_preview is not None:
            inputs, recon = pl_module.val_preview
            grid = torch.cat([inputs, recon])  # row 1: inputs, row 2: reconstructions
            self.latest["recon_grid"] = str(save_png(grid, self.out_dir / f"recon_{tag}.png", nrow=len(inputs)))
        counts = getattr(pl_module, "val_counts", None)
        if counts is not None:
            self.latest["usage_figure"] = str(save_png(usage_figure(counts), self.out_dir / f"usage_{tag}.png"))
        return dict(self.latest)

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.is_global_zero and not trainer.sanity_checking:
            self.write(pl_module, f"step{trainer.global_step:07d}")
