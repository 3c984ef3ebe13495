"""The rate term of the small-data recipe (``loss.rate_weight``): a factorised prior over FSQ digits."""
from __future__ import annotations

import math

import torch
from torch import nn


class TokenPrior(nn.Module):
    """A factorised prior over FSQ digits, for a rate term that makes tokens easy to generate.

    It keeps, per class, token position and FSQ channel, an EMA of how often each level is used
    and scores the encoder's unrounded latents under it: the rate of an image is the sum over its
    digits of -log p(level), interpolated linearly between the two levels a latent sits between,
    so the gradient moves each latent towards the more common of its neighbours. A small rate under
    a prior that treats every digit as independent (given the class) asks the encoder for codes
    whose digits carry little shared information, which a generator can learn from few examples.
    Same idea as the factorised entropy model of learned compression (Balle et al. 2017).
    """

    def __init__(self, *, levels: list[int], num_tokens: int, num_classes: int = 1, decay: float = 0.995,
                 smoothing: float = 0.01):
        super().__init__()
        lv = torch.tensor([int(n) for n in levels], dtype=torch.long)
        self.register_buffer("levels", lv, persistent=False)
        top = int(lv.max())
        # Levels a channel does not have get no mass.
        self.register_buffer("valid", torch.arange(top)[None] < lv[:, None], persistent=False)  # (T, Lmax)
        start = self.valid.float() / lv[:, None]  # uniform; each (class, token, channel) row sums to 1
        self.register_buffer("counts", start.expand(num_classes, num_tokens, -1, -1).clone())
        self.decay, self.smoothing = decay, smoothing

    def _rows(self, labels: torch.Tensor) -> torch.Tensor:
        """The prior's row of each label: the label itself, or row 0 for all when the prior has one."""
        return labels.long().clamp(max=self.counts.shape[0] - 1)

    def log_probs(self, labels: torch.Tensor) -> torch.Tensor:
        """int64 [B] -> float32 [B,N,T,Lmax] log-probabilities of each level (-inf where none)."""
        c = self.counts[self._rows(labels)] + self.smoothing
        c = c.masked_fill(~self.valid, 0.0)
        return (c / c.sum(-1, keepdim=True)).log()

    def _weights(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lo = u.detach().floor().clamp(min=0).minimum((self.levels - 2).float()).long()
        return lo, lo + 1, u - lo

    def forward(self, u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """u: digit positions float [B,N,T] (FSQ.digit_positions); labels int64 [B] -> rate in nats [B,N]."""
        logp = self.log_probs(labels)
        lo, hi, f = self._weights(u)
        lp = (1 - f) * logp.gather(-1, lo[..., None])[..., 0] + f * logp.gather(-1, hi[..., None])[..., 0]
        return -lp.sum(-1)

    @torch.no_grad()
    def update(self, u: torch.Tensor, labels: torch.Tensor) -> None:
        """Move the counts towards the levels of this batch (all ranks' batches: gather first)."""
        lo, hi, f = self._weights(u.float())
        add = torch.zeros(*u.shape, self.valid.shape[1], device=u.device)
        add.scatter_add_(-1, lo[..., None], (1 - f)[..., None]).scatter_add_(-1, hi[..., None], f[..., None])
        labels = self._rows(labels)
        batch = torch.zeros_like(self.counts).index_add_(0, labels, add)
        seen = torch.bincount(labels, minlength=self.counts.shape[0]).float()[:, None, None, None]
        # Each class decays by the images it got, so rare classes keep their counts.
        keep = self.decay ** seen
        self.counts.mul_(keep).add_(batch * (1 - self.decay))

    @torch.no_grad()
    def code_bits(self, u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Bits per token of the rounded codes under the prior: float32 scalar."""
        digits = u.round().long()
        return -self.log_probs(labels).gather(-1, digits[..., None]).sum((-1, -2)).mean() / math.log(2)
