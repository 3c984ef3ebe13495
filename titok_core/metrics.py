"""Per-image reconstruction metrics, shared by tokenizer training, reconstruction and rFID."""
from __future__ import annotations

import torch


def psnr(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB: float [B,C,H,W] in [0,1] (``recon`` is clamped) -> float32 [B].

    Identical images give inf.
    """
    _check_pair(recon, target)
    mse = (recon.float().clamp(0, 1) - target.float()).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (11x11 Gaussian window, sigma 1.5), float [B] in [-1,1]; a, b float [B,3,H,W] in [0,1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(a, b)
    return structural_similarity_index_measure(a.float(), b.float(), data_range=1.0, reduction="none")


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two [B,C,H,W] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
