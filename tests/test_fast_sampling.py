"""The fast sampling paths (sampling.fast) give the eager sampler's tokens and the eager decoder's images."""
import json

import pytest
import torch

from generator import build_generator
from generator.sampler import plan_steps
from sampling import sample_tokens
from sampling.fast import FastDecoder, StaticSampler, pipelined, to_uint8
from tokenizer import load_tokenizer

SAMPLING = dict(
    num_steps=6, guidance_scale=3.0, guidance_decay="linear", guidance_scale_pow=3.0, randomize_temperature=4.0,
    softmax_temperature_annealing=True,
)


def _gen(arch="imagebert", depth=3):
    torch.manual_seed(0)
    return build_generator(dict(
        arch=arch, hidden_size=32, depth=depth, num_heads=2, mlp_dim=64, codebook_size=16, num_tokens=10, num_classes=5,
    )).eval()


@pytest.mark.parametrize("arch", ["imagebert", "uvit"])
@pytest.mark.parametrize("decay, annealing", [("constant", True), ("linear", True), ("power-cosine", False)])
def test_static_sampler_equals_sample_tokens(arch, decay, annealing):
    """Constants as device tensors and noise drawn up front: bit for bit the eager sampler's tokens."""
    gen = _gen(arch)
    settings = {**SAMPLING, "guidance_decay": decay, "softmax_temperature_annealing": annealing}
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 2])
    want = sample_tokens(gen, labels, rng=torch.Generator().manual_seed(3), **settings)
    got = StaticSampler(gen, sampling=settings)(labels, torch.Generator().manual_seed(3))
    assert got.dtype == torch.int64 and torch.equal(got, want)
    other = StaticSampler(gen, sampling=settings)(labels, torch.Generator().manual_seed(4))
    assert not torch.equal(other, want)


def test_plan_has_few_step_kinds():
    """One compiled graph per step kind: the released settings need at most three."""
    for steps, decay, temperature in [(8, "linear", 9.5), (8, "linear", 11.0), (64, "power-cosine", 2.8)]:
        plan = plan_steps(num_steps=steps, num_tokens=32, guidance_scale=4.5, guidance_decay=decay,
                          randomize_temperature=temperature, softmax_temperature_annealing=True)
        kinds = {s.kind for s in plan}
        assert len(plan) == steps and len(kinds) <= 3
        assert plan[-1].kind.last and not plan[-1].kind.noisy and plan[-1].remask_target == 0
        assert plan[0].kind.guided == (decay != "linear")  # linear: scale 0 at step 0, as official


def test_compiled_sampler_matches_eager_at_temperature_0(tmp_path, monkeypatch):
    """torch.compile (inductor, fullgraph: no graph break, so no host sync) gives the eager ids."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a cold compile, as a user's first run
    gen = _gen(depth=1)
    settings = {**SAMPLING, "num_steps": 4, "guidance_decay": "constant", "randomize_temperature": 0.0}
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    want = sample_tokens(gen, labels, **settings)
    sampler = StaticSampler(gen, sampling=settings, compile="default")
    assert torch.equal(sampler(labels), want)
    assert torch.equal(sampler(labels.flip(0)), sample_tokens(gen, labels.flip(0), **settings))  # no recompile needed


@pytest.mark.slow
@pytest.mark.parametrize("decay", ["linear", "power-cosine"])
def test_compiled_sampler_with_noise(decay):
    """With Gumbel noise the compiled step draws the same noise; ids agree unless rounding flips a choice."""
    gen = _gen(depth=2)
    settings = {**SAMPLING, "guidance_decay": decay}
    labels = torch.arange(12) % 6
    want = sample_tokens(gen, labels, rng=torch.Generator().manual_seed(0), **settings)
    got = StaticSampler(gen, sampling=settings, compile="default")(labels, torch.Generator().manual_seed(0))
    assert (got == want).float().mean() >= 0.95


@pytest.fixture
def tok(official_tiny):
    d = official_tiny / "tokenizer"
    return load_tokenizer(d / "config.yaml", checkpoint=d / "tokenizer.bin")


def test_fast_decoder_equals_decode(tok):
    tokens = torch.randint(0, tok.codebook_size, (3, tok.num_tokens), generator=torch.Generator().manual_seed(0))
    want = tok.decode(tokens)
    torch.testing.assert_close(FastDecoder(tok)(tokens), want, atol=0, rtol=0)
    # channels_last changes only the memory layout of the pixel decoder's weights.
    state = {k: v.clone() for k, v in tok.state_dict().items()}
    fast = FastDecoder(tok, channels_last=True, uint8=True)
    assert tok.pixel_decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(state[k], v) for k, v in tok.state_dict().items())
    images = fast(tokens)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, tok.image_size, tok.image_size)
    assert int((images.int() - to_uint8(want).int()).abs().max()) <= 1


@pytest.mark.slow
def test_compiled_decoder_close_to_decode(tok):
    tokens = torch.randint(0, tok.codebook_size, (2, tok.num_tokens), generator=torch.Generator().manual_seed(0))
    want = to_uint8(tok.decode(tokens))
    got = FastDecoder(tok, compile="default", channels_last=True, uint8=True)(tokens)
    assert int((got.int() - want.int()).abs().max()) <= 1


def test_pipelined_runs_every_stage_in_order():
    items = [torch.tensor([i]) for i in range(5)]
    out = list(pipelined(items, [lambda x: x * 10, lambda x: (x, x + 1), lambda t: t[0] + t[1]], device=torch.device("cpu")))
    assert [int(o) for o in out] == [20 * i + 1 for i in range(5)]


def test_benchmark_json_on_the_tiny_pipeline(official_tiny, capsys):
    from titok_bench import sampling as benchmark

    fx = official_tiny
    result = benchmark.main([
        "--generator-spec", str(fx / "generator_imagebert" / "config.yaml"),
        "--generator-checkpoint", str(fx / "generator_imagebert" / "generator.bin"),
        "--tokenizer-spec", str(fx / "tokenizer" / "config.yaml"), "--device", "cpu", "--dtype", "fp32", "--batch-size", "3",
        "--batches", "2", "--warmup", "1", "--sampler-compile", "none", "--decoder-compile", "none",
    ])
    assert json.loads(capsys.readouterr().out) == result
    for path in ("eager", "fast"):
        r = result["paths"][path]
        assert r["samples_per_s"] > 0 and r["peak_memory_mb"] > 0 and r["largest_batch"] is None
    assert result["paths"]["fast"]["overlap"] and not result["paths"]["eager"]["overlap"]
    agree = result["agreement"]
    assert agree["ids_equal_share"] == agree["ids_equal_share_temperature_0"] == 1.0
    assert agree["decoder_max_abs_diff_uint8"] <= 1


@pytest.mark.gpu
def test_gpu_fast_paths_agree_with_eager(official_tiny):
    """On CUDA: the graph-captured sampler, the compiled decoder and the overlapped streams."""
    dev = torch.device("cuda")
    gen = _gen(depth=2).to(dev)
    labels = (torch.arange(16) % 6).to(dev)
    settings = {**SAMPLING, "randomize_temperature": 0.0}
    want = sample_tokens(gen, labels, **settings)
    sampler = StaticSampler(gen, sampling=settings, compile="reduce-overhead")
    for _ in range(3):  # warm-up, capture, replay
        got = sampler(labels)
    assert torch.equal(got, want)

    d = official_tiny / "tokenizer"
    tok = load_tokenizer(d / "config.yaml", checkpoint=d / "tokenizer.bin").to(dev)
    tokens = [torch.randint(0, tok.codebook_size, (4, tok.num_tokens), device=dev) for _ in range(5)]
    decoder = FastDecoder(tok, compile="default", channels_last=True, uint8=True)
    serial = list(pipelined(tokens, [lambda t: t.clone(), decoder], device=dev, overlap=False))
    overlapped = list(pipelined(tokens, [lambda t: t.clone(), decoder], device=dev, overlap=True))
    assert all(torch.equal(a, b) for a, b in zip(serial, overlapped))
    assert int((serial[0].int() - to_uint8(tok.decode(tokens[0])).int()).abs().max()) <= 2
