"""sampling.token_temperature: tokens drawn at their own temperature, the ones kept chosen by the
model's log-probability plus the (separate) selection noise; off by default (the official step)."""
import pytest
import torch
from sampler_helpers import SAMPLING, FixedLogits, tiny_generator

from generator.sampler import (
    SAMPLING_DEFAULTS,
    SAMPLING_KEYS,
    Step,
    StepKind,
    draw_uniforms,
    plan_steps,
    sampling_overrides,
    sampling_step,
)
from sampling import sample_tokens
from sampling.fast import StaticSampler


def _frequencies(tokens: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bincount(tokens.flatten(), minlength=k).float() / tokens.numel()


def test_default_and_false_are_the_official_step():
    gen, labels = tiny_generator(), torch.tensor([0, 1, 2, 3, 4, 5])
    want = sample_tokens(gen, labels, rng=torch.Generator().manual_seed(1), **SAMPLING)
    for off in (None, False):
        got = sample_tokens(gen, labels, rng=torch.Generator().manual_seed(1), token_temperature=off, **SAMPLING)
        assert torch.equal(got, want)
    assert plan_steps(num_tokens=10, token_temperature=False, **SAMPLING) == plan_steps(num_tokens=10, **SAMPLING)
    assert "token_temperature" in SAMPLING_KEYS and SAMPLING_DEFAULTS["token_temperature"] is None
    assert sampling_overrides({"token_temperature": 1.0, "num_steps": None}) == {"token_temperature": 1.0}


def test_official_draw_is_hot_and_the_token_temperature_is_not():
    """The lead of issue 30 in numbers: at randomize_temperature T the official step samples from
    softmax(logits / (divisor * T)); token_temperature samples from softmax(logits / (divisor * t))."""
    logits = torch.tensor([3.0, 1.0, 0.0, -1.0]).expand(50, 4)
    gen = FixedLogits(logits)
    tokens = torch.full((400, 50), gen.mask_id)
    labels = torch.zeros(400, dtype=torch.long)
    rng = torch.Generator().manual_seed(0)
    # Official, T = 2, divisor 0.9 (step 1 of 2 with annealing): effectively temperature 1.8.
    kind = StepKind(guided=False, noisy=True, last=True)
    u, _ = draw_uniforms(Step(kind, 0.0, 2.0, 0.9, 0), (400, 50, 4), device=torch.device("cpu"), rng=rng)
    got = sampling_step(gen, tokens, labels, kind=kind, guidance_decay="constant", scale=0.0, temperature=2.0,
                        divisor=0.9, remask_target=0, u_logits=u, u_confidence=None)
    assert torch.allclose(_frequencies(got, 4), (logits[0] / 1.8).softmax(-1), atol=0.01)
    # token_temperature 1 (no annealing): the model's own distribution, whatever randomize_temperature says.
    for t in (1.0, 0.5):
        plan = plan_steps(num_steps=1, num_tokens=50, guidance_scale=0.0, guidance_decay="constant",
                          randomize_temperature=4.0, softmax_temperature_annealing=False, token_temperature=t)
        step = plan[0]
        assert step.kind.decoupled and step.kind.draw and step.divisor == t
        u, c = draw_uniforms(step, (400, 50, 4), device=torch.device("cpu"), rng=rng)
        assert c is None  # the last step selects nothing
        got = sampling_step(gen, tokens, labels, kind=step.kind, guidance_decay="constant", scale=0.0,
                            temperature=step.temperature, divisor=step.divisor, remask_target=0, u_logits=u,
                            u_confidence=None)
        assert torch.allclose(_frequencies(got, 4), (logits[0] / t).softmax(-1), atol=0.01)


def test_kept_tokens_are_the_most_likely_without_selection_noise():
    # Position i is surer of its code the larger i is; argmax draws, no selection noise.
    k, n = 8, 10
    logits = torch.zeros(n, k)
    logits[:, 2] = torch.arange(n).float() + 1
    gen = FixedLogits(logits)
    out = sample_tokens(gen, torch.zeros(3, dtype=torch.long), num_steps=4, guidance_scale=0.0,
                        guidance_decay="constant", randomize_temperature=0.0, softmax_temperature_annealing=True,
                        token_temperature=0.0)
    assert torch.equal(out, torch.full((3, n), 2))
    plan = plan_steps(num_steps=4, num_tokens=n, guidance_scale=0.0, guidance_decay="constant", randomize_temperature=0.0,
                      softmax_temperature_annealing=True, token_temperature=0.0)
    step = plan[0]
    assert not step.kind.draw and not step.kind.noisy
    assert draw_uniforms(step, (3, n, k), device=torch.device("cpu"), rng=None) == (None, None)
    first = sampling_step(gen, torch.full((3, n), gen.mask_id), torch.zeros(3, dtype=torch.long), kind=step.kind,
                          guidance_decay="constant", scale=0.0, temperature=0.0, divisor=step.divisor,
                          remask_target=step.remask_target, u_logits=None, u_confidence=None)
    kept = (first != gen.mask_id)[0]
    assert kept.sum() == n - step.remask_target and kept[-int(kept.sum()):].all()  # the surest positions


def test_selection_noise_alone_draws_only_the_selection_uniforms():
    plan = plan_steps(num_tokens=10, token_temperature=0.0, **SAMPLING)
    u, c = draw_uniforms(plan[0], (2, 10, 16), device=torch.device("cpu"), rng=torch.Generator().manual_seed(0))
    assert u is None and c.shape == (2, 10)
    assert draw_uniforms(plan[-1], (2, 10, 16), device=torch.device("cpu"), rng=None) == (None, None)


@pytest.mark.parametrize("arch", ["imagebert", "uvit"])
@pytest.mark.parametrize("t, annealing", [(1.0, False), (0.7, True), (0.0, True)])
def test_static_sampler_equals_sample_tokens(arch, t, annealing):
    gen, labels = tiny_generator(arch), torch.tensor([0, 1, 2, 3, 4, 5, 2])
    settings = {**SAMPLING, "softmax_temperature_annealing": annealing, "token_temperature": t}
    want = sample_tokens(gen, labels, rng=torch.Generator().manual_seed(3), **settings)
    got = StaticSampler(gen, sampling=settings)(labels, torch.Generator().manual_seed(3))
    assert torch.equal(got, want)
    official = sample_tokens(gen, labels, rng=torch.Generator().manual_seed(3), **SAMPLING)
    assert not torch.equal(want, official)
    assert int(want.min()) >= 0 and int(want.max()) < gen.codebook_size


def test_negative_token_temperature_is_refused():
    with pytest.raises(ValueError, match="token_temperature"):
        plan_steps(num_tokens=10, token_temperature=-1.0, **SAMPLING)
