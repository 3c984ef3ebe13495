"""The six single-stage tokenizers (VQ-8k, VAE) compute what the official code computes.

Golden outputs: tests/fixtures/official_vq8k_tiny and official_vae_tiny (tiny sizes, official
key names, see tests/fixtures/README.md); the shapes of all nine released tokenizers as the
official code builds them: tests/fixtures/official_titok_shapes.json.gz.
"""
import gzip
import json

import pytest
import torch
from safetensors.torch import save_file

from titok_core.checkpoints import key_mismatches, read_config_file
from tokenizer import PRESETS, CheckpointError, load_tokenizer, official
from tokenizer.presets import HUB_REPOS, RELEASED_FILES

from conftest import FIXTURES

pytestmark = pytest.mark.cpu_threads(2)  # the golden outputs were made with 2 threads

RELEASED = ["titok_l32", "titok_b64", "titok_s128", "titok_bl64_vq8k", "titok_bl128_vq8k", "titok_sl256_vq8k",
            "titok_ll32_vae_c16", "titok_bl64_vae_c16", "titok_bl128_vae_c16"]


def _load(case):
    d = FIXTURES / case
    tok = load_tokenizer(d / "config.yaml", checkpoint=d / "tokenizer.bin")
    x = torch.load(d / "inputs.pt", weights_only=True)["x"]
    return tok, x, torch.load(d / "expected.pt", weights_only=True)


def _as_official(z):  # ours [B,N,T] -> official [B,T,1,N]
    return z.transpose(1, 2).unsqueeze(2)


def test_vq8k_matches_official():
    tok, x, e = _load("official_vq8k_tiny")
    assert tok.config.enc_width != tok.config.dec_width and not tok.config.use_l2_norm
    with torch.no_grad():
        z = tok.encode_latents(x)
        z_q, tokens, _ = tok.quantize(z)
        decoded = tok.decode_latents(z_q)
        decoded_tokens = tok.decode_latents(tok.quantize.lookup(e["tokens"]))
    assert torch.equal(tok.encode(x), e["tokens"])
    assert torch.equal(tokens, e["tokens"])
    torch.testing.assert_close(_as_official(z), e["z"], atol=1e-5, rtol=0)
    torch.testing.assert_close(_as_official(z_q), e["z_quantized"], atol=1e-5, rtol=0)
    torch.testing.assert_close(decoded, e["decoded"], atol=1e-4, rtol=0)
    torch.testing.assert_close(decoded_tokens, e["decoded_tokens"], atol=1e-4, rtol=0)
    torch.testing.assert_close(tok.decode(e["tokens"]), e["decoded_tokens"].clamp(0, 1), atol=1e-4, rtol=0)


def test_vae_matches_official():
    tok, x, e = _load("official_vae_tiny")
    assert tok.quantizer == "vae" and not tok.is_discrete and tok.codebook_size is None and tok.quantize is None
    with torch.no_grad():
        params = tok.encode_latents(x)
        mean, std = tok.posterior(x)
        decoded_mean = tok.decode_latents(mean)
    torch.testing.assert_close(_as_official(params), e["z"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(_as_official(mean), e["mean"], atol=1e-5, rtol=0)
    torch.testing.assert_close(_as_official(std), e["std"], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(decoded_mean, e["decoded_mean"], atol=1e-4, rtol=0)
    # encode() is the mean; decode() takes latents and clamps to [0, 1].
    assert torch.equal(tok.encode(x), mean)
    torch.testing.assert_close(tok.decode(mean), e["decoded_mean"].clamp(0, 1), atol=1e-4, rtol=0)
    # A sample from a generator seeded 7 is the official sample after torch.manual_seed(7).
    sample = tok.encode(x, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(_as_official(sample), e["sample_seed7"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tok.decode_latents(sample), e["decoded_sample_seed7"], atol=1e-4, rtol=0)
    again = tok.encode(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(sample, again) and not torch.equal(sample, mean)


def test_logvar_clamp_quirk_is_needed(monkeypatch):
    tok, x, e = _load("official_vae_tiny")
    outside = e["diag_logvar_outside_clamp"]
    assert outside[0] > 0 and outside[1] > 0  # the fixture has log-variances beyond both ends
    monkeypatch.setattr(official, "LOGVAR_RANGE", (-float("inf"), float("inf")))
    _, std = tok.posterior(x)
    assert ((_as_official(std) - e["std"]).abs() / e["std"]).max() > 1.0


def test_vae_api_refuses_what_does_not_fit():
    vae, x, _ = _load("official_vae_tiny")
    vq, _, e = _load("official_vq8k_tiny")
    with pytest.raises(ValueError, match=r"VAE tokenizer decodes float latents \[B, 8, 16\]"):
        vae.decode(e["tokens"])
    with pytest.raises(ValueError, match="generator= is for VAE tokenizers"):
        vq.encode(x, generator=torch.Generator())
    with pytest.raises(ValueError, match="posterior\\(\\) is for VAE tokenizers"):
        vq.posterior(x)
    with pytest.raises(ValueError, match="training is implemented for VQ tokenizers only"):
        vae(x)


@pytest.mark.parametrize("case", ["official_vq8k_tiny", "official_vae_tiny"])
def test_hf_directory(case, tmp_path):
    d = FIXTURES / case
    (tmp_path / "config.json").write_text(json.dumps(read_config_file(d / "config.yaml")))
    state = torch.load(d / "tokenizer.bin", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    tok = load_tokenizer(tmp_path)
    ref, x, _ = _load(case)
    assert torch.equal(tok.encode(x), ref.encode(x))
    state.pop("decoder.conv_out.weight")
    torch.save(state, tmp_path / "missing.bin")
    with pytest.raises(CheckpointError, match=r"missing key.*decoder\.conv_out\.weight"):
        load_tokenizer(d / "config.yaml", checkpoint=tmp_path / "missing.bin")


def _recorded():
    with gzip.open(FIXTURES / "official_titok_shapes.json.gz", "rt") as f:
        return json.load(f)["models"]


def test_nine_presets_have_the_official_configs_and_shapes():
    recorded = _recorded()
    assert sorted(recorded) == sorted(RELEASED)
    assert set(HUB_REPOS) == set(RELEASED_FILES) == set(RELEASED)
    for name, rec in recorded.items():
        assert official.config_from_official(rec["config"]) == PRESETS[name], name
        assert HUB_REPOS[name] == f"yucornetto/tokenizer_{name}_imagenet"
        official_sd = {k: torch.empty(shape, device="meta") for k, shape in rec["shapes"].items()}
        converted = official.state_dict_from_official(official_sd, PRESETS[name])
        with torch.device("meta"):
            tok = load_tokenizer(name, random_weights=True)
        ours = {k: tuple(v.shape) for k, v in tok.state_dict().items()}
        assert key_mismatches(ours, {k: tuple(v.shape) for k, v in converted.items()}) == [], name
        assert tok.num_tokens == rec["config"]["model"]["vq_model"]["num_latent_tokens"]
    with torch.device("meta"):
        vae = load_tokenizer("titok_bl128_vae_c16", random_weights=True)
        vq8k = load_tokenizer("titok_sl256_vq8k", random_weights=True)
    assert vae.encoder.proj_out.weight.shape == (32, 768) and vae.decoder.embed.weight.shape == (1024, 16)
    assert vq8k.quantize.embedding.weight.shape == (8192, 64) and vq8k.decoder.head.weight.shape == (768, 1024)


def test_maskgit_generation_refuses_a_vae_tokenizer(official_tiny):
    from sampling.pipeline import load_pipeline

    g = official_tiny / "generator_imagebert"
    vae = FIXTURES / "official_vae_tiny" / "config.yaml"
    with pytest.raises(CheckpointError, match=r"^MaskGIT generation needs a VQ tokenizer with discrete tokens; .*"
                                              r"official_vae_tiny/config.yaml is a continuous \(VAE\) tokenizer$"):
        load_pipeline(generator={"spec": g / "config.yaml", "checkpoint": g / "generator.bin"}, tokenizer={"spec": vae})


def test_tokenizer_training_takes_the_vq_and_the_vae_releases():
    """The single-stage recipes train both kinds (tests/test_tokenizer_gan.py trains them)."""
    from tokenizer.presets import resolve_model

    vae = resolve_model({"preset": "titok_ll32_vae_c16", "image_size": None})
    assert vae["quantizer"] == "vae" and vae["token_size"] == 16
    assert resolve_model({"preset": "titok_bl64_vq8k"})["codebook_size"] == 8192
