"""One name for each setting: TiTok's one quantiser switch (vq | fsq | vae), TiTokConfig, the
renames num_latent_tokens -> num_tokens and seq_len -> num_tokens, and old files read as before."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from generator import build_generator, load_generator
from generator.assets import shipped_path as shipped_generator
from generator.cache import tokenizer_fingerprint
from titok_core.checkpoints import CONFIG_KEY, CheckpointError, read_config_file, read_model_extra, save_model_file
from tokenizer import TiTok, TiTokConfig, build_tokenizer, load_tokenizer, official, require_discrete
from tokenizer.assets import shipped_path
from tokenizer.config import config_from_file

from commands import TINY_GENERATOR, TINY_TOKENIZER
from conftest import FIXTURES


def _metadata_config(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[CONFIG_KEY])


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------------- one quantiser switch


def test_one_switch_builds_vq_fsq_and_vae():
    vq = build_tokenizer(TINY_TOKENIZER)
    assert vq.quantizer == "vq" and vq.is_discrete and vq.codebook_size == 16
    assert vq.quantize.embedding.weight.shape == (16, 4)

    fsq = build_tokenizer({**TINY_TOKENIZER, "quantizer": "fsq", "fsq_levels": [5, 3]})
    assert fsq.quantizer == "fsq" and fsq.is_discrete
    assert (fsq.codebook_size, fsq.token_size) == (15, 2)  # both follow from the levels
    assert (fsq.config.codebook_size, fsq.config.token_size) == (15, 2)

    vae = build_tokenizer({**TINY_TOKENIZER, "quantizer": "vae"})
    assert vae.quantizer == "vae" and not vae.is_discrete
    assert vae.codebook_size is None and vae.config.codebook_size is None and vae.quantize is None
    assert not any(k.startswith("quantize.") for k in vae.state_dict())
    assert vae.encoder.proj_out.out_features == 2 * 4  # posterior mean and log-variance
    latents = vae.eval().encode(torch.rand(2, 3, 16, 16))
    assert latents.dtype == torch.float32 and latents.shape == (2, 4, 4)
    with pytest.raises(CheckpointError, match=r"^MaskGIT training needs a VQ tokenizer with discrete tokens; "):
        require_discrete(vae, "MaskGIT training")
    require_discrete(vq, "MaskGIT training")
    require_discrete(fsq, "MaskGIT training")


def test_fsq_together_with_vae_is_no_longer_expressible():
    # The old pair quantizer=fsq + quantize_mode=vae silently dropped FSQ; one switch has one value.
    with pytest.raises(CheckpointError) as exc:
        build_tokenizer({**TINY_TOKENIZER, "quantizer": "fsq", "fsq_levels": [5, 3], "quantize_mode": "vae"})
    assert _one_line(exc) == "quantize_mode was merged into quantizer: vq | fsq | vae"
    with pytest.raises(ValueError, match=r"^quantizer must be one of vq \| fsq \| vae, got 'lfq'$"):
        build_tokenizer({**TINY_TOKENIZER, "quantizer": "lfq"})
    with pytest.raises(ValueError, match="fsq_levels"):
        build_tokenizer({**TINY_TOKENIZER, "quantizer": "fsq"})


def test_official_quantize_mode_vae_is_translated():
    raw = read_config_file(FIXTURES / "official_vae_tiny" / "config.yaml")
    assert raw["model"]["vq_model"]["quantize_mode"] == "vae"  # the official key stays in official configs
    ours = official.config_from_official(raw)
    assert ours["quantizer"] == "vae" and "quantize_mode" not in ours
    assert ours["num_tokens"] == raw["model"]["vq_model"]["num_latent_tokens"] and "num_latent_tokens" not in ours
    tok = load_tokenizer(FIXTURES / "official_vae_tiny" / "config.yaml")
    assert tok.quantizer == "vae" and not tok.is_discrete and tok.codebook_size is None

    vq = official.config_from_official(read_config_file(FIXTURES / "official_vq8k_tiny" / "config.yaml"))
    assert vq["quantizer"] == "vq" and build_tokenizer(vq).is_discrete


# --------------------------------------------------------------------------- TiTokConfig


def test_titok_config_is_complete_canonical_and_plain_json():
    partial = build_tokenizer(TINY_TOKENIZER).config
    assert isinstance(partial, TiTokConfig) and partial.num_tokens == 4 and partial.use_l2_norm is True
    assert build_tokenizer(partial.to_dict()).config == partial  # every field: the same config again
    assert TiTok(partial).config is partial
    as_json = json.loads(json.dumps(partial.to_dict()))
    assert as_json == json.loads(json.dumps(dataclasses.asdict(partial)))
    assert TiTokConfig(**as_json) == partial  # lists from JSON come back as the same tuples
    fsq = TiTokConfig(quantizer="fsq", fsq_levels=[8, 5, 5, 5])
    assert fsq.fsq_levels == (8, 5, 5, 5) and fsq.codebook_size == 1000 and fsq.token_size == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        partial.num_tokens = 8


# --------------------------------------------------------------------------- old keys passed in


def test_an_old_key_passed_to_build_tokenizer_names_the_new_one():
    old = {k if k != "num_tokens" else "num_latent_tokens": v for k, v in TINY_TOKENIZER.items()}
    with pytest.raises(CheckpointError) as exc:
        build_tokenizer(old)
    assert _one_line(exc) == "num_latent_tokens was renamed num_tokens"
    with pytest.raises(CheckpointError) as exc:
        build_tokenizer({**TINY_TOKENIZER, "quantize_mode": "vq"})
    assert _one_line(exc) == "quantize_mode was merged into quantizer: vq | fsq | vae"
    with pytest.raises(CheckpointError) as exc:
        build_tokenizer({**TINY_TOKENIZER, "num_token": 4})
    assert _one_line(exc) == "unknown tokenizer config key(s): num_token"


def test_an_old_key_in_tokenizer_train_model_names_the_new_one():
    from tokenizer.presets import resolve_model

    with pytest.raises(CheckpointError) as exc:
        resolve_model({"preset": "titok_small", "num_latent_tokens": 16})
    assert _one_line(exc) == "num_latent_tokens was renamed num_tokens"
    with pytest.raises(CheckpointError) as exc:
        resolve_model({"preset": "titok_small", "quantize_mode": "vq"})
    assert "quantizer: vq | fsq | vae" in _one_line(exc)
    with pytest.raises(CheckpointError, match="unknown tokenizer model key"):
        resolve_model({"preset": "titok_small", "num_tokenz": 16})
    assert resolve_model({"preset": "titok_small", "num_tokens": 16})["num_tokens"] == 16
    assert resolve_model({**TINY_TOKENIZER, "quantizer": "vae"})["quantizer"] == "vae"  # VAE tokenizers train too


def test_an_old_key_passed_to_build_generator_names_the_new_one():
    assert build_generator(TINY_GENERATOR).num_tokens == 4
    old = {k if k != "num_tokens" else "seq_len": v for k, v in TINY_GENERATOR.items()}
    with pytest.raises(CheckpointError) as exc:
        build_generator(old)
    assert _one_line(exc) == "seq_len was renamed num_tokens"
    with pytest.raises(CheckpointError) as exc:
        build_generator({**TINY_GENERATOR, "num_token": 4})
    assert _one_line(exc) == "unknown generator config key(s): num_token"


# --------------------------------------------------------------------------- files: old ones read, new ones round-trip


def test_shipped_files_keep_their_old_metadata_and_still_load():
    tok_meta = _metadata_config(shipped_path("titok_demo"))
    gen_meta = _metadata_config(shipped_generator("maskgit_demo"))
    assert tok_meta["num_latent_tokens"] == 32 and "num_tokens" not in tok_meta  # the shipped file is not rewritten
    assert gen_meta["seq_len"] == 32 and "num_tokens" not in gen_meta

    tok = load_tokenizer("titok_demo")
    assert tok.config == config_from_file(tok_meta) and tok.config.num_tokens == tok.num_tokens == 32
    assert tok.config.quantizer == "fsq" and tok.is_discrete
    gen = load_generator("maskgit_demo")
    assert gen.config["num_tokens"] == gen.num_tokens == 32 and "seq_len" not in gen.config
    assert gen.num_tokens == tok.num_tokens and gen.codebook_size == tok.codebook_size


def test_a_tokenizer_saved_now_round_trips_with_the_same_fingerprint(tmp_path):
    tok = load_tokenizer("titok_demo")
    path = tmp_path / "tokenizer.safetensors"
    save_model_file(path, kind="tokenizer", config=tok.config.to_dict(), state_dict=tok.state_dict())
    meta = _metadata_config(path)
    assert meta == dataclasses.asdict(tok.config) | {"fsq_levels": [8, 5, 5, 5], "pixel_decoder_channel_mult": [1, 2, 2]}
    assert "num_tokens" in meta and "num_latent_tokens" not in meta and "quantize_mode" not in meta
    again = load_tokenizer(path)
    assert again.config == tok.config
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in tok.state_dict().items())
    # The cache fingerprint hashes the canonical config: old file, new file, same weights -> same caches.
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok)
    # A preset spec with our file as the checkpoint compares the complete configs.
    assert load_tokenizer("titok_small", checkpoint=path).config == tok.config


def test_a_user_file_with_old_keys_loads_with_a_spec(tmp_path):
    tok = build_tokenizer(TINY_TOKENIZER)
    old = {k if k != "num_tokens" else "num_latent_tokens": v for k, v in TINY_TOKENIZER.items()}
    path = tmp_path / "old.safetensors"
    save_model_file(path, kind="tokenizer", config=old, state_dict=tok.state_dict())
    assert load_tokenizer(path).config == tok.config
    (tmp_path / "spec").mkdir()
    (tmp_path / "spec" / "config.json").write_text(json.dumps(TINY_TOKENIZER))  # our own config.json
    assert load_tokenizer(tmp_path / "spec" / "config.json", checkpoint=path).config == tok.config
    (tmp_path / "spec" / "config.json").write_text(json.dumps({**old, "quantize_mode": "vq"}))  # and an old one
    assert load_tokenizer(tmp_path / "spec" / "config.json", checkpoint=path).config == tok.config
    (tmp_path / "spec" / "config.json").write_text(json.dumps({**TINY_TOKENIZER, "num_tokens": 8}))
    with pytest.raises(CheckpointError, match=r"was made for another tokenizer config \(differs in: num_tokens\)"):
        load_tokenizer(tmp_path / "spec" / "config.json", checkpoint=path)

    vae_old = {**old, "quantize_mode": "vae", "codebook_size": None}
    vae = build_tokenizer({**TINY_TOKENIZER, "quantizer": "vae"})
    save_model_file(tmp_path / "vae.safetensors", kind="tokenizer", config=vae_old, state_dict=vae.state_dict())
    loaded = load_tokenizer(tmp_path / "vae.safetensors")
    assert loaded.quantizer == "vae" and not loaded.is_discrete and loaded.config == vae.config


def test_a_generator_saved_now_round_trips_and_an_old_one_loads_with_a_spec(tmp_path, official_tiny):
    gen = load_generator("maskgit_demo")
    path = tmp_path / "generator.safetensors"
    save_model_file(path, kind="generator", config=gen.config, state_dict=gen.state_dict(),
                    extra=read_model_extra(shipped_generator("maskgit_demo")))
    meta = _metadata_config(path)
    assert meta["num_tokens"] == 32 and "seq_len" not in meta
    again = load_generator(path)
    assert again.config == gen.config and again.sampling == gen.sampling
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in gen.state_dict().items())

    d = official_tiny / "generator_imagebert"
    official_gen = load_generator(d / "config.yaml", checkpoint=d / "generator.bin")
    old = {k if k != "num_tokens" else "seq_len": v for k, v in official_gen.config.items()}
    save_model_file(tmp_path / "old.safetensors", kind="generator", config=old, state_dict=official_gen.state_dict())
    loaded = load_generator(d / "config.yaml", checkpoint=tmp_path / "old.safetensors")  # compared after translation
    assert loaded.config == official_gen.config and loaded.num_tokens == official_gen.num_tokens


# ---------------------------------------------------------------- nothing random unless asked


@pytest.mark.parametrize("preset, hub, file", [
    ("titok_l32", "yucornetto/tokenizer_titok_l32_imagenet", "tokenizer_titok_l32.bin"),
    ("titok_bl64_vae_c16", "yucornetto/tokenizer_titok_bl64_vae_c16_imagenet", "titok_bl64_vae_c16.bin"),
])
def test_a_released_tokenizer_without_weights_is_refused(preset, hub, file):
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(preset)
    message = str(info.value)
    assert "\n" not in message and preset in message and hub in message and f"tokenizer.checkpoint={file}" in message
    with torch.device("meta"):
        assert load_tokenizer(preset, random_weights=True).num_tokens > 0  # asked for: built untrained


def test_the_missing_weights_line_says_where_the_files_are():
    """The .bin of the L-32/B-64/S-128 models: in the one .bin repo (titok_core.checkpoints.BIN_REPO); the
    models' own repos hold config.json + model.safetensors (a spec). No random_weights hint: the
    commands that print this line mostly have no such option (eval.gfid adds it: test_cli)."""
    with pytest.raises(CheckpointError) as info:
        load_generator("uvit_s128")
    assert _one_line(info) == (
        "uvit_s128 is a released generator and no weights were given: pass generator.checkpoint=generator_titok_s128.bin "
        "(hf download fun-research/TiTok generator_titok_s128.bin) or generator.spec=yucornetto/generator_titok_s128_imagenet "
        "(its config.json and model.safetensors, fetched when online)")
    with pytest.raises(CheckpointError) as info:
        load_tokenizer("titok_sl256_vq8k")
    line = _one_line(info)
    assert "fun-research" not in line and "random_weights" not in line  # that .bin is not in the .bin repo
    assert "tokenizer.spec=yucornetto/tokenizer_titok_sl256_vq8k_imagenet" in line


def test_a_released_generator_without_weights_is_refused():
    with pytest.raises(CheckpointError, match="maskgit_l32 is a released generator and no weights were given: "
                                              "pass generator.checkpoint=generator_titok_l32.bin"):
        load_generator("maskgit_l32")
    assert load_tokenizer("titok_demo").source.startswith("shipped:")  # shipped models carry their weights
    demo, shipped = load_generator("maskgit_demo").state_dict(), load_file(shipped_generator("maskgit_demo"))
    assert demo.keys() == shipped.keys() and all(torch.equal(demo[k], shipped[k]) for k in demo)
