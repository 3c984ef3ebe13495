"""Every experiment config composes and sizes its model, without training and without memory.

Each YAML under conf/tokenizer/experiment and conf/generator/experiment (found by listing the
folders, so a new one is covered as soon as it exists) is composed as ``python -m
tokenizer.train experiment=X`` / ``python -m generator.train experiment=X`` would compose it,
with dummies for its mandatory (``???``) values; its model is then sized by the training code's
own ``resolve_model`` (tokenizer.presets, generator.presets) and built on torch's meta device (full size, no weights allocated):

* tokenizer experiments give the TiTok they ask for (``titok_small`` at the data's size, the
  ``titok_l32`` preset, or the architecture of the file a fine-tuning run starts from);
* generator experiments give a generator that fits their tokenizer's tokens (codebook, number of
  tokens) and their data's classes, e.g. ``imagenet_l32`` -> maskgit_l32;
* the shipped demo models can be rebuilt: the stages titok_demo_stage1..5 chain (each starts from
  the previous one's output file), the last one and maskgit_demo size exactly to the shipped files,
  and scripts/rebuild_demo_models.sh runs them in order.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import re
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from safetensors import safe_open

from generator import build_generator
from generator import official as generator_official
from generator.assets import shipped_path as shipped_generator
from generator.presets import PRESETS as GENERATOR_PRESETS
from generator.presets import resolve_model as resolve_generator
from generator.sampler import sampling_overrides
from sampling.classes import IMAGENET_NUM_CLASSES
from titok_core.builtin import NATIVE_SIZE
from titok_core.checkpoints import EXTRA_KEY
from titok_core.demo_shapes import CLASS_NAMES as DEMO_CLASSES
from titok_core.runs import builtin_for, default_run_dir
from tokenizer import build_tokenizer, load_tokenizer
from tokenizer import official as tokenizer_official
from tokenizer.assets import shipped_path as shipped_tokenizer
from tokenizer.presets import PRESETS as TOKENIZER_PRESETS
from tokenizer.presets import resolve_model as resolve_tokenizer
from tokenizer.presets import titok_small
from tokenizer.train_data import first_image_side

from conftest import FIXTURES, REPO

CONF = REPO / "conf"
TOKENIZER_EXPERIMENTS = sorted(p.stem for p in (CONF / "tokenizer" / "experiment").glob("*.yaml"))
GENERATOR_EXPERIMENTS = sorted(p.stem for p in (CONF / "generator" / "experiment").glob("*.yaml"))
STAGES = sorted((e for e in TOKENIZER_EXPERIMENTS if re.fullmatch(r"titok_demo_stage\d+", e)),
                key=lambda e: int(e.rpartition("stage")[2]))

DUMMY_IMAGE_SIDE = 28  # the dummy image folder's images: titok_small sizes itself to 32 for them
DUMMY_CLASSES = 10     # classes of the dummy image folder (ImageNet experiments: ImageNet's 1000)


# ---------------------------------------------------------------------------------------------
# Composing, as the entry points do, with dummies for what a user must give.


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """A dummy image folder <root>/{train,val}/<class>/*.png of 28x28 images."""
    root = tmp_path_factory.mktemp("images")
    for split in ("train", "val"):
        for c in range(2):
            (root / split / f"class{c}").mkdir(parents=True)
            Image.new("RGB", (DUMMY_IMAGE_SIDE, DUMMY_IMAGE_SIDE), (40 * c, 90, 200)).save(
                root / split / f"class{c}" / "0.png")
    return root


def _small_tokenizer(compose, image_folder: Path) -> str:
    """The file tokenizer.train experiment=small writes for the dummy data: what its documented
    follow-ups (small_decoder's finetune.init_from, generator.train experiment=small's
    tokenizer.spec) start from."""
    return output_file("tokenizer", experiment(compose, "tokenizer", "small", image_folder))


def _dummy(compose, key: str, image_folder: Path) -> str:
    if key == "data.root":
        return str(image_folder)
    if key == "proxy.vqgan_checkpoint":
        return "maskgit-vqgan-imagenet-f16-256.bin"
    if key == "tokenizer.spec":
        return _small_tokenizer(compose, image_folder)
    pytest.fail(f"no dummy for the mandatory value {key}: add one to tests/test_experiments.py")


def _stage1_tokenizer(size: str):
    """What a stage-2 experiment starts from: the file its stage-1 experiment writes for the dummy data."""
    def override(compose, folder: Path) -> list[str]:
        stage1 = experiment(compose, "tokenizer", f"imagenet_{size}_stage1", folder)
        return [f"finetune.init_from={output_file('tokenizer', stage1)}"]
    return override


# Values a config leaves null or mandatory that its run requires (the config's comment says so).
REQUIRED = {
    ("tokenizer", "small_decoder"): lambda compose, folder: [f"finetune.init_from={_small_tokenizer(compose, folder)}"],
    **{("tokenizer", f"imagenet_{size}_stage2"): _stage1_tokenizer(size) for size in ("l32", "b64", "s128")},
}


def experiment(compose, entry: str, name: str, image_folder: Path) -> DictConfig:
    """``python -m <entry>.train experiment=<name>``'s config, mandatory values filled with dummies."""
    overrides = [f"experiment={name}"]
    if (entry, name) in REQUIRED:
        overrides += REQUIRED[(entry, name)](compose, image_folder)
    cfg = compose(f"{entry}.train", overrides)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        cfg = compose(f"{entry}.train", overrides + [f"{k}={_dummy(compose, k, image_folder)}" for k in missing])
    assert not OmegaConf.missing_keys(cfg)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    return cfg


def builtin_of(cfg: DictConfig) -> str | None:
    """The built-in dataset a run writes (data.builtin, or the one whose default place data.root is)."""
    return builtin_for(cfg.data.root, cfg.data.builtin)


def run_dir_of(entry: str, cfg: DictConfig) -> Path:
    """Where ``python -m <entry>.train`` puts this run (run_dir, else the default the entry point picks)."""
    return Path(cfg.run_dir or default_run_dir(package=entry, name=cfg.name, root=cfg.data.root, builtin=builtin_of(cfg)))


def output_file(entry: str, cfg: DictConfig) -> str:
    """The model file a run of this config writes (tokenizer.train / generator.train)."""
    return str(run_dir_of(entry, cfg) / f"{entry}.safetensors")


@pytest.fixture(scope="module")
def composed(compose, image_folder) -> dict[tuple[str, str], DictConfig]:
    """Every experiment, composed once: (entry, name) -> config."""
    configs = {("tokenizer", n): experiment(compose, "tokenizer", n, image_folder) for n in TOKENIZER_EXPERIMENTS}
    configs.update({("generator", n): experiment(compose, "generator", n, image_folder) for n in GENERATOR_EXPERIMENTS})
    return configs


@pytest.fixture(scope="module")
def outputs(composed) -> dict[str, str]:
    """Tokenizer output file -> the tokenizer experiment that writes it."""
    return {output_file("tokenizer", cfg): name for (entry, name), cfg in composed.items() if entry == "tokenizer"}


# ---------------------------------------------------------------------------------------------
# Sizing, with the training code's own functions.


def on_meta(build, config):
    """``build(config)`` at full size with no memory behind its parameters."""
    with torch.device("meta"):
        model = build(config)
    assert all(p.is_meta for p in model.parameters())
    return model


def _shipped_shapes(path: Path) -> dict[str, tuple]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _shipped_extra(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[EXTRA_KEY])


def tokenizer_config(spec: str, composed, outputs):
    """The config of the tokenizer ``spec`` names, as the training entry points get it: a tokenizer
    experiment's output file is followed to the experiment that writes it; anything else (a
    shipped model, a preset, ...) is what load_tokenizer makes of it."""
    if spec in outputs:
        return tokenizer_config_of(composed[("tokenizer", outputs[spec])], composed, outputs)
    if spec.startswith("runs/"):
        pytest.fail(f"{spec} is written by no tokenizer experiment")
    if spec not in _LOADED:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")  # weights: not needed
            # the config only: a released preset's weights (given by tokenizer.checkpoint) are not needed
            _LOADED[spec] = load_tokenizer(spec, random_weights=True).config
    return _LOADED[spec]


_LOADED: dict = {}


def tokenizer_config_of(cfg: DictConfig, composed, outputs):
    """What tokenizer.train builds for ``cfg``: the start file's architecture when fine-tuning,
    else its ``resolve_model`` of ``model`` at the data's image size."""
    if cfg.finetune.init_from:
        return tokenizer_config(str(cfg.finetune.init_from), composed, outputs)
    assert not cfg.finetune.freeze_encoder, "finetune.freeze_encoder needs finetune.init_from"
    model = OmegaConf.to_container(cfg.model, resolve=True)
    side = None
    if model.get("image_size") == "auto":
        if builtin_of(cfg):
            side = NATIVE_SIZE[builtin_of(cfg)]
        else:
            side = first_image_side(Path(cfg.data.root) / cfg.data.split)
    return resolve_tokenizer(model, image_side=side)


def num_classes(cfg: DictConfig, name: str) -> int:
    """The classes of the experiment's data: a built-in dataset's, else the dummy folder's (ImageNet's)."""
    if builtin_of(cfg) == "demo":
        return len(DEMO_CLASSES)
    if builtin_of(cfg) == "digits":
        return 10
    return IMAGENET_NUM_CLASSES if name.startswith("imagenet") else DUMMY_CLASSES


def generator_of(cfg: DictConfig, name: str, composed, outputs):
    """(tokenizer, generator, sampling settings) as generator.train sizes them, both on meta."""
    tok = on_meta(build_tokenizer, tokenizer_config(str(cfg.tokenizer.spec), composed, outputs))
    assert tok.codebook_size, f"{name}: a MaskGIT generator needs a tokenizer with discrete tokens"
    model = OmegaConf.to_container(cfg.model, resolve=True)
    config, sampling = resolve_generator(
        model, codebook_size=tok.codebook_size, num_tokens=tok.num_tokens, num_classes=num_classes(cfg, name))
    sampling.update(sampling_overrides(cfg.sampling))
    return tok, on_meta(build_generator, config), sampling


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _shapes(model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Tokenizer experiments.


def test_experiments_are_found():
    assert {"demo", "small", "digits", "imagenet_l32_stage1", *OFFICIAL_RECIPES} <= set(TOKENIZER_EXPERIMENTS)
    assert {"demo", "small", "digits", "imagenet_l32", "maskgit_demo"} <= set(GENERATOR_EXPERIMENTS)


@pytest.mark.parametrize("entry", ["tokenizer", "generator"])
def test_every_experiment_has_its_own_run_dir(entry, composed):
    runs = {}
    for (e, name), cfg in composed.items():
        if e == entry:
            assert cfg.name == name, f"{entry} experiment {name} names its run {cfg.name}"
            run_dir = run_dir_of(entry, cfg)
            assert run_dir not in runs, f"{name} and {runs[run_dir]} share {run_dir} (one would resume the other)"
            runs[run_dir] = name


@pytest.mark.parametrize("name", TOKENIZER_EXPERIMENTS)
def test_tokenizer_experiment_builds_its_model(name, composed, outputs):
    cfg = composed[("tokenizer", name)]
    config = tokenizer_config_of(cfg, composed, outputs)
    tok = on_meta(build_tokenizer, config)
    assert tok.num_tokens > 0 and tok.image_size > 0 and _params(tok) > 0

    # The TiTok the config asks for.
    if name == "imagenet_l32_stage1":
        assert (tok.image_size, tok.num_tokens, tok.codebook_size) == (256, 32, 4096)
        assert _shapes(tok) == _shapes(on_meta(build_tokenizer, TOKENIZER_PRESETS["titok_l32"]))
        # Every tensor of the official TiTok-L-32 (as recorded from the official code), no more.
        rec = _official_tokenizer_shapes()["titok_l32"]["shapes"]
        official_sd = {k: torch.empty(s, device="meta") for k, s in rec.items()}
        converted = tokenizer_official.state_dict_from_official(official_sd, TOKENIZER_PRESETS["titok_l32"])
        assert _shapes(tok) == {k: tuple(v.shape) for k, v in converted.items()}
    elif not cfg.finetune.init_from and cfg.model.preset == "titok_small":
        side = {"demo": 64, "digits": 32}.get(builtin_of(cfg), 32)  # the dummy folder's 28 px -> 32
        assert (tok.image_size, tok.num_tokens, tok.codebook_size) == (side, 32, 1000)
        assert _shapes(tok) == _shapes(on_meta(build_tokenizer, titok_small(side)))


# The official training recipes: experiment -> (the official YAML at 942a96f it follows, under
# configs/training/, and the released tokenizer it trains). The single-stage releases have no YAML of
# their own: their loss, optimisers and schedules are those of the TA-TiTok files (which differ in size only).
OFFICIAL_RECIPES = {
    "imagenet_l32_stage1": ("TiTok/stage1/titok_l32.yaml", "titok_l32"),
    "imagenet_b64_stage1": ("TiTok/stage1/titok_b64.yaml", "titok_b64"),
    "imagenet_s128_stage1": ("TiTok/stage1/titok_s128.yaml", "titok_s128"),
    "imagenet_l32_stage2": ("TiTok/stage2/titok_l32.yaml", "titok_l32"),
    "imagenet_b64_stage2": ("TiTok/stage2/titok_b64.yaml", "titok_b64"),
    "imagenet_s128_stage2": ("TiTok/stage2/titok_s128.yaml", "titok_s128"),
    "imagenet_bl64_vq8k": ("TA-TiTok/tatitok_bl64_vq.yaml", "titok_bl64_vq8k"),
    "imagenet_bl128_vq8k": ("TA-TiTok/tatitok_bl128_vq.yaml", "titok_bl128_vq8k"),
    "imagenet_sl256_vq8k": ("TA-TiTok/tatitok_bl128_vq.yaml", "titok_sl256_vq8k"),
    "imagenet_ll32_vae_c16": ("TA-TiTok/tatitok_bl32_vae.yaml", "titok_ll32_vae_c16"),
    "imagenet_bl64_vae_c16": ("TA-TiTok/tatitok_bl64_vae.yaml", "titok_bl64_vae_c16"),
    "imagenet_bl128_vae_c16": ("TA-TiTok/tatitok_bl64_vae.yaml", "titok_bl128_vae_c16"),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_RECIPES))
def test_official_recipes_train_the_released_tokenizers(name, composed, outputs):
    """Each recipe sizes to its released tokenizer and has the official file's values (copied here
    from the YAML it names): batch, both optimisers, schedules, EMA, clipping, start steps, weights."""
    official_file, preset = OFFICIAL_RECIPES[name]
    cfg = composed[("tokenizer", name)]
    assert official_file.rpartition("/")[2] in (CONF / "tokenizer" / "experiment" / f"{name}.yaml").read_text() \
        or name.endswith("stage1")
    tok = on_meta(build_tokenizer, tokenizer_config_of(cfg, composed, outputs))
    assert tok.config == on_meta(build_tokenizer, TOKENIZER_PRESETS[preset]).config
    assert _shapes(tok) == _shapes(on_meta(build_tokenizer, TOKENIZER_PRESETS[preset]))
    stage = name.rpartition("_")[2]
    single = stage not in ("stage1", "stage2")
    # Every recipe: AdamW lr 1e-4 -> 1e-5 (cosine), weight decay 1e-4, EMA 0.999, clipping at 1.0, 32 per
    # device and a global batch of 256 (the official README's 8 processes), bf16 for the official fp16.
    assert (cfg.optim.lr, cfg.optim.end_lr, cfg.optim.weight_decay, cfg.optim.ema, cfg.optim.ema_decay) == (
        1e-4, 1e-5, 1e-4, True, 0.999)
    assert (cfg.batch_size, cfg.trainer.global_batch, cfg.trainer.gradient_clip_val) == (32, 256, 1.0)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.codebook.revive_every_n_steps == 0
    want = {  # stage -> (betas, warm-up, steps)
        "stage1": ([0.9, 0.99], 10_000, 1_000_000), "stage2": ([0.9, 0.999], 5_000, 500_000),
    }.get(stage, ([0.9, 0.999], 10_000, 650_000))
    assert (list(cfg.optim.betas), cfg.optim.warmup_steps, cfg.trainer.max_steps) == want
    if stage == "stage1":
        assert cfg.loss.gan.weight == 0 and cfg.loss.perceptual_weight == 0 and tok.decoder_output == "proxy_codes"
        return
    gan = cfg.loss.gan
    assert (gan.lr, gan.factor, gan.lecam_weight, gan.lecam_ema_decay, gan.channels, gan.layers) == (
        1e-4, 1.0, 0.001, 0.999, 128, 3)
    assert gan.schedule_processes == 8 and cfg.loss.reconstruction == "l2" and cfg.loss.reconstruction_weight == 1
    assert cfg.loss.gradient_weight == 0 and cfg.loss.rate_weight == 0 and not cfg.loss.random_weights
    if stage == "stage2":
        assert (gan.weight, gan.start_step, cfg.loss.perceptual, cfg.loss.perceptual_weight) == (
            0.01, 20_000, "convnext_s", 0.1)
        assert cfg.finetune.freeze_encoder and cfg.loss.quantizer_weight == 0 and not cfg.proxy.vqgan_checkpoint
        assert cfg.finetune.init_from == output_file(  # the chain: stage 1's output file
            "tokenizer", composed[("tokenizer", name.replace("stage2", "stage1"))])
    else:
        assert single and not cfg.finetune.init_from and not cfg.finetune.freeze_encoder
        assert (gan.weight, gan.start_step, cfg.loss.perceptual, cfg.loss.perceptual_weight) == (
            0.1, 200_000, "lpips-convnext_s-1.0-0.1", 1.1)
        if tok.is_discrete:
            assert cfg.codebook.clustering_vq and cfg.loss.quantizer_weight == 1 and tok.config.commitment_cost == 0.25
        else:
            assert not cfg.codebook.clustering_vq and (cfg.loss.kl_weight, cfg.loss.logvar_init) == (1e-6, 0.0)


@pytest.mark.parametrize("name", sorted(n for n in OFFICIAL_RECIPES if not n.endswith("stage1")))
def test_official_recipes_build_their_training_module(name, composed, outputs):
    """The training module accepts each recipe's loss, optimiser and codebook groups (at full size, on
    the meta device; perceptual networks untrained): its discriminator, perceptual loss and codebook aids."""
    from tokenizer.lightning_module import TiTokModule

    cfg = composed[("tokenizer", name)]
    groups = {g: OmegaConf.to_container(cfg[g], resolve=True) for g in ("loss", "optim", "codebook")}
    groups["loss"]["random_weights"] = True  # no pretrained weights offline; the recipe's own is false
    config = tokenizer_config_of(cfg, composed, outputs)
    with torch.device("meta"):
        module = TiTokModule(model_config=config.to_dict() if hasattr(config, "to_dict") else config,
                             freeze_encoder=bool(cfg.finetune.freeze_encoder), max_steps=cfg.trainer.max_steps,
                             vqgan_checkpoint=cfg.proxy.vqgan_checkpoint, **groups)
    assert module.discriminator is not None and module.loss_module.lecam_weight == 0.001
    assert module.loss_module.perceptual_loss.name == cfg.loss.perceptual
    assert (module.clustering is not None) == bool(cfg.codebook.clustering_vq)
    assert module.usage is None  # no dead-code revival in the official recipes
    trainable = {n.partition(".")[0] for n, p in module.model.named_parameters() if p.requires_grad}
    if name.endswith("stage2"):  # the official stage 2 trains the ViT decoder, the proxy codebook, the VQGAN decoder
        assert trainable == {"decoder", "proxy_codebook", "pixel_decoder"}
    else:
        assert {"encoder", "latent_tokens", "decoder"} <= trainable


def test_the_demo_recipes_size_to_the_shipped_tokenizer(composed, outputs):
    shipped = _shipped_shapes(shipped_tokenizer("titok_demo"))
    for name in ("demo", "demo_decoder", "demo_rate", *STAGES):
        tok = on_meta(build_tokenizer, tokenizer_config_of(composed[("tokenizer", name)], composed, outputs))
        assert (tok.image_size, tok.num_tokens, tok.codebook_size) == (64, 32, 1000), name
        assert _shapes(tok) == shipped, name


def _official_tokenizer_shapes() -> dict:
    with gzip.open(FIXTURES / "official_titok_shapes.json.gz", "rt") as f:
        return json.load(f)["models"]


# ---------------------------------------------------------------------------------------------
# Generator experiments.


@pytest.mark.parametrize("name", GENERATOR_EXPERIMENTS)
def test_generator_experiment_builds_its_model(name, composed, outputs):
    cfg = composed[("generator", name)]
    tok, gen, sampling = generator_of(cfg, name, composed, outputs)
    assert (gen.codebook_size, gen.num_tokens) == (tok.codebook_size, tok.num_tokens)
    assert gen.num_classes == num_classes(cfg, name)
    assert {"num_steps", "guidance_scale", "randomize_temperature"} <= set(sampling), name

    if cfg.model.preset:  # a released recipe: its preset, sized to its tokenizer
        preset = GENERATOR_PRESETS[cfg.model.preset]
        assert cfg.tokenizer.spec == preset["tokenizer"]
        assert gen.config == preset["model"]
        shapes = generator_official.official_key_shapes(gen.config)
        unused = 768 if gen.config["arch"] == "imagebert" else 0  # BERT's second token-type row
        assert sum(math.prod(s) for s in shapes.values()) - unused == _params(gen)


@pytest.mark.parametrize("name, arch, tokens, params", [
    ("imagenet_l32", "imagebert", 32, 177_201_664),
    ("imagenet_b64", "imagebert", 64, None),
    ("imagenet_s128", "uvit", 128, 294_990_848),
])
def test_imagenet_recipes(name, arch, tokens, params, composed, outputs):
    tok, gen, _ = generator_of(composed[("generator", name)], name, composed, outputs)
    assert gen.config["arch"] == arch
    assert (gen.num_classes, gen.codebook_size, gen.num_tokens, tok.image_size) == (1000, 4096, tokens, 256)
    if params is not None:
        assert _params(gen) == params


# ---------------------------------------------------------------------------------------------
# The shipped demo models, rebuilt from configs.


def test_demo_stages_chain(composed):
    assert [int(s.rpartition("stage")[2]) for s in STAGES] == [1, 2, 3, 4, 5]
    cfgs = [composed[("tokenizer", s)] for s in STAGES]
    assert not cfgs[0].finetune.init_from and not cfgs[0].finetune.freeze_encoder
    for previous, stage, cfg in zip(STAGES, STAGES[1:], cfgs[1:]):
        assert cfg.finetune.init_from == output_file("tokenizer", composed[("tokenizer", previous)]), stage
    gen = composed[("generator", "maskgit_demo")]
    assert gen.tokenizer.spec == output_file("tokenizer", cfgs[-1])
    # What each stage did (docs/demo_models.md): a time budget, which weights train, which loss terms.
    assert [c.trainer.max_time for c in cfgs] == ["00:00:50:00", "00:00:25:00", "00:00:30:00", "00:00:25:00",
                                                  "00:00:35:00"]
    assert [bool(c.finetune.freeze_encoder) for c in cfgs] == [False, True, False, True, True]
    assert [c.loss.rate_weight for c in cfgs] == [0.0, 0.0, 1e-3, 0.0, 0.0]
    assert [c.loss.gradient_weight for c in cfgs] == [0.0, 0.0, 0.0, 0.1, 0.1]
    assert [c.optim.lr for c in cfgs] == [1e-3, 3e-4, 5e-4, 3e-4, 3e-4]
    assert all(builtin_of(c) == "demo" and c.data.root == "data/demo_shapes" for c in cfgs)
    assert gen.trainer.max_time == "00:00:45:00" and builtin_of(gen) == "demo"
    assert [output_file("tokenizer", c) for c in cfgs] == [
        f"runs/tokenizer/titok_demo_stage{n}/tokenizer.safetensors" for n in range(1, 6)]  # as the script copies them
    assert output_file("generator", gen) == "runs/generator/maskgit_demo/generator.safetensors"


def test_the_small_recipe_trains_rate_term_tokens_and_samples_for_them(composed):
    # docs/small_data_recipe.md, "Round 3": the rate term from the start in experiment=small (and the
    # digits, which build on it); none in the demo's stage 1 (the shipped tokenizer adds it in stage 3) or in a
    # decoder-only stage (its encoder is frozen); the generator's sampling starts where the fits went.
    rates = {name: composed[("tokenizer", name)].loss.rate_weight
             for name in ("small", "digits", "demo", "small_decoder", "demo_decoder")}
    assert rates == {"small": 1e-3, "digits": 1e-3, "demo": 0.0, "small_decoder": 0.0, "demo_decoder": 0.0}
    # "Rounds 4 and 5": the term grows over the first 250 steps (at full weight at once, the demo shapes' codes
    # collapsed; over 1000 steps the digits' and Fashion-MNIST's samples came out further from their reconstructions).
    warmups = {name: composed[("tokenizer", name)].loss.rate_warmup_steps
               for name in ("small", "digits", "demo", "small_decoder", "titok_demo_stage3")}
    assert warmups == {"small": 250, "digits": 250, "demo": 0, "small_decoder": 0, "titok_demo_stage3": 0}
    for name in ("small", "digits"):
        sampling = composed[("generator", name)].sampling
        assert (sampling.guidance_scale, sampling.randomize_temperature) == (3.0, 2.5), name
        # "Round 6": the generator's learning rate grows over 250 steps (over 50, a Fashion-MNIST run stayed
        # on the tokens' per-position frequencies for good); its peak stays 2e-3.
        optim = composed[("generator", name)].optim
        assert (optim.lr, optim.warmup_steps) == (2e-3, 250), name


def test_maskgit_demo_config_sizes_to_the_shipped_generator(composed, outputs):
    path = shipped_generator("maskgit_demo")
    extra = _shipped_extra(path)
    tok, gen, sampling = generator_of(composed[("generator", "maskgit_demo")], "maskgit_demo", composed, outputs)
    assert _shapes(gen) == _shipped_shapes(path)
    assert sampling == extra["sampling"]  # the settings the shipped file records
    assert len(extra["classes"]) == gen.num_classes
    assert extra["data"]["root"] == composed[("generator", "maskgit_demo")].data.root
    # the quick start (experiment=demo) trains experiment=small's network, 128 wide since "Round 12" of
    # docs/small_data_recipe.md, on the same kind of tokens; the shipped file keeps the 256 it was trained at
    quick_tok, quick, _ = generator_of(composed[("generator", "demo")], "demo", composed, outputs)
    assert quick_tok.codebook_size == tok.codebook_size and quick_tok.num_tokens == tok.num_tokens
    assert (quick.head.in_features, gen.head.in_features) == (128, 256)
    assert all(composed[("generator", n)].model == composed[("generator", "small")].model for n in ("demo", "digits"))


def _script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "rebuild_demo_models.sh"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=60)


def _rebuild(*args: str, cwd: Path) -> list[str]:
    out = _script("--dry-run", *args, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line.startswith("+ ")]


def test_rebuild_script_runs_the_stages_in_order(tmp_path):
    plain = _rebuild(cwd=tmp_path)
    runs = [re.search(r"-m (\S+) experiment=(\S+)", line).groups() for line in plain]
    assert runs == [("tokenizer.train", s) for s in STAGES] + [("generator.train", "maskgit_demo")]

    installed = _rebuild("--install", "--", "trainer.accelerator=cpu", cwd=tmp_path)
    assert all(line.endswith("trainer.accelerator=cpu") for line in installed[: len(runs)])
    ships = installed[len(runs):]
    assert len(ships) == 2
    assert "runs/tokenizer/titok_demo_stage5/tokenizer.safetensors" in ships[0]
    assert ships[0].endswith("tokenizer/assets/titok_demo.safetensors")
    assert "runs/generator/maskgit_demo/generator.safetensors" in ships[1]
    assert str(REPO / "generator" / "assets" / "maskgit_demo.safetensors") in ships[1]


def test_rebuild_script_skips_finished_runs(tmp_path):
    done = tmp_path / "runs" / "tokenizer" / "titok_demo_stage1" / "tokenizer.safetensors"
    done.parent.mkdir(parents=True)
    done.write_bytes(b"")
    out = _script("--dry-run", cwd=tmp_path)
    assert "titok_demo_stage1: runs/tokenizer/titok_demo_stage1/tokenizer.safetensors exists, skipped" in out.stdout
    assert "experiment=titok_demo_stage1" not in out.stdout and "experiment=titok_demo_stage2" in out.stdout


def test_rebuild_script_help_and_bad_option(tmp_path):
    out = _script("--help", cwd=tmp_path)
    assert out.returncode == 0 and "--install" in out.stdout
    bad = _script("--nope", cwd=tmp_path)
    assert bad.returncode != 0 and "--nope" in bad.stderr


def test_rebuild_script_installs_the_pair(tmp_path):
    """--install on finished runs (a copy of the script, so the real shipped files stay as they are)."""
    import shutil
    import sys

    from titok_core.checkpoints import read_model_extra, save_model_file

    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "rebuild_demo_models.sh", repo / "scripts")
    for d in ("tokenizer/assets", "generator/assets"):
        (repo / d).mkdir(parents=True)
    work = tmp_path / "work"
    for n in range(1, 6):
        out = work / "runs" / "tokenizer" / f"titok_demo_stage{n}" / "tokenizer.safetensors"
        out.parent.mkdir(parents=True)
        out.write_bytes(f"stage {n}".encode())
    gen = work / "runs" / "generator" / "maskgit_demo" / "generator.safetensors"
    gen.parent.mkdir(parents=True)
    extra = {"tokenizer": {"spec": "runs/tokenizer/titok_demo_stage5/tokenizer.safetensors", "checkpoint": None},
             "global_step": 3}
    save_model_file(gen, kind="generator", config={"hidden_size": 4}, state_dict={"w": torch.ones(2)}, extra=extra)

    out = subprocess.run(["bash", str(repo / "scripts" / "rebuild_demo_models.sh"), "--install"], cwd=work,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "+ " + sys.executable + " -m" not in out.stdout  # every run was done already
    assert (repo / "tokenizer" / "assets" / "titok_demo.safetensors").read_bytes() == b"stage 5"
    shipped = repo / "generator" / "assets" / "maskgit_demo.safetensors"
    assert read_model_extra(shipped) == {**extra, "tokenizer": {"spec": "titok_demo", "checkpoint": None}}
