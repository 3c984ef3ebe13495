"""The generators compute what the official ImageBert / UViTBert compute (fixtures: official_tiny)."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import save_file

from generator import CheckpointError, build_generator, load_generator, official
from generator.presets import PRESETS
from sampling import sample_tokens
from titok_core.checkpoints import read_config_file, save_model_file

pytestmark = pytest.mark.cpu_threads(2)  # the golden outputs were made with 2 threads

ARCHS = ["generator_imagebert", "generator_uvit"]
# fp32 logits (magnitudes up to about 5) against the official ones: the CPU's fp32 kernels move them by
# under 1e-5 on an AMD Zen 4 and up to 1.3e-5 on an Intel Xeon with AMX (the U-ViT's sampling calls); a wrong layer
# moves them by orders of magnitude more.
LOGITS_ATOL = 2e-5


def _load(fx, name):
    d = fx / name
    gen = load_generator(d / "config.yaml", checkpoint=d / "generator.bin")
    inputs = torch.load(d / "inputs.pt", weights_only=True)
    expected = torch.load(d / "expected.pt", weights_only=True)
    settings = json.loads((d / "expected.json").read_text())["expected"]
    return gen, inputs, expected, settings


def _generate_kwargs(settings, i):
    kw = dict(settings[f"gen{i}_ids"]["kwargs"])
    kw["num_steps"] = kw.pop("num_sample_steps")
    return kw


def _logits(gen, tokens, labels):
    with torch.no_grad():
        return gen(tokens, labels)


@pytest.mark.parametrize("name", ARCHS)
def test_logits_match_official(official_tiny, name):
    gen, x, e, _ = _load(official_tiny, name)
    ids, labels = x["input_ids"], x["condition"]
    null = torch.full_like(labels, gen.null_label)
    torch.testing.assert_close(_logits(gen, ids, labels), e["logits_cond"], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(_logits(gen, ids, null), e["logits_uncond"], atol=LOGITS_ATOL, rtol=0)
    both = _logits(gen, torch.cat([ids, ids]), torch.cat([labels, null]))  # the sampler's doubled batch
    torch.testing.assert_close(both, torch.cat([e["logits_cond"], e["logits_uncond"]]), atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("i", [0, 1, 2])
@pytest.mark.parametrize("name", ARCHS)
def test_generate_matches_official_exactly(official_tiny, name, i):
    gen, x, e, settings = _load(official_tiny, name)
    calls = []
    forward = gen.forward

    def recording_forward(tokens, labels):
        out = forward(tokens, labels)
        calls.append((tokens.clone(), labels.clone(), out.clone()))
        return out

    gen.forward = recording_forward
    tokens = sample_tokens(gen, x["condition"], **_generate_kwargs(settings, i))
    assert torch.equal(tokens, e[f"gen{i}_ids"])

    # Step by step: our doubled-batch call = the official conditional call, then its unconditional one.
    b = len(x["condition"])
    ours = [(t[j : j + b], lab[j : j + b], out[j : j + b]) for t, lab, out in calls for j in range(0, len(t), b)]
    drop = e[f"gen{i}_trace_cond_drop_prob"]
    assert len(ours) == len(drop)
    for k, (t, lab, out) in enumerate(ours):
        assert torch.equal(t, e[f"gen{i}_trace_input_ids"][k]), f"call {k}"
        assert bool((lab == gen.null_label).all()) == bool(drop[k] == 1.0), f"call {k}"
        torch.testing.assert_close(out, e[f"gen{i}_trace_logits"][k], atol=LOGITS_ATOL, rtol=0)


def test_guidance_quirks_are_needed(official_tiny, monkeypatch):
    """Both official guidance quirks change the released samples (here: the fixture's ids)."""
    gen, x, e, settings = _load(official_tiny, "generator_imagebert")
    original = official.guidance_scale_at

    def linear_on_time(step, num_steps, **kw):  # the scale for step i taken *before* the update
        if kw["guidance_decay"] == "linear":
            return (step + 1) / num_steps * kw["guidance_scale"]
        return original(step, num_steps, **kw)

    monkeypatch.setattr(official, "guidance_scale_at", linear_on_time)
    assert not torch.equal(sample_tokens(gen, x["condition"], **_generate_kwargs(settings, 0)), e["gen0_ids"])
    monkeypatch.setattr(official, "guidance_scale_at", original)

    monkeypatch.setattr(official, "apply_guidance", lambda c, u, s, d: u + (c - u) * s)  # textbook CFG everywhere
    assert not torch.equal(sample_tokens(gen, x["condition"], **_generate_kwargs(settings, 1)), e["gen1_ids"])


def test_token_type_embedding_is_needed(official_tiny):
    gen, x, e, _ = _load(official_tiny, "generator_imagebert")
    with torch.no_grad():
        gen.type_embed.zero_()
    assert (_logits(gen, x["input_ids"], x["condition"]) - e["logits_cond"]).abs().max() > 1e-3


@pytest.mark.parametrize("name, n_official, n_ours", [("generator_imagebert", 39, 31), ("generator_uvit", 41, 41)])
def test_conversion_covers_every_key(official_tiny, name, n_official, n_ours):
    d = official_tiny / name
    manifest = json.loads((d / "manifest.json").read_text())
    gen = load_generator(d / "config.yaml")
    expected = official.official_key_shapes(gen.config)
    assert expected == {k["key"]: tuple(k["shape"]) for k in manifest["keys"]}
    assert len(expected) == n_official == manifest["num_tensors"]

    state = torch.load(d / "generator.bin", weights_only=True)
    ours = official.state_dict_from_official(state, gen.config)
    assert len(ours) == n_ours and set(ours) == set(gen.state_dict())
    # Every official weight survives (fused or renamed), except BERT's unused token-type row 1.
    dropped = 64 if name == "generator_imagebert" else 0
    assert sum(v.numel() for v in ours.values()) == manifest["num_elements"] - dropped


def test_old_transformers_buffers_are_ignored(official_tiny, tmp_path):
    d = official_tiny / "generator_imagebert"
    state = torch.load(d / "generator.bin", weights_only=True)
    state["model.embeddings.position_ids"] = torch.arange(9).unsqueeze(0)
    torch.save(state, tmp_path / "old.bin")
    old = load_generator(d / "config.yaml", checkpoint=tmp_path / "old.bin").state_dict()
    new = load_generator(d / "config.yaml", checkpoint=d / "generator.bin").state_dict()
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in new)


def test_strict_loading_names_the_problem(official_tiny, tmp_path):
    d = official_tiny / "generator_imagebert"
    state = torch.load(d / "generator.bin", weights_only=True)

    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes((d / "generator.bin").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_generator(d / "config.yaml", checkpoint=truncated)

    missing = dict(state)
    del missing["model.lm_head.bias"]
    torch.save(missing, tmp_path / "missing.bin")
    with pytest.raises(CheckpointError, match=r"missing key.*model\.lm_head\.bias"):
        load_generator(d / "config.yaml", checkpoint=tmp_path / "missing.bin")

    wrong = dict(state)
    wrong["model.encoder.layer.1.intermediate.dense.weight"] = torch.zeros(96, 64)
    torch.save(wrong, tmp_path / "wrong.bin")
    with pytest.raises(CheckpointError, match=r"shape mismatch.*layer\.1\.intermediate\.dense\.weight \(96, 64\)"):
        load_generator(d / "config.yaml", checkpoint=tmp_path / "wrong.bin")

    with pytest.raises(CheckpointError, match=r"shape mismatch.*word_embeddings"):
        load_generator("maskgit_l32", checkpoint=d / "generator.bin")

    with pytest.raises(CheckpointError, match="missing key"):  # a UViT file for an ImageBert config
        load_generator(d / "config.yaml", checkpoint=official_tiny / "generator_uvit" / "generator.bin")

    # Our own format: the key named is ours.
    gen = load_generator(d / "config.yaml", checkpoint=d / "generator.bin")
    sd = gen.state_dict()
    del sd["blocks.0.attn.qkv.bias"]
    save_model_file(tmp_path / "ours.safetensors", kind="generator", config=gen.config, state_dict=sd)
    with pytest.raises(CheckpointError, match=r"missing key.*blocks\.0\.attn\.qkv\.bias"):
        load_generator(tmp_path / "ours.safetensors")

    with pytest.raises(CheckpointError, match="bare state dict"):
        load_generator(d / "generator.bin")
    with pytest.raises(CheckpointError, match="unknown generator spec"):
        load_generator("maskgit_xxl")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_generator(d / "config.yaml", checkpoint=tmp_path / "evil.bin")


@pytest.mark.parametrize("name", ARCHS)
def test_hf_directory(official_tiny, tmp_path, name):
    """config.json as the official PyTorchModelHubMixin writes it: the OmegaConf dump, unresolved."""
    d = official_tiny / name
    config = read_config_file(d / "config.yaml")
    config["model"]["generator"]["image_seq_len"] = "${model.vq_model.num_latent_tokens}"
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = torch.load(d / "generator.bin", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    gen = load_generator(tmp_path)
    x, e = torch.load(d / "inputs.pt", weights_only=True), torch.load(d / "expected.pt", weights_only=True)
    torch.testing.assert_close(_logits(gen, x["input_ids"], x["condition"]), e["logits_cond"], atol=LOGITS_ATOL, rtol=0)
    assert gen.sampling["guidance_decay"] == "linear" and gen.sampling["softmax_temperature_annealing"] is True


def test_hf_repo_id_from_local_cache(official_tiny, tmp_path, monkeypatch):
    d = official_tiny / "generator_uvit"
    repo = tmp_path / "hub" / "models--someone--generator_tiny"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snap / "config.json").write_text(json.dumps(read_config_file(d / "config.yaml")))
    shutil.copy(d / "generator.bin", snap / "pytorch_model.bin")
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    gen = load_generator("someone/generator_tiny")
    x, e = torch.load(d / "inputs.pt", weights_only=True), torch.load(d / "expected.pt", weights_only=True)
    torch.testing.assert_close(_logits(gen, x["input_ids"], x["condition"]), e["logits_cond"], atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("name", ARCHS)
def test_our_model_file_round_trip(official_tiny, tmp_path, name):
    gen, x, e, _ = _load(official_tiny, name)
    sampling = {**gen.sampling, "randomize_temperature": 1.5}
    path = tmp_path / "generator.safetensors"
    extra = {"sampling": sampling}
    save_model_file(path, kind="generator", config=gen.config, state_dict=gen.state_dict(), extra=extra)
    again = load_generator(path)
    assert again.config == gen.config and again.sampling == sampling and not again.training
    assert torch.equal(_logits(again, x["input_ids"], x["condition"]), _logits(gen, x["input_ids"], x["condition"]))
    rebuilt = build_generator(again.config)
    assert set(rebuilt.state_dict()) == set(gen.state_dict())

    other = "maskgit_b64" if name == "generator_imagebert" else "maskgit_l32"
    with pytest.raises(CheckpointError, match="another generator config"):
        load_generator(other, checkpoint=path)


def test_presets_have_released_shapes():
    with torch.device("meta"):
        l32, b64, s128 = (load_generator(n, random_weights=True) for n in ("maskgit_l32", "maskgit_b64", "uvit_s128"))
    for gen, seq_len in ((l32, 32), (b64, 64)):
        assert type(gen).__name__ == "ImageBert" and len(gen.blocks) == 24
        assert gen.token_embed.weight.shape == (4096 + 1000 + 2, 768)
        assert gen.pos_embed.shape == (1, seq_len + 1, 768)
        assert gen.blocks[0].mlp.fc1.weight.shape == (3072, 768) and gen.blocks[0].attn.num_heads == 16
        assert gen.head.weight.shape == (4096, 768)
        assert (gen.mask_id, gen.null_label, gen.codebook_size, gen.num_classes) == (4096, 1000, 4096, 1000)
    assert sum(p.numel() for p in l32.parameters()) == 177_201_664
    assert type(s128).__name__ == "UViT" and len(s128.in_blocks) == len(s128.out_blocks) == 10
    assert s128.pos_embed.shape == (1, 129, 1024) and s128.in_blocks[0].mlp.fc1.weight.shape == (4096, 1024)
    assert s128.in_blocks[0].attn.qkv.bias is None and s128.out_blocks[0].skip_proj.weight.shape == (1024, 2048)
    assert sum(p.numel() for p in s128.parameters()) == 294_990_848
    for name, gen in (("maskgit_l32", l32), ("maskgit_b64", b64), ("uvit_s128", s128)):
        shapes = official.official_key_shapes(gen.config)
        n_official = sum(math.prod(s) for s in shapes.values())
        unused = 768 if gen.config["arch"] == "imagebert" else 0  # BERT token-type row 1
        assert n_official - unused == sum(p.numel() for p in gen.parameters()), name


def test_official_infer_configs_give_the_presets():
    """configs/infer/TiTok/titok_{l32,b64,s128}.yaml (generator and vq_model parts, as released)."""

    def infer_config(tokens, model_type, hidden, layers, inter, temp, scale, decay, steps):
        return {
            "model": {
                "vq_model": {"codebook_size": 4096, "num_latent_tokens": tokens},
                "generator": {
                    "model_type": model_type, "hidden_size": hidden, "num_hidden_layers": layers,
                    "num_attention_heads": 16, "intermediate_size": inter, "dropout": 0.1, "attn_drop": 0.1,
                    "num_steps": steps, "class_label_dropout": 0.1,
                    "image_seq_len": "${model.vq_model.num_latent_tokens}", "condition_num_classes": 1000,
                    "randomize_temperature": temp, "guidance_scale": scale, "guidance_decay": decay,
                },
            },
        }

    released = {
        "maskgit_l32": infer_config(32, "ViT", 768, 24, 3072, 9.5, 4.5, "linear", 8),
        "maskgit_b64": infer_config(64, "ViT", 768, 24, 3072, 11.0, 3.0, "linear", 8),
        "uvit_s128": infer_config(128, "UViT", 1024, 20, 4096, 2.8, 6.9, "power-cosine", 64),
    }
    for name, cfg in released.items():
        config, sampling = official.config_from_official(cfg)
        assert config == PRESETS[name]["model"], name
        assert sampling == PRESETS[name]["sampling"], name
