"""The MaskGIT sampler on small random generators (no fixtures needed)."""
import math

import pytest
import torch

from generator import build_generator, official
from generator.mask_schedule import arccos_mask_ratio
from sampling import sample_tokens

SAMPLING = dict(
    num_steps=6, guidance_scale=3.0, guidance_decay="linear", guidance_scale_pow=3.0, randomize_temperature=4.0,
    softmax_temperature_annealing=True,
)


@pytest.fixture(params=["imagebert", "uvit"])
def gen(request):
    torch.manual_seed(0)
    config = dict(
        arch=request.param, hidden_size=32, depth=3, num_heads=2, mlp_dim=64, codebook_size=16, num_tokens=10,
        num_classes=5,
    )
    return build_generator(config).eval()


def _record(gen):
    calls = []
    forward = gen.forward

    def recording_forward(tokens, labels):
        calls.append((tokens.clone(), labels.clone()))
        return forward(tokens, labels)

    gen.forward = recording_forward
    return calls


def test_same_seed_same_tokens_other_seed_other_tokens(gen):
    labels = torch.tensor([0, 1, 2, 3, 4, 5])  # 5 == null_label: unconditional
    a = sample_tokens(gen, labels, rng=torch.Generator().manual_seed(1), **SAMPLING)
    b = sample_tokens(gen, labels, rng=torch.Generator().manual_seed(1), **SAMPLING)
    c = sample_tokens(gen, labels, rng=torch.Generator().manual_seed(2), **SAMPLING)
    assert a.dtype == torch.int64 and a.shape == (6, gen.num_tokens)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < gen.codebook_size


def test_deterministic_without_temperature(gen):
    kw = {**SAMPLING, "randomize_temperature": 0.0}
    labels = torch.tensor([1, 2])
    a = sample_tokens(gen, labels, rng=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, sample_tokens(gen, labels, rng=torch.Generator().manual_seed(2), **kw))


@pytest.mark.parametrize("decay", ["constant", "linear", "power-cosine"])
def test_one_doubled_forward_per_guided_step(gen, decay):
    calls = _record(gen)
    labels = torch.tensor([0, 3, 4])
    sample_tokens(gen, labels, **{**SAMPLING, "guidance_decay": decay})
    assert len(calls) == SAMPLING["num_steps"]
    for step, (tokens, lab) in enumerate(calls):
        unguided = decay == "linear" and step == 0  # official: scale 0 at the first linear step
        assert len(tokens) == (3 if unguided else 6)
        if not unguided:
            assert torch.equal(tokens[:3], tokens[3:])
            assert torch.equal(lab, torch.tensor([0, 3, 4, 5, 5, 5]))


def test_masked_count_follows_the_arccos_schedule(gen):
    calls = _record(gen)
    steps, n = 8, gen.num_tokens
    sample_tokens(gen, torch.tensor([0, 1, 2, 3]), **{**SAMPLING, "num_steps": steps, "guidance_decay": "constant"})
    masked = [int((tokens[:4] == gen.mask_id).sum(1)[0]) for tokens, _ in calls]
    for tokens, _ in calls:  # every row has the same number masked
        assert len(set((tokens[:4] == gen.mask_id).sum(1).tolist())) == 1
    assert masked[0] == n
    for step in range(1, steps):
        want = max(1, min(masked[step - 1] - 1, math.floor(n * math.acos(step / steps) / (math.pi / 2))))
        assert masked[step] == want, step


def test_decoded_tokens_stay(gen):
    calls = _record(gen)
    sample_tokens(gen, torch.tensor([1, 2]), **SAMPLING)
    for (before, _), (after, _) in zip(calls, calls[1:]):
        kept = before[:2] != gen.mask_id
        assert torch.equal(after[:2][kept], before[:2][kept])


def test_bf16_autocast(gen):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = sample_tokens(gen, torch.tensor([0, 1]), rng=torch.Generator().manual_seed(0), **SAMPLING)
    assert tokens.shape == (2, gen.num_tokens) and int(tokens.max()) < gen.codebook_size


def test_schedules_and_guidance_scales():
    assert arccos_mask_ratio(0.0) == 1.0 and arccos_mask_ratio(1.0) == 0.0
    torch.testing.assert_close(arccos_mask_ratio(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([1.0, 2 / 3, 0.0]))
    linear = [official.guidance_scale_at(i, 8, guidance_scale=4.5, guidance_decay="linear") for i in range(8)]
    assert linear == [i / 8 * 4.5 for i in range(8)]
    assert official.guidance_scale_at(5, 8, guidance_scale=3.0, guidance_decay="constant") == 3.0
    cos = [official.guidance_scale_at(i, 16, guidance_scale=6.9, guidance_decay="power-cosine") for i in range(16)]
    assert cos[0] == 1.0 and all(a < b for a, b in zip(cos, cos[1:])) and cos[-1] < 6.9
    with pytest.raises(ValueError, match="unknown guidance_decay"):
        sample_tokens(build_generator(dict(
            hidden_size=8, depth=1, num_heads=1, mlp_dim=8, codebook_size=4, num_tokens=2, num_classes=1,
        )), torch.tensor([0]), **{**SAMPLING, "guidance_decay": "cosine"})


def test_remask_count_uses_the_first_row():
    is_mask = torch.tensor([[True] * 3 + [False] * 5, [True] * 8])
    # floor(8 * arccos(0.25) / (pi/2)) = 6, clamped to (3 masked in row 0) - 1 = 2 for every row.
    assert int(official.num_to_remask(0.25, 8, is_mask)) == 2
    assert int(official.num_to_remask(0.25, 8, is_mask.flip(0))) == 6
    assert int(official.num_to_remask(0.99, 8, is_mask)) == 1
