"""The tokenizer computes what the official TiTok code computes (fixtures: official_tiny)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from titok_core.checkpoints import read_config_file
from tokenizer import CheckpointError, load_tokenizer, official

pytestmark = pytest.mark.cpu_threads(2)  # the golden outputs were made with 2 threads


def _load(fx):
    d = fx / "tokenizer"
    tok = load_tokenizer(d / "config.yaml", checkpoint=d / "tokenizer.bin")
    x = torch.load(d / "inputs.pt", weights_only=True)["x"]
    expected = torch.load(d / "expected.pt", weights_only=True)
    return tok, x, expected


def _as_official(z):  # ours [B,N,T] -> official [B,T,1,N]
    return z.transpose(1, 2).unsqueeze(2)


def test_encode_and_decode_match_official(official_tiny):
    tok, x, e = _load(official_tiny)
    with torch.no_grad():
        z = tok.encode_latents(x)
        z_q, tokens, _ = tok.quantize(z)
        logits = tok.decoder(z_q)
        decoded = tok.decode_latents(z_q)
        decoded_tokens = tok.decode_latents(tok.quantize.lookup(e["tokens"]))
    assert torch.equal(tok.encode(x), e["tokens"])
    assert torch.equal(tokens, e["tokens"])
    torch.testing.assert_close(_as_official(z), e["z"], atol=1e-5, rtol=0)
    torch.testing.assert_close(_as_official(z_q), e["z_quantized"], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, e["decoder_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(decoded, e["decoded"], atol=1e-4, rtol=0)
    torch.testing.assert_close(decoded_tokens, e["decoded_tokens"], atol=1e-4, rtol=0)
    torch.testing.assert_close(tok.decode(e["tokens"]), e["decoded_tokens"].clamp(0, 1), atol=1e-4, rtol=0)


def test_legacy_layout_quirk_is_needed(official_tiny, monkeypatch):
    tok, x, e = _load(official_tiny)
    monkeypatch.setattr(official, "legacy_latent_layout", lambda z: z)
    with torch.no_grad():
        z = tok.encode_latents(x)
    assert (_as_official(z) - e["z"]).abs().max() > 1e-2


def test_shortcut_on_output_quirk_is_needed(official_tiny, monkeypatch):
    tok, _, e = _load(official_tiny)
    # What the block would compute with a conventional shortcut on its input.
    monkeypatch.setattr(official, "resblock_shortcut_on_output", lambda h, s: h + torch.zeros_like(h))
    with torch.no_grad():
        decoded = tok.decode_latents(tok.quantize.lookup(e["tokens"]))
    assert (decoded - e["decoded_tokens"]).abs().max() > 1e-2


def test_hf_directory_and_safetensors(official_tiny, tmp_path):
    d = official_tiny / "tokenizer"
    config = read_config_file(d / "config.yaml")
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = torch.load(d / "tokenizer.bin", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    tok = load_tokenizer(tmp_path)
    x = torch.load(d / "inputs.pt", weights_only=True)["x"]
    expected = torch.load(d / "expected.pt", weights_only=True)
    assert torch.equal(tok.encode(x), expected["tokens"])


def test_hf_repo_id_from_local_cache(official_tiny, tmp_path, monkeypatch):
    d = official_tiny / "tokenizer"
    repo = tmp_path / "hub" / "models--someone--tokenizer_tiny"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snap / "config.json").write_text(json.dumps(read_config_file(d / "config.yaml")))
    shutil.copy(d / "tokenizer.bin", snap / "pytorch_model.bin")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    tok = load_tokenizer("someone/tokenizer_tiny")
    x = torch.load(d / "inputs.pt", weights_only=True)["x"]
    assert torch.equal(tok.encode(x), torch.load(d / "expected.pt", weights_only=True)["tokens"])

    with pytest.raises(CheckpointError, match="download config.json and model.safetensors"):
        load_tokenizer("someone/not_cached_anywhere")


def test_strict_loading_names_the_problem(official_tiny, tmp_path):
    d = official_tiny / "tokenizer"
    state = torch.load(d / "tokenizer.bin", weights_only=True)

    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes((d / "tokenizer.bin").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_tokenizer(d / "config.yaml", checkpoint=truncated)

    missing = dict(state)
    del missing["decoder.mask_token"]
    torch.save(missing, tmp_path / "missing.bin")
    with pytest.raises(CheckpointError, match=r"missing key.*decoder\.mask_token"):
        load_tokenizer(d / "config.yaml", checkpoint=tmp_path / "missing.bin")

    wrong = dict(state)
    wrong["quantize.embedding.weight"] = torch.zeros(65, 12)
    torch.save(wrong, tmp_path / "wrong.bin")
    with pytest.raises(CheckpointError, match=r"shape mismatch.*quantize\.embedding\.weight \(65, 12\)"):
        load_tokenizer(d / "config.yaml", checkpoint=tmp_path / "wrong.bin")

    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_tokenizer("titok_s128", checkpoint=d / "tokenizer.bin")

    torch.save({"model": state}, tmp_path / "nested.bin")
    with pytest.raises(CheckpointError, match="not a flat state dict"):
        load_tokenizer(d / "config.yaml", checkpoint=tmp_path / "nested.bin")

    with pytest.raises(CheckpointError, match="unknown tokenizer spec"):
        load_tokenizer("titok_xl1")


def test_pickled_code_is_never_run(official_tiny, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_tokenizer(official_tiny / "tokenizer" / "config.yaml", checkpoint=tmp_path / "evil.bin")


def test_presets_have_released_shapes():
    with torch.device("meta"):
        for name, tokens, width, depth in [("titok_l32", 32, 1024, 24), ("titok_b64", 64, 768, 12), ("titok_s128", 128, 512, 8)]:
            tok = load_tokenizer(name, random_weights=True)
            assert tok.latent_tokens.shape == (tokens, width)
            assert len(tok.encoder.blocks) == depth and len(tok.decoder.blocks) == depth
            assert tok.quantize.embedding.weight.shape == (4096, 12)
            assert tok.proxy_codebook.weight.shape == (1024, 256)
            assert tok.pixel_decoder.conv_in.weight.shape == (512, 256, 3, 3)


def test_non_legacy_rgb_variant_matches_official_layout():
    """Official non-legacy decoder: 1x1 conv to p*p*3 channels, 'b (p1 p2 c) h w -> b c (h p1) (w p2)', 3x3 conv."""
    official_cfg = {
        "model": {"vq_model": {
            "codebook_size": 32, "token_size": 8, "use_l2_norm": False, "commitment_cost": 0.25,
            "vit_enc_model_size": "tiny", "vit_dec_model_size": "tiny", "vit_enc_patch_size": 16,
            "vit_dec_patch_size": 16, "num_latent_tokens": 4, "finetune_decoder": False, "is_legacy": False,
        }},
        "dataset": {"preprocessing": {"crop_size": 32}},
    }
    config = official.config_from_official(official_cfg)
    assert config["decoder_output"] == "rgb" and not config["legacy_layout"]
    from tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(config).eval()
    official_sd = {}
    for k, v in tok.state_dict().items():  # our keys -> official keys, 1x1 convs as 4D
        k2 = k.replace("decoder.head.", "decoder.ffn.0.").replace("encoder.proj_out.", "encoder.conv_out.")
        k2 = k2.replace("decoder.embed.", "decoder.decoder_embed.").replace("latent_positional", "latent_token_positional")
        k2 = k2.replace(".blocks.", ".transformer.").replace(".norm1.", ".ln_1.").replace(".norm2.", ".ln_2.")
        k2 = k2.replace("norm_pre", "ln_pre").replace("norm_post", "ln_post").replace("attn.qkv.weight", "attn.in_proj_weight")
        k2 = k2.replace("attn.qkv.bias", "attn.in_proj_bias").replace("attn.proj.", "attn.out_proj.")
        k2 = k2.replace("mlp.0.", "mlp.c_fc.").replace("mlp.2.", "mlp.c_proj.")
        if k2.endswith(("ffn.0.weight", "conv_out.weight")) and v.dim() == 2:
            v = v[:, :, None, None]
        official_sd[k2] = v
    converted = official.state_dict_from_official(official_sd, config)
    assert set(converted) == set(tok.state_dict())
    for k, v in converted.items():
        assert torch.equal(v, tok.state_dict()[k]), k

    # The decoder's pixel layout, computed the official way from the 1x1-conv head.
    z = torch.randn(2, 4, 8)
    dec = tok.decoder
    with torch.no_grad():
        x = dec.embed(z) + dec.latent_positional_embedding
        q = torch.cat([dec.class_embedding.expand(2, -1, -1), dec.mask_token.expand(2, 4, -1)], 1) + dec.positional_embedding
        h = dec.norm_pre(torch.cat([q, x], 1))
        for b in dec.blocks:
            h = b(h)
        h = dec.norm_post(h[:, 1:5]).permute(0, 2, 1).reshape(2, 64, 2, 2)
        h = torch.nn.functional.conv2d(h, official_sd["decoder.ffn.0.weight"], official_sd["decoder.ffn.0.bias"])
        h = h.reshape(2, 16, 16, 3, 2, 2).permute(0, 3, 4, 1, 5, 2).reshape(2, 3, 32, 32)
        want = dec.conv_out(h)
        torch.testing.assert_close(dec(z), want, atol=1e-5, rtol=0)


def test_bf16_autocast_on_cpu(official_tiny):
    """bf16 autocast runs end to end; quantisation stays float32, so most tokens survive."""
    from titok_core.runtime import autocast

    tok, x, e = _load(official_tiny)
    with torch.no_grad(), autocast(torch.device("cpu"), "bf16"):
        tokens = tok.encode(x)
        images = tok.decode(tokens)
    assert tokens.dtype == torch.int64 and images.shape == (2, 3, 64, 64)
    assert images.min() >= 0 and images.max() <= 1
    assert (tokens == e["tokens"]).float().mean() >= 0.5
