"""MaskGIT decoding: start fully masked, then over ``num_steps`` sample every masked token and
re-mask the least confident, fewer each step (the official ``ImageBert.generate``).

The official step draws each token as argmax(logits / divisor + T * gumbel) and keeps the tokens
whose logit plus *the same scale* T of fresh Gumbel noise is highest, T = randomize_temperature *
(1 - r). That is sampling from softmax(logits / (divisor * T)): with T of 2-4 in the first steps,
near uniform over the codes, so one knob sets both how random the tokens are and how random the
choice of which to keep. ``token_temperature`` (off by default: the official step) separates
them: tokens are drawn from softmax(logits / (divisor * token_temperature)) and the ones kept are
those with the highest log-probability under the model plus T * gumbel (the selection noise).

``self_correction`` (0 by default: the official step) lets a step take back earlier decisions:
the decoded tokens that the model now finds least likely (their log-probability under this
step's guided logits, the token in view) join the new tokens as candidates for re-masking, at
most ``self_correction`` of them a step, and every candidate is ranked by its log-probability.
The number of masked tokens after each step still follows the schedule, so the step count and the
cost are unchanged; a token re-masked is drawn again at the next step with more of the image given.

The official guidance quirks (scale schedules and formulas, the re-mask count) live in
:mod:`generator.official`; this file is the loop. Conditional and unconditional logits come
from one forward over a doubled batch.

The loop is split into a *plan* (every per-step constant, computed in Python before sampling
starts) and one *step* function whose control flow depends only on the plan, never on tensor
values. So a step needs no host synchronisation, has static shapes, and the same function
runs eagerly here and compiled / captured in :mod:`sampling.fast`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from generator import official
from titok_core.cli import Ranges
from titok_core.errors import UsageError


@dataclass(frozen=True)
class StepKind:
    """What shape of work a step does; the only things a step's control flow depends on.

    guided: one forward over the doubled batch (cond + uncond); False only where the scale is 0.
    noisy: Gumbel noise is added (temperature != 0; with ``decoupled``, to the selection only).
    last: the last step re-masks nothing. decoupled: tokens drawn at their own temperature and
    kept by log-probability (``token_temperature`` set); draw: with ``decoupled``, the tokens are
    drawn at random (token_temperature > 0), not taken by argmax. correct: at most this many
    decoded tokens join the candidates for re-masking (``self_correction``).
    """

    guided: bool
    noisy: bool
    last: bool
    decoupled: bool = False
    draw: bool = False
    correct: int = 0  # decoded tokens that may be re-masked at this step (self-correction); 0 on the first and last


@dataclass(frozen=True)
class Step:
    """One step's constants: Python numbers, fixed before sampling starts."""

    kind: StepKind
    scale: float  # guidance scale (see official.guidance_scale_at)
    temperature: float  # Gumbel noise scale (decoupled: on the selection only)
    divisor: float  # logits are divided by it (1.0 without softmax temperature annealing; decoupled: times
    # the token temperature when that is > 0)
    remask_target: int  # floor(N * arccos(r) / (pi/2)) before the first-row clamp; 0 on the last step


def plan_steps(
    *, num_steps: int, num_tokens: int, guidance_scale: float, guidance_decay: str, guidance_scale_pow: float = 3.0,
    randomize_temperature: float, softmax_temperature_annealing: bool, token_temperature: float | None = None,
    self_correction: int = 0,
) -> tuple[Step, ...]:
    """The sampling settings -> one :class:`Step` per step (see :func:`sample_tokens` for the settings)."""
    if guidance_decay not in official.GUIDANCE_DECAYS:
        raise UsageError(f"unknown guidance_decay {guidance_decay!r}; known: {', '.join(official.GUIDANCE_DECAYS)}")
    if num_steps < 1:
        raise UsageError(f"num_steps must be >= 1, got {num_steps}")
    if token_temperature is False:  # written in a config to ask for the official step over a model's setting
        token_temperature = None
    if token_temperature is not None and not token_temperature >= 0:
        raise UsageError(f"token_temperature must be false (the official draw) or >= 0, got {token_temperature}")
    if isinstance(self_correction, bool) or not isinstance(self_correction, int) or self_correction < 0:
        raise UsageError(f"self_correction must be a whole number >= 0 (decoded tokens re-masked a step at most), "
                         f"got {self_correction!r}")
    decoupled = token_temperature is not None
    steps = []
    for step in range(num_steps):
        ratio = (step + 1) / num_steps
        temperature = randomize_temperature * (1.0 - ratio)
        scale = official.guidance_scale_at(
            step, num_steps, guidance_scale=guidance_scale, guidance_decay=guidance_decay,
            guidance_scale_pow=guidance_scale_pow,
        )
        last = step == num_steps - 1
        divisor = (0.5 + 0.8 * (1 - ratio)) if softmax_temperature_annealing else 1.0
        draw = decoupled and token_temperature > 0
        steps.append(Step(
            kind=StepKind(guided=scale != 0, noisy=temperature != 0, last=last, decoupled=decoupled, draw=draw,
                          correct=0 if last or step == 0 else self_correction),
            scale=scale, temperature=temperature, divisor=divisor * token_temperature if draw else divisor,
            remask_target=0 if last else official.remask_target(ratio, num_tokens),
        ))
    return tuple(steps)


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Uniform draws u in [0,1) -> standard Gumbel noise -log(-log(u)), logs clamped at 1e-20 as official."""
    return -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))


def sampling_step(
    generator: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, *, kind: StepKind, guidance_decay: str,
    scale: float | torch.Tensor, temperature: float | torch.Tensor, divisor: float | torch.Tensor,
    remask_target: int | torch.Tensor, u_logits: torch.Tensor | None, u_confidence: torch.Tensor | None,
) -> torch.Tensor:
    """One decoding step: tokens int64 [B,N] (mask_id where masked) -> int64 [B,N].

    The constants are Python numbers (eager) or 0-dim tensors (float32; remask_target int64),
    which keeps one compiled graph per ``kind``. u_logits float32 [B,N,K] and u_confidence
    float32 [B,N] are uniform draws in [0,1), given as :func:`draw_uniforms` gives them. No host
    synchronisation and no branch on tensor values.
    """
    mask_id = generator.mask_id
    is_mask = tokens == mask_id
    if kind.guided:
        null = torch.full_like(labels, generator.null_label)
        both = generator(torch.cat([tokens, tokens]), torch.cat([labels, null])).float()  # (2B, N, K)
        cond, uncond = both.chunk(2)
        logits = official.apply_guidance(cond, uncond, scale, guidance_decay)
    else:  # conditional only when the scale is 0, as official
        logits = generator(tokens, labels).float()  # (B, N, K)
    guided = logits
    if kind.decoupled:  # tokens at their own temperature; kept by the model's log-probability
        scores = guided.log_softmax(dim=-1)
        logits = logits / divisor
        sampled = (logits + gumbel(u_logits) if kind.draw else logits).argmax(dim=-1)  # (B, N)
    else:  # official: one noise scale for the draw and the selection
        logits = logits / divisor
        scores = logits
        noisy = logits + temperature * gumbel(u_logits) if kind.noisy else logits
        sampled = noisy.argmax(dim=-1)  # (B, N)
    if kind.correct and not kind.decoupled:  # self-correction ranks every candidate by its log-probability
        scores = guided.log_softmax(dim=-1)
    sampled_logits = scores.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    sampled = torch.where(is_mask, sampled, tokens)  # decoded tokens stay
    if kind.last:  # the last step re-masks nothing
        return sampled

    # Re-mask the least confident new tokens; decoded ones have confidence +inf.
    confidence = torch.where(is_mask, sampled_logits, torch.inf)
    if kind.correct:  # ... except the `correct` decoded tokens the model now finds least likely
        held = scores.gather(-1, tokens.clamp(max=scores.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        held = torch.where(is_mask, torch.inf, held)
        weakest = held.sort(dim=-1).values[:, kind.correct - 1: kind.correct]  # (B, 1); +inf when fewer are decoded
        confidence = torch.where(~is_mask & (held <= weakest), held, confidence)
    if kind.noisy:
        confidence = confidence + temperature * gumbel(u_confidence)
    num_remask = official.clamp_remask(remask_target, is_mask)
    cutoff = confidence.sort(dim=-1).values.gather(-1, (num_remask - 1).view(1, 1).expand(len(tokens), 1))
    return torch.where(confidence <= cutoff, mask_id, sampled)


def draw_uniforms(
    step: Step, shape: tuple[int, int, int], *, device: torch.device, rng: torch.Generator | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The uniform draws one step needs, in the order the official loop draws them.

    shape (B, N, K) -> (u_logits float32 [B,N,K] or None, u_confidence float32 [B,N] or None).
    Official: both when the step is noisy (u_confidence not on the last step). Decoupled:
    u_logits when the tokens are drawn at random, u_confidence when the selection is noisy.
    """
    kind = step.kind
    if kind.decoupled:
        u_logits = torch.rand(shape, device=device, generator=rng) if kind.draw else None
        noisy_selection = kind.noisy and not kind.last
        return u_logits, torch.rand(shape[:2], device=device, generator=rng) if noisy_selection else None
    if not kind.noisy:  # the official code adds 0 * noise: nothing to draw
        return None, None
    u_logits = torch.rand(shape, device=device, generator=rng)
    u_confidence = None if kind.last else torch.rand(shape[:2], device=device, generator=rng)
    return u_logits, u_confidence


# The settings of :func:`sample_tokens`: the one ``sampling`` config group of every entry point.
SAMPLING_KEYS = (
    "num_steps", "guidance_scale", "guidance_decay", "guidance_scale_pow", "randomize_temperature",
    "softmax_temperature_annealing", "token_temperature", "self_correction",
)
# The settings a model file may leave out, and what :func:`sample_tokens` then uses (the official step).
SAMPLING_DEFAULTS = {"guidance_scale_pow": 3.0, "token_temperature": None, "self_correction": 0}


# The sampling group's options with a range, on every entry point that has the group.
SAMPLING_RANGES = Ranges(at_least_one=("sampling.num_steps",),
                         not_negative=("sampling.guidance_scale", "sampling.randomize_temperature",
                                       "sampling.self_correction"))


def sampling_overrides(group) -> dict:
    """A ``sampling`` config group (mapping; null entries keep the model's own value) -> the set entries."""
    unknown = sorted(set(group) - set(SAMPLING_KEYS))
    if unknown:
        raise UsageError(f"unknown sampling setting(s) {', '.join(unknown)}; known: {', '.join(SAMPLING_KEYS)}")
    return {k: v for k, v in dict(group).items() if v is not None}


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
    token_temperature: float | None = None,
    self_correction: int = 0,
    rng: torch.Generator | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Sample token sequences for ``labels`` with a masked-token ``generator``.

    labels: int64 [B] in [0, generator.num_classes] (``generator.null_label``: unconditional),
    on the generator's device. guidance_decay: "constant" | "linear" | "power-cosine" (see
    :func:`generator.official.guidance_scale_at` for what each does with ``guidance_scale``).
    randomize_temperature: Gumbel noise scale, annealed as randomize_temperature * (1 - r);
    0 gives deterministic decoding. softmax_temperature_annealing: divide the logits by
    0.5 + 0.8 * (1 - r). token_temperature: None or False (the official step) or >= 0: tokens drawn from
    softmax(logits / (divisor * token_temperature)) (0: argmax), and kept by their log-probability
    under the model plus the Gumbel noise of ``randomize_temperature`` (which then randomises the
    selection only). self_correction: at most this many decoded tokens a step may be re-masked
    when the model now finds them less likely than the new tokens (0: never, as official).
    rng: a torch.Generator on the generator's device; the same seed gives
    the same tokens. on_step: called after every step with the number of steps done
    (1..num_steps), e.g. to show progress. Returns int64 [B, generator.num_tokens] in
    [0, generator.codebook_size).
    """
    steps = plan_steps(
        num_steps=num_steps, num_tokens=generator.num_tokens, guidance_scale=guidance_scale, guidance_decay=guidance_decay,
        guidance_scale_pow=guidance_scale_pow, randomize_temperature=randomize_temperature,
        softmax_temperature_annealing=softmax_temperature_annealing, token_temperature=token_temperature,
        self_correction=self_correction,
    )
    labels = labels.long()
    b, n, k = labels.shape[0], generator.num_tokens, generator.codebook_size
    tokens = torch.full((b, n), generator.mask_id, dtype=torch.long, device=labels.device)
    for step_index, step in enumerate(steps):
        u_logits, u_confidence = draw_uniforms(step, (b, n, k), device=labels.device, rng=rng)
        tokens = sampling_step(
            generator, tokens, labels, kind=step.kind, guidance_decay=guidance_decay, scale=step.scale,
            temperature=step.temperature, divisor=step.divisor, remask_target=step.remask_target,
            u_logits=u_logits, u_confidence=u_confidence,
        )
        if on_step is not None:
            on_step(step_index + 1)
    return tokens
