"""Codebook usage while a tokenizer trains: counts, usage and perplexity (validation figures), and
:class:`CodeUsage`, this project's dead-code revival (an EMA of each code's use and a buffer of
recent encoder latents to restart dead codes from). The official clustering update is
:class:`tokenizer.model.ClusteringVQ`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def token_counts(tokens: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """int64 tokens of any shape -> float32 [codebook_size] counts per code."""
    return torch.bincount(tokens.reshape(-1), minlength=codebook_size).float()


def codebook_usage(counts: torch.Tensor) -> float:
    """Fraction of codes picked at least once: counts [K] -> value in [0, 1]."""
    return float((counts > 0).float().mean())


def codebook_perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of the code frequencies: 1 (one code) .. K (uniform use)."""
    p = counts / counts.sum().clamp(min=1)
    return float(torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum()))


class CodeUsage(nn.Module):
    """EMA of code usage plus a ring buffer of recent encoder latents, for dead-code re-init.

    ``usage`` is the EMA of each code's share of the picked tokens (uniform use: 1/K). A code
    is dead when its share is below ``dead_ratio / K``. Buffers travel in the Lightning
    checkpoint, so a resumed run continues with the same statistics.
    """

    def __init__(self, *, codebook_size: int, token_size: int, decay: float = 0.99, dead_ratio: float = 0.03,
                 buffer_size: int = 4096):
        super().__init__()
        self.decay, self.dead_ratio = decay, dead_ratio
        self.register_buffer("usage", torch.zeros(codebook_size))
        self.register_buffer("latents", torch.zeros(buffer_size, token_size))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, tokens: torch.Tensor, latents: torch.Tensor) -> None:
        """tokens int64 [...]; latents float [..., T], the encoder outputs before quantisation."""
        counts = token_counts(tokens, self.usage.numel())
        self.usage.mul_(self.decay).add_(counts / counts.sum(), alpha=1 - self.decay)
        flat = latents.detach().reshape(-1, self.latents.shape[1]).float()[-self.latents.shape[0]:]
        rows = (self.seen + torch.arange(flat.shape[0], device=flat.device)) % self.latents.shape[0]
        self.latents[rows] = flat
        self.seen += flat.shape[0]

    def dead(self) -> torch.Tensor:
        """bool [K]: codes whose usage share fell below dead_ratio / K."""
        return self.usage * self.usage.numel() < self.dead_ratio

    @torch.no_grad()
    def revive(self, codebook: nn.Parameter, *, l2_norm: bool, generator: torch.Generator) -> torch.Tensor:
        """Overwrite dead rows of ``codebook`` [K,T] with random recent latents; returns their indices.

        With l2-normalised codes the new rows get the codebook's mean row norm, so the
        optimiser moves them as fast as the others. Revived codes restart at uniform usage.
        """
        idx = self.dead().nonzero().flatten()
        filled = int(min(self.seen, self.latents.shape[0]))
        if idx.numel() == 0 or filled == 0:
            return idx[:0]
        if idx.numel() <= filled:  # distinct latents where there are enough
            pick = torch.randperm(filled, generator=generator)[: idx.numel()]
        else:
            pick = torch.randint(filled, (idx.numel(),), generator=generator)
        pick = pick.to(self.latents.device)
        new = self.latents[pick]
        if l2_norm:
            new = F.normalize(new, dim=-1) * codebook.norm(dim=-1).mean()
        codebook[idx] = new.to(codebook.dtype)
        self.usage[idx] = 1.0 / self.usage.numel()
        return idx
