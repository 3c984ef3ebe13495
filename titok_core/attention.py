"""Scaled dot-product attention for the tokenizer's and the generator's transformers.

One function, two routes to the same result, chosen by where the time goes (``python -m
titok_bench.attention`` prints the figures for the machine it runs on):

- ``F.scaled_dot_product_attention`` (flash or memory-efficient kernels) on GPUs, in fp32, and in
  every pass without gradients (sampling, caching, evaluation): there neither route is faster at
  every shape, and the fused kernel keeps the numerics the released models were checked with.
- ``softmax(q kᵀ / √d) v`` written out, when the gradient is needed on a CPU in bf16 or fp16 and the
  scores are small enough to stay in the CPU's caches (at most ``WRITTEN_OUT_MAX_SCORES`` = B·H·L²).
  The backward pass of PyTorch's flash kernel for CPUs is 2-5x slower there than the written-out
  composition (the small recipe's generator, 64 sequences of 33 tokens: about 3 ms against 13 ms on
  2 cores of an AVX512-BF16 CPU), which made a quarter of that generator's training step; beyond
  about 8M scores (TiTok-L-32's 289 tokens at batch 8) the fused kernel is faster again. The scores
  and the softmax are in fp32, as in the flash kernel; only the rounding differs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCED_PRECISION = (torch.bfloat16, torch.float16)
WRITTEN_OUT_MAX_SCORES = 8 * 2**20  # B * H * L * L: 32 MiB of fp32 scores


def written_out_is_faster(q: torch.Tensor) -> bool:
    """True where the written-out composition beats the fused kernel: a CPU, bf16/fp16, with gradients,
    at most ``WRITTEN_OUT_MAX_SCORES`` scores. q [..., L, Dh]."""
    scores = q.shape[:-1].numel() * q.shape[-2]
    return (
        q.device.type == "cpu" and q.dtype in REDUCED_PRECISION and torch.is_grad_enabled() and q.requires_grad
        and scores <= WRITTEN_OUT_MAX_SCORES
    )


def written_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float = 0.0) -> torch.Tensor:
    """The composition itself, on any device and dtype: scores and softmax in fp32, the weights back in v's dtype."""
    weights = ((q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5).softmax(dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return weights.to(v.dtype) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float = 0.0) -> torch.Tensor:
    """q, k, v [B, H, L, Dh] -> softmax(q kᵀ / √Dh) v [B, H, L, Dh], dropout on the weights when training.

    dropout_p must already be 0 outside training (as for ``F.scaled_dot_product_attention``).
    """
    if written_out_is_faster(q):
        return written_out(q, k, v, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
