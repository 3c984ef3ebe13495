"""MaskGIT decoding: start fully masked, then over ``num_steps`` sample every masked token and
re-mask the least confident, fewer each step (the official ``ImageBert.generate``).

The official guidance quirks (scale schedules and formulas, the re-mask count) live in
:mod:`generator.official`; this file is the loop. Conditional and unconditional logits come
from one forward over a doubled batch.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from generator import official


def _gumbel(shape: torch.Size, *, device: torch.device, rng: torch.Generator | None) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)), u ~ U[0,1), logs clamped at 1e-20 as official."""
    u = torch.rand(shape, device=device, generator=rng)
    return -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))


def _perturb(x: torch.Tensor, temperature: float, rng: torch.Generator | None) -> torch.Tensor:
    if temperature == 0:  # the official code adds 0 * noise: nothing to draw
        return x
    return x + temperature * _gumbel(x.shape, device=x.device, rng=rng)


def _guided_logits(
    generator: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, *, scale: float, guidance_decay: str
) -> torch.Tensor:
    """Guided logits float32 [B,N,K]; conditional only when the scale is 0 (as official)."""
    if scale == 0:
        return generator(tokens, labels).float()
    null = torch.full_like(labels, generator.null_label)
    logits = generator(torch.cat([tokens, tokens]), torch.cat([labels, null])).float()  # (2B, N, K)
    cond, uncond = logits.chunk(2)
    return official.apply_guidance(cond, uncond, scale, guidance_decay)


@torch.no_grad()
def sample_tokens(
    generator: torch.nn.Module,
    labels: torch.Tensor,
    *,
    num_steps: int,
    guidance_scale: float,
    guidance_decay: str,
    guidance_scale_pow: float = 3.0,
    randomize_temperature: float,
    softmax_temperature_annealing: bool,
    rng: torch.Generator | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Sample token sequences for ``labels`` with a masked-token ``generator``.

    labels: int64 [B] in [0, generator.num_classes] (``generator.null_label``: unconditional),
    on the generator's device. guidance_decay: "constant" | "linear" | "power-cosine" (see
    :func:`generator.official.guidance_scale_at` for what each does with ``guidance_scale``).
    randomize_temperature: Gumbel noise scale, annealed as randomize_temperature * (1 - r);
    0 gives deterministic decoding. softmax_temperature_annealing: divide the logits by
    0.5 + 0.8 * (1 - r). rng: a torch.Generator on the generator's device; the same seed gives
    the same tokens. on_step: called after every step with the number of steps done
    (1..num_steps), e.g. to show progress. Returns int64 [B, generator.seq_len] in
    [0, generator.codebook_size).
    """
    if guidance_decay not in official.GUIDANCE_DECAYS:
        raise ValueError(f"unknown guidance_decay {guidance_decay!r}; known: {', '.join(official.GUIDANCE_DECAYS)}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    labels = labels.long()
    mask_id, seq_len = generator.mask_id, generator.seq_len
    tokens = torch.full((labels.shape[0], seq_len), mask_id, dtype=torch.long, device=labels.device)
    for step in range(num_steps):
        ratio = (step + 1) / num_steps
        temperature = randomize_temperature * (1.0 - ratio)
        is_mask = tokens == mask_id
        scale = official.guidance_scale_at(
            step, num_steps, guidance_scale=guidance_scale, guidance_decay=guidance_decay,
            guidance_scale_pow=guidance_scale_pow,
        )
        logits = _guided_logits(generator, tokens, labels, scale=scale, guidance_decay=guidance_decay)  # (B, N, K)
        if softmax_temperature_annealing:
            logits = logits / (0.5 + 0.8 * (1 - ratio))

        sampled = _perturb(logits, temperature, rng).argmax(dim=-1)  # (B, N)
        sampled_logits = logits.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        sampled = torch.where(is_mask, sampled, tokens)  # decoded tokens stay
        if on_step is not None:
            on_step(step + 1)
        if step == num_steps - 1:  # the last step re-masks nothing
            return sampled

        # Re-mask the least confident new tokens; decoded ones have confidence +inf.
        confidence = _perturb(torch.where(is_mask, sampled_logits, torch.inf), temperature, rng)
        num_remask = official.num_to_remask(ratio, seq_len, is_mask)
        cutoff = confidence.sort(dim=-1).values.gather(-1, (num_remask - 1).view(1, 1).expand(len(tokens), 1))
        tokens = torch.where(confidence <= cutoff, mask_id, sampled)
    return tokens  # not reached: num_steps >= 1
