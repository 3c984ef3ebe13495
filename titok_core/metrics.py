"""Image metrics on the ground floor: per-image reconstruction metrics (PSNR, SSIM), shared by
tokenizer training, reconstruction and rFID, and the Frechet distance between two sets of
feature statistics (FID), shared by gFID, rFID and the demo classifier's FID."""
from __future__ import annotations

import numpy as np
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


def features_to_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mu float64 [D], sigma float64 [D,D]) of a feature matrix [N,D] (N >= 2); sigma is the
    unbiased covariance, as ``np.cov``."""
    features = np.asarray(features.cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"expected features [N>=2, D], got {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between two Gaussians (mu [D], sigma [D,D]); torch-fidelity's formula, in float64.

    A float >= 0 (up to rounding); 0 for equal statistics."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric  # imported when first used

    stats = [
        {"mu": np.asarray(m, dtype=np.float64), "sigma": np.asarray(s, dtype=np.float64)}
        for m, s in ((mu1, sigma1), (mu2, sigma2))
    ]
    return float(fid_statistics_to_metric(stats[0], stats[1], verbose=False)[KEY_METRIC_FID])
