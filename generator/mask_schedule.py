"""Mask schedules: the fraction of tokens masked at time ``t``, shared by training and sampling.

``t`` runs from 0 (nothing decoded yet) to 1 (everything decoded). Training draws t ~ U(0,1)
per sequence; the sampler evaluates the schedule at r = (step + 1) / num_steps.
"""
from __future__ import annotations

import math

import torch


def arccos_mask_ratio(t: float | torch.Tensor) -> float | torch.Tensor:
    """MaskGIT's arccos schedule: arccos(t) / (pi / 2), 1 at t=0 and 0 at t=1.

    t: a Python float or a float tensor of any shape, values in [0, 1]. Returns the same kind:
    a Python float (computed in float64, as the official sampler's numpy) or a tensor of t's
    shape and dtype.
    """
    if isinstance(t, torch.Tensor):
        return torch.acos(t) / (math.pi * 0.5)
    return math.acos(t) / (math.pi * 0.5)


def linear_mask_ratio(t: float | torch.Tensor) -> float | torch.Tensor:
    """The linear schedule of masked diffusion: 1 - t (t as in :func:`arccos_mask_ratio`), so that
    training draws every masked fraction equally often."""
    return 1.0 - t


# Training's choice (optim.mask_schedule); the sampler keeps the official arccos.
MASK_SCHEDULES = {"arccos": arccos_mask_ratio, "linear": linear_mask_ratio}
