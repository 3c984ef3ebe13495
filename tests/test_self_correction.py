"""sampling.self_correction: a step may re-mask the decoded tokens the model now finds least likely
(at most that many a step), so they are drawn again with more of the image given; 0 by default
(the official step)."""
import pytest
import torch
from sampler_helpers import SAMPLING, FixedLogits, tiny_generator

from generator.sampler import SAMPLING_DEFAULTS, SAMPLING_KEYS, plan_steps, sampling_step
from sampling import sample_tokens
from sampling.fast import StaticSampler


def _step(gen, tokens, *, correct, remask_target):
    kind = plan_steps(num_steps=3, num_tokens=gen.num_tokens, guidance_scale=0.0, guidance_decay="constant",
                      randomize_temperature=0.0, softmax_temperature_annealing=False,
                      self_correction=correct)[1].kind
    return sampling_step(gen, tokens, torch.zeros(len(tokens), dtype=torch.long), kind=kind,
                         guidance_decay="constant", scale=0.0, temperature=0.0, divisor=1.0,
                         remask_target=remask_target, u_logits=None, u_confidence=None)


def test_zero_is_the_official_step():
    gen, labels = tiny_generator(), torch.tensor([0, 1, 2, 3, 4])
    want = sample_tokens(gen, labels, rng=torch.Generator().manual_seed(1), **SAMPLING)
    got = sample_tokens(gen, labels, rng=torch.Generator().manual_seed(1), self_correction=0, **SAMPLING)
    assert torch.equal(got, want)
    assert plan_steps(num_tokens=10, self_correction=0, **SAMPLING) == plan_steps(num_tokens=10, **SAMPLING)
    assert "self_correction" in SAMPLING_KEYS and SAMPLING_DEFAULTS["self_correction"] == 0
    corrected = sample_tokens(gen, labels, rng=torch.Generator().manual_seed(1), self_correction=3, **SAMPLING)
    assert not torch.equal(corrected, want)


def test_the_first_and_last_steps_correct_nothing():
    plan = plan_steps(num_tokens=10, self_correction=2, **SAMPLING)
    assert [s.kind.correct for s in plan] == [0, 2, 2, 2, 2, 0]
    assert [s.remask_target for s in plan] == [s.remask_target for s in plan_steps(num_tokens=10, **SAMPLING)]


def test_the_least_likely_decoded_tokens_are_re_masked_at_most_correct_of_them():
    # Every position prefers code 2, surer the further right it sits; code 5 is less likely there.
    n, k = 12, 8
    logits = torch.zeros(n, k)
    logits[:, 2] = 4.0 + 0.1 * torch.arange(n).float()
    logits[:, 5] = -torch.arange(n).float()
    gen = FixedLogits(logits)
    tokens = torch.full((1, n), gen.mask_id)
    tokens[0, :4] = 2          # decoded, likely
    tokens[0, 4:8] = 5         # decoded, unlikely (least likely at 7, then 6)
    def masked(out):
        return (out == gen.mask_id)[0].nonzero().flatten().tolist()

    # Without self-correction the decoded tokens stay; of the masked 8-11 the least sure is masked again.
    out = _step(gen, tokens, correct=0, remask_target=1)
    assert torch.equal(out[0, :8], tokens[0, :8]) and masked(out) == [8]
    # With 2: positions 7 and 6 join the candidates and are less likely than the new code-2 tokens, so they go
    # first (5 and 4 stay: at most 2 are taken back); the number masked follows the schedule (3 here).
    out = _step(gen, tokens, correct=2, remask_target=3)
    assert masked(out) == [6, 7, 8] and torch.equal(out[0, :6], tokens[0, :6]) and (out[0, 9:] == 2).all()
    # The target counts the new tokens too: with 1 to re-mask, only the least likely decoded one goes.
    out = _step(gen, tokens, correct=2, remask_target=1)
    assert (out == gen.mask_id)[0].nonzero().flatten().tolist() == [7]


def test_hot_draws_end_more_likely_under_the_model():
    # A hot official draw (randomize_temperature 6) leaves unlikely codes; self-correction draws some again.
    n, k = 32, 16
    logits = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 3
    gen = FixedLogits(logits)
    labels = torch.zeros(200, dtype=torch.long)
    settings = dict(num_steps=12, guidance_scale=0.0, guidance_decay="constant", randomize_temperature=6.0,
                    softmax_temperature_annealing=True)
    logp = logits.log_softmax(-1)

    def mean_logp(tokens):
        return float(logp.gather(-1, tokens.T).mean())

    plain = sample_tokens(gen, labels, rng=torch.Generator().manual_seed(1), **settings)
    corrected = sample_tokens(gen, labels, rng=torch.Generator().manual_seed(1), self_correction=4, **settings)
    assert int(corrected.max()) < k and int(corrected.min()) >= 0
    assert mean_logp(corrected) > mean_logp(plain) + 0.2


@pytest.mark.parametrize("arch", ["imagebert", "uvit"])
def test_static_sampler_equals_sample_tokens(arch):
    gen, labels = tiny_generator(arch), torch.tensor([0, 1, 2, 3, 4, 5, 2])
    for settings in ({**SAMPLING, "self_correction": 2}, {**SAMPLING, "self_correction": 3, "token_temperature": 1.0}):
        want = sample_tokens(gen, labels, rng=torch.Generator().manual_seed(3), **settings)
        got = StaticSampler(gen, sampling=settings)(labels, torch.Generator().manual_seed(3))
        assert torch.equal(got, want)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_a_bad_count_is_refused(bad):
    with pytest.raises(ValueError, match="self_correction must be a whole number"):
        plan_steps(num_tokens=10, self_correction=bad, **SAMPLING)
