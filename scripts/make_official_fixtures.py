#!/usr/bin/env python
"""Regenerate the golden fixtures in tests/fixtures by running the OFFICIAL TiTok / MaskGIT code.

    python scripts/make_official_fixtures.py --official PATH/TO/1d-tokenizer [--out tests/fixtures]
                                             [--only official_tiny,official_training,official_vq8k_tiny,
                                                     official_vae_tiny,shapes]

PATH is a clone of github.com/bytedance/1d-tokenizer at the pinned commit
942a96fbdd873780179d1b78d5462911528bf8c8 (checked with ``git rev-parse HEAD``; anything else is
refused, and so are local changes under its ``modeling/``). Its code is imported from there at run
time; nothing of it is copied into this repository. Needs, besides this project's dependencies,
``transformers`` (the official ImageBert is a Hugging Face BertModel) for official_tiny, and
``requests`` and ``tqdm`` (imported by the official ``lpips.py``) for official_training;
``accelerate`` is replaced by an identity ``gather`` when missing (only the training-time clustering
VQ calls it, and on one process the real one is the identity too).

What it writes (the recipes of tests/fixtures/README.md and tests/fixtures/official_tiny/README.md):

* ``official_tiny/``: ``tokenizer/`` (modeling.titok.TiTok), ``generator_imagebert/``
  (modeling.maskgit.ImageBert) and ``generator_uvit/`` (modeling.maskgit.UViTBert), each with
  ``config.yaml``, the weights (``tokenizer.bin`` / ``generator.bin``), ``manifest.json``,
  ``inputs.pt``, ``expected.pt`` and ``expected.json``; and ``meta.json`` (its README.md is
  hand-written and left alone);
* ``official_tiny/`` (part official_training): the official training modules with tiny random
  networks and fixed inputs: ``discriminator/`` (NLayerDiscriminator: logits and gradients of four
  variants, their state-dict keys), ``perceptual/`` (LPIPS, ConvNeXt-S at 256 -> 224, the mix
  ``lpips-convnext_s-1.0-0.1``: values and input gradients), ``losses/`` (ReconstructionLoss_Stage2
  and ReconstructionLoss_Single_Stage, VQ and VAE: every loss term of both sides, the gradients of
  the reconstructions, the posterior and the discriminator, the LeCAM EMAs over a few steps) and
  ``clustering_vq/`` (the clustered codebook over a few steps); inputs and weights are rebuilt
  from seeds (:func:`training_images`, :func:`training_extras`, :func:`reinit_scaled_`), so only
  outputs are stored; the parts are recorded in ``official_tiny/meta.json``;
* ``official_vq8k_tiny/`` and ``official_vae_tiny/``: ``config.yaml``, ``tokenizer.bin``,
  ``inputs.pt``, ``expected.pt``; and ``fixtures_meta.json``;
* ``official_titok_shapes.json.gz``: the official config and state-dict shapes of the nine
  released tokenizers.

The official code is run unmodified on disk; four changes are made in memory, as the fixtures need:
E1 the packages ``modeling``, ``modeling.modules`` and ``modeling.quantizer`` are entered without
running their ``__init__.py`` (which import the training losses and their dependencies); E2 three
sizes are added to the ViT size tables of ``TiTokEncoder`` / ``TiTokDecoder`` (width, layers, heads):
``tiny`` = (64, 2, 4), ``micro`` = (24, 2, 2), ``mini`` = (32, 1, 4); E3 the MaskGIT-VQGAN pixel
decoder of ``TiTok`` takes ``hidden_channels`` from ``model.vq_model.pixel_decoder_hidden_channels``
(default 128, the official value); E4 (official_training) the perceptual networks are built with
``weights=None`` (torchvision's VGG16 and ConvNeXt-S) and ``LPIPS.load_pretrained`` does nothing, so
nothing is downloaded (their weights are re-randomised anyway). None of them changes a computation.

Random weights: the official initialisation under ``torch.manual_seed(seed)``, then re-randomised
(:func:`reinit_scaled_`) so that the tiny random networks are not degenerate. Run on CPU, float32,
``eval()``, ``torch.no_grad()`` (official_training: the training code paths, with gradients), with 2
threads (results move by ~3e-5 with other thread counts).
Before a file is overwritten, its tensors are compared with the new ones and the result printed.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import math
import platform
import subprocess
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path

PINNED_COMMIT = "942a96fbdd873780179d1b78d5462911528bf8c8"
REPO = Path(__file__).resolve().parents[1]
PARTS = ("official_tiny", "official_training", "official_vq8k_tiny", "official_vae_tiny", "shapes")
PHOTO = "assets/ILSVRC2012_val_00008636.png"
RELEASED = ("titok_l32", "titok_b64", "titok_s128", "titok_bl64_vq8k", "titok_bl128_vq8k", "titok_sl256_vq8k",
            "titok_ll32_vae_c16", "titok_bl64_vae_c16", "titok_bl128_vae_c16")

# E2: (width, layers, heads) of the ViT sizes the fixtures add to the official size tables.
EXTRA_VIT_SIZES = {"tiny": (64, 2, 4), "micro": (24, 2, 2), "mini": (32, 1, 4)}
# Parameters that keep the official initialisation when the weights are re-randomised.
KEPT_TITOK = [
    "latent_tokens", "encoder.class_embedding", "encoder.positional_embedding",
    "encoder.latent_token_positional_embedding", "decoder.class_embedding", "decoder.positional_embedding",
    "decoder.mask_token", "decoder.latent_token_positional_embedding",
]
QK_GAIN = 3.0
MANIFEST_NOTE = ("sha256 of each tensor's raw little-endian bytes (C-contiguous); state_dict_sha256 = sha256 over "
                 "key + per-tensor sha256 in order")

# official_tiny (tests/fixtures/official_tiny/README.md)
TINY_BASE_SEED = 1000          # tokenizer 1000, generator_imagebert 1001, generator_uvit 1002
TINY_REINIT_OFFSET = 7         # the re-randomisation draws from torch.Generator().manual_seed(seed + 7)
TINY_INPUT_OFFSET = 100        # the generators' inputs from torch.Generator().manual_seed(seed + 100)
TINY_GENERATE = [
    dict(guidance_scale=4.5, guidance_decay="linear", guidance_scale_pow=3.0, randomize_temperature=0.0,
         softmax_temperature_annealing=True, num_sample_steps=8),
    dict(guidance_scale=3.0, guidance_decay="constant", guidance_scale_pow=3.0, randomize_temperature=0.0,
         softmax_temperature_annealing=False, num_sample_steps=8),
    dict(guidance_scale=6.9, guidance_decay="power-cosine", guidance_scale_pow=3.0, randomize_temperature=0.0,
         softmax_temperature_annealing=True, num_sample_steps=16),
]
# official_vq8k_tiny / official_vae_tiny (tests/fixtures/README.md); the re-randomisation draws
# from torch.Generator().manual_seed(seed).
SINGLE_STAGE_SEEDS = {"official_vq8k_tiny": 2035, "official_vae_tiny": 2029}
VAE_LOGVAR_GAIN = 15.0
# official_training (tests/fixtures/official_tiny/README.md): the official training modules at tiny
# sizes, under official_tiny/{discriminator,perceptual,losses,clustering_vq}.
TRAINING_SEEDS = {"discriminator": 3100, "lpips": 3200, "convnext": 3300, "inputs": 3400, "clustering_vq": 3500}
DISCRIMINATOR_CASES = {  # NLayerDiscriminator keyword arguments; "default" is the official one (128, 3 stages)
    "default": {},
    "blur3": {"hidden_channels": 32, "num_stages": 2, "blur_kernel_size": 3},
    "blur5": {"hidden_channels": 32, "num_stages": 2, "blur_kernel_size": 5},
    "avgpool": {"hidden_channels": 32, "num_stages": 2, "blur_resample": False},
}
DISCRIMINATOR_SIZE = 33  # odd, so that every stage pads unevenly
TRAINING_GRAD_HEAD = 16  # gradients are recorded as norms plus their first 16 elements
PERCEPTUAL_MIX = "lpips-convnext_s-1.0-0.1"
PERCEPTUAL_LARGE = 256  # ConvNeXt-S resizes it down to 224 (antialiased)
PERCEPTUAL_GRAD_STRIDE = 97
LOSS_GENERATOR_STEPS = (1, 2)  # discriminator_start is 2: the adversarial term off, then on
LOSS_DISCRIMINATOR_STEPS = (2, 3, 4, 5)
_LOSS_COMMON = {"discriminator_start": 2, "discriminator_factor": 1.0, "reconstruction_loss": "l2",
                "reconstruction_weight": 1.0, "lecam_regularization_weight": 0.001}
LOSS_CASES = {  # the official losses: groups (stage 2 and single-stage VQ as their configs; the VAE varied)
    "stage2": {**_LOSS_COMMON, "quantize_mode": "vq", "quantizer_weight": 0.0, "discriminator_weight": 0.01,
               "perceptual_loss": "convnext_s", "perceptual_weight": 0.1},
    "single_vq": {**_LOSS_COMMON, "quantize_mode": "vq", "quantizer_weight": 1.0, "discriminator_weight": 0.1,
                  "perceptual_loss": PERCEPTUAL_MIX, "perceptual_weight": 1.1},
    "single_vae": {**_LOSS_COMMON, "quantize_mode": "vae", "quantizer_weight": 1.0, "discriminator_weight": 0.1,
                   "discriminator_factor": 0.5, "reconstruction_loss": "l1", "perceptual_loss": "lpips",
                   "perceptual_weight": 1.1, "kl_weight": 1e-3, "logvar_init": 0.5},
}
CLUSTERING_CODES, CLUSTERING_DIM, CLUSTERING_STEPS = 32, 6, 4


# ---------------------------------------------------------------------------------------------
# The official checkout


class OfficialCheckoutError(SystemExit):
    """The checkout given with --official cannot be used (the message says why)."""


def check_checkout(path: str | Path) -> Path:
    """``path`` as a resolved Path if it is a git checkout of the official repository at the
    pinned commit with no local changes under modeling/; raises OfficialCheckoutError otherwise."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise OfficialCheckoutError(f"--official {path}: no such directory")

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True)

    try:
        head = git("rev-parse", "HEAD")
    except FileNotFoundError as exc:
        raise OfficialCheckoutError("git is needed to check the official checkout's commit") from exc
    if head.returncode != 0:
        raise OfficialCheckoutError(
            f"--official {path} is not a git checkout of github.com/bytedance/1d-tokenizer "
            f"(git rev-parse: {head.stderr.strip() or head.returncode})")
    commit = head.stdout.strip()
    if commit != PINNED_COMMIT:
        raise OfficialCheckoutError(
            f"--official {path} is at commit {commit}, not the pinned {PINNED_COMMIT}: "
            f"run git -C {path} checkout {PINNED_COMMIT}")
    changed = git("status", "--porcelain", "--", "modeling")
    if changed.returncode != 0 or changed.stdout.strip():
        raise OfficialCheckoutError(
            f"--official {path} has local changes under modeling/ (git status): the fixtures need the "
            "official code as committed")
    for rel in ("modeling/titok.py", "modeling/maskgit.py", "modeling/modules/blocks.py", PHOTO):
        if not (path / rel).is_file():
            raise OfficialCheckoutError(f"--official {path}: {rel} is missing")
    return path


def _package(name: str, directory: Path) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(directory)]
    module.__file__ = str(directory / "__init__.py")
    sys.modules[name] = module
    return module


def _load_with_edits(name: str, path: Path, edits: list[tuple[str, str, int]]) -> types.ModuleType:
    """Import ``path`` as module ``name`` with textual ``edits`` (old, new, expected count) in memory."""
    source = path.read_text(encoding="utf-8")
    for old, new, count in edits:
        found = source.count(old)
        if found != count:
            raise RuntimeError(f"{path}: expected {count} occurrence(s) of {old!r}, found {found}")
        source = source.replace(old, new)
    spec = importlib.util.spec_from_loader(name, loader=None, origin=str(path))
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path)
    sys.modules[name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


class Official:
    """The official modules, imported from the checkout with the in-memory edits E1-E3."""

    def __init__(self, path: Path):
        self.path = path
        for name in list(sys.modules):
            if name == "modeling" or name.startswith("modeling."):
                raise RuntimeError(f"a module named {name} is imported already; run this script on its own")
        sys.path.insert(0, str(path))
        # E1: enter the packages without their __init__ (the training losses and their imports).
        _package("modeling", path / "modeling")
        _package("modeling.modules", path / "modeling" / "modules")
        _package("modeling.quantizer", path / "modeling" / "quantizer")
        # E2: the extra ViT sizes, in both size tables of the encoder and the decoder.
        edits = []
        for index, large in enumerate(("1024", "24", "16")):
            extra = "".join(f' "{size}": {dims[index]},' for size, dims in EXTRA_VIT_SIZES.items())
            edits.append((f'"large": {large},\n', f'"large": {large},{extra}\n', 2))
        _load_with_edits("modeling.modules.blocks", path / "modeling" / "modules" / "blocks.py", edits)
        with self._accelerate_gather():
            import modeling.titok as titok  # noqa: E402  (from the checkout)
            from modeling.quantizer.quantizer import DiagonalGaussianDistribution

        self.titok = titok
        self.TiTok = titok.TiTok
        self.DiagonalGaussianDistribution = DiagonalGaussianDistribution
        self._pixel_decoder = titok.Pixel_Decoder
        self._maskgit = None
        self._training = None

    @staticmethod
    @contextmanager
    def _accelerate_gather():
        """The official quantiser imports ``accelerate.utils.operations.gather`` (used only by the
        training-time clustering VQ); without accelerate, an identity stands in while it is imported."""
        try:
            import accelerate.utils.operations  # noqa: F401
        except ImportError:
            pass
        else:
            yield
            return
        names = ("accelerate", "accelerate.utils", "accelerate.utils.operations")
        stubs = {name: types.ModuleType(name) for name in names}
        stubs["accelerate.utils.operations"].gather = lambda tensor: tensor  # one process: the identity
        sys.modules.update(stubs)
        try:
            yield
        finally:  # gone again, so that nothing else (transformers) takes it for the real package
            for name in names:
                sys.modules.pop(name, None)

    @property
    def maskgit(self):
        if self._maskgit is None:
            import modeling.maskgit as maskgit  # noqa: E402  (needs transformers)

            self._maskgit = maskgit
        return self._maskgit

    @property
    def training(self) -> types.SimpleNamespace:
        """E4: the training modules (``modeling.modules.losses``, its discriminator and perceptual
        losses, the quantiser), imported so that nothing is downloaded: the perceptual networks
        are built with ``weights=None`` (torchvision's VGG16 and ConvNeXt-S) and
        ``LPIPS.load_pretrained`` does nothing; their weights are re-randomised afterwards."""
        if self._training is None:
            import modeling.modules.losses as losses  # noqa: E402  (from the checkout; imports the diffusion loss too)
            import modeling.modules.lpips as lpips_module
            import modeling.modules.perceptual_loss as perceptual_module
            import torchvision
            from modeling.modules.discriminator import NLayerDiscriminator
            from modeling.quantizer.quantizer import VectorQuantizer

            class RandomModels(types.SimpleNamespace):
                """torchvision.models, except that the two pretrained networks are built untrained."""

                def __getattr__(self, name):
                    return getattr(torchvision.models, name)

            no_download = RandomModels(vgg16=lambda weights=None, **kw: torchvision.models.vgg16(weights=None, **kw),
                                       convnext_small=lambda weights=None, **kw: torchvision.models.convnext_small(
                                           weights=None, **kw))
            lpips_module.models = no_download
            perceptual_module.models = no_download
            lpips_module.LPIPS.load_pretrained = lambda self: None
            self._training = types.SimpleNamespace(
                losses=losses, LPIPS=lpips_module.LPIPS, PerceptualLoss=perceptual_module.PerceptualLoss,
                NLayerDiscriminator=NLayerDiscriminator, VectorQuantizer=VectorQuantizer,
                DiagonalGaussianDistribution=self.DiagonalGaussianDistribution)
        return self._training

    @contextmanager
    def _pixel_decoder_channels(self, channels: int):
        """E3: the pixel decoder TiTok builds gets ``hidden_channels`` = channels."""
        original = self._pixel_decoder

        def build(conf):
            conf.hidden_channels = channels
            return original(conf)

        self.titok.Pixel_Decoder = build
        try:
            yield
        finally:
            self.titok.Pixel_Decoder = original

    def build_titok(self, config):
        """modeling.titok.TiTok(config) (an OmegaConf config), its pixel decoder sized by E3."""
        channels = config.model.vq_model.get("pixel_decoder_hidden_channels", 128)
        with self._pixel_decoder_channels(int(channels)):
            return self.TiTok(config)


# ---------------------------------------------------------------------------------------------
# Inputs


def synthetic_image_tiny(size: int):
    """official_tiny's ``synthetic_image(0)``: gradients, a red disc and a yellow-green rectangle.

    float32 [3, size, size] in [0, 1]; u, v = column and row positions in [0, 1] (numpy float64).
    """
    import numpy as np
    import torch

    n = np.linspace(0.0, 1.0, size)
    v, u = np.meshgrid(n, n, indexing="ij")
    img = np.stack([0.15 + 0.7 * u, 0.2 + 0.6 * v, 0.5 + 0.3 * np.sin(2 * np.pi * (u + v))])
    disc = (v - 0.4) ** 2 + (u - 0.35) ** 2 < 0.18 ** 2
    img[0][disc], img[1][disc] = 0.95, 0.25
    rect = (v > 0.6) & (v < 0.85) & (u > 0.55) & (u < 0.9)
    img[1][rect], img[2][rect] = 0.8, 0.1
    return torch.from_numpy(img.astype(np.float32))


def synthetic_image_single_stage(size: int):
    """The single-stage fixtures' synthetic image: an RGB gradient (u, v, 1 - u*v), a red
    rectangle and a blue disc. float32 [3, size, size] in [0, 1] (torch float32 grid)."""
    import torch

    n = torch.linspace(0.0, 1.0, size)
    v, u = torch.meshgrid(n, n, indexing="ij")
    img = torch.stack([u, v, 1 - u * v])
    disc = (v - 0.7) ** 2 + (u - 0.7) ** 2 < 0.03
    img[:, disc] = torch.tensor([0.1, 0.3, 0.95])[:, None]
    rect = (v > 0.25) & (v < 0.56) & (u > 0.18) & (u < 0.63)
    img[:, rect] = torch.tensor([0.9, 0.2, 0.1])[:, None]
    return img


def official_photo(official: Path, size: int):
    """The official demo photo resized to size x size (PIL bicubic), float32 [3, size, size] in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(official / PHOTO) as im:
        im = im.convert("RGB").resize((size, size), Image.BICUBIC)
        array = np.array(im, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def generator_inputs(seed: int, *, batch: int, num_tokens: int, codebook_size: int, num_classes: int):
    """input_ids [batch, num_tokens] (row 0 without masks, the last row all masks, the others ~40%)
    and ``batch`` distinct labels, from torch.Generator().manual_seed(seed)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, codebook_size, (batch, num_tokens), generator=g)
    mask = torch.rand(batch, num_tokens, generator=g) < 0.4
    mask[0], mask[-1] = False, True
    ids = torch.where(mask, codebook_size, ids)  # mask token id = codebook_size
    condition = torch.randperm(num_classes, generator=g)[:batch]
    return {"input_ids": ids, "condition": condition}


# ---------------------------------------------------------------------------------------------
# Weights


def reinit_scaled_(model, *, generator, keep=(), qk=None, unit_normal=(), extra_gain=None) -> dict:
    """Re-randomise ``model`` in place so that a tiny random network is not degenerate.

    Every parameter, in ``named_parameters`` order (``keep`` excepted: they keep the official init),
    gets a fresh standard normal draw z from ``generator`` (one ``torch.randn`` of its shape), set to
    ``0.1 z`` for biases, ``1 + 0.1 z`` for the other 1-D parameters (norm weights), ``z`` for the
    names in ``unit_normal`` (codebooks), and ``z / sqrt(fan_in)`` for every other matrix or kernel
    (fan_in = the product of all dimensions but the first). ``qk(name, tensor)`` returns the rows of
    the attention queries and keys (a slice) or None; those rows are then multiplied by QK_GAIN.
    ``extra_gain(name)`` -> (rows, gain) or None scales more rows afterwards. Returns what was done.
    """
    import torch

    scaled, notes = [], []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in keep:
                continue
            z = torch.randn(param.shape, generator=generator)
            if name.endswith("bias"):
                value = z * 0.1
            elif param.ndim == 1:
                value = 1 + z * 0.1
            elif name in unit_normal:
                value = z
            else:
                value = z / math.sqrt(math.prod(param.shape[1:]))
            rows = qk(name, param) if qk is not None else None
            if rows is not None:
                value[rows] *= QK_GAIN
                stop = "" if rows.stop is None else rows.stop
                scaled.append(name if rows == slice(None) else f"{name}[:{stop}]")
            if extra_gain is not None and extra_gain(name) is not None:
                extra_rows, gain = extra_gain(name)
                value[extra_rows] *= gain
                notes.append((name, extra_rows, gain))
            param.copy_(value)
    return {"qk_scaled": scaled, "extra": notes}


def _qk_mha(name, param):
    """nn.MultiheadAttention: the first 2 * width rows of in_proj_weight are the queries and keys."""
    return slice(0, 2 * param.shape[1]) if name.endswith("attn.in_proj_weight") else None


def _qk_bert(name, param):
    return slice(None) if name.endswith(("attention.self.query.weight", "attention.self.key.weight")) else None


def _qk_uvit(name, param):
    return slice(0, 2 * param.shape[1]) if name.endswith("attn.qkv.weight") else None


def tensor_sha256(t) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def manifest(state_dict, *, file: str, cls: str) -> dict:
    keys = [{"key": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "sha256": tensor_sha256(v)}
            for k, v in state_dict.items()]
    digest = hashlib.sha256()
    for entry in keys:
        digest.update(entry["key"].encode())
        digest.update(entry["sha256"].encode())
    return {"file": file, "class": cls, "num_tensors": len(keys),
            "num_elements": sum(math.prod(e["shape"]) for e in keys), "state_dict_sha256": digest.hexdigest(),
            "note": MANIFEST_NOTE, "keys": keys}


# ---------------------------------------------------------------------------------------------
# Writing


class Writer:
    """Writes files under ``root``, printing how each tensor file compares with the one it replaces."""

    def __init__(self, root: Path):
        self.root = root
        self.report: list[str] = []

    def _compare(self, path: Path, new: dict) -> str:
        import torch

        if not path.is_file():
            return "new"
        try:
            old = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            return f"replaces an unreadable file ({exc})"
        if set(old) != set(new):
            return f"keys differ: -{sorted(set(old) - set(new))} +{sorted(set(new) - set(old))}"
        worst = {}
        for key, value in new.items():
            if old[key].shape != value.shape or old[key].dtype != value.dtype:
                worst[key] = "shape/dtype"
            elif not torch.equal(old[key], value):
                diff = (old[key].double() - value.double()).abs().max().item()
                worst[key] = f"{diff:.2e}"
        if not worst:
            return "identical tensors"
        return "differs: " + ", ".join(f"{k} {d}" for k, d in worst.items())

    def tensors(self, rel: str, tensors: dict) -> None:
        import torch

        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        verdict = self._compare(path, tensors)
        torch.save(tensors, path)
        self.report.append(f"{rel}: {verdict}")
        print(f"  {rel}: {verdict}", flush=True)

    def text(self, rel: str, text: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        old = path.read_text(encoding="utf-8") if path.is_file() else None
        path.write_text(text, encoding="utf-8")
        verdict = "new" if old is None else ("unchanged" if old == text else "changed")
        self.report.append(f"{rel}: {verdict}")
        print(f"  {rel}: {verdict}", flush=True)

    def json(self, rel: str, obj, *, newline: bool = True) -> None:
        self.text(rel, json.dumps(obj, indent=1) + ("\n" if newline else ""))


def _described(tensors: dict, what: dict) -> dict:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), **what[k]}
            for k, v in tensors.items()}


def _versions(threads: int) -> dict:
    import importlib.metadata as md

    import torch

    versions = {"python": platform.python_version(), "platform": platform.platform(), "torch_num_threads": threads,
                "torch": torch.__version__}
    for dist in ("transformers", "torchvision", "numpy", "einops", "omegaconf", "huggingface_hub", "accelerate",
                 "safetensors", "pillow", "scikit-learn"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    return versions


# ---------------------------------------------------------------------------------------------
# official_tiny


def tiny_config(model_type: str) -> dict:
    return {
        "experiment": {"tokenizer_checkpoint": "tokenizer.bin", "generator_checkpoint": "generator.bin"},
        "model": {
            "vq_model": {
                "codebook_size": 64, "token_size": 12, "use_l2_norm": True, "commitment_cost": 0.25,
                "vit_enc_model_size": "tiny", "vit_dec_model_size": "tiny", "vit_enc_patch_size": 16,
                "vit_dec_patch_size": 16, "num_latent_tokens": 8, "finetune_decoder": True,
                "pixel_decoder_hidden_channels": 32,
            },
            "generator": {
                "model_type": model_type, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "intermediate_size": 128, "dropout": 0.1, "attn_drop": 0.1, "num_steps": 8,
                "class_label_dropout": 0.1, "image_seq_len": 8, "condition_num_classes": 10,
                "randomize_temperature": 0.0, "guidance_scale": 4.5, "guidance_decay": "linear",
            },
        },
        "dataset": {"preprocessing": {"crop_size": 64}},
    }


def _token_margin(z, codebook, use_l2_norm: bool):
    """2nd-best minus best codebook distance per token, computed as the official quantiser does."""
    import torch
    from einops import rearrange

    batch, _, _, num_tokens = z.shape
    flat = rearrange(z.float(), "b c h w -> (b h w) c")
    if use_l2_norm:
        flat = torch.nn.functional.normalize(flat, dim=-1)
        codebook = torch.nn.functional.normalize(codebook, dim=-1)
    d = torch.sum(flat ** 2, dim=1, keepdim=True) + torch.sum(codebook ** 2, dim=1) - 2 * torch.einsum(
        "bd,dn->bn", flat, codebook.T)
    best = d.topk(2, dim=1, largest=False).values
    return (best[:, 1] - best[:, 0]).reshape(batch, num_tokens)


@contextmanager
def _capture(module, *, inputs: list | None = None, outputs: list | None = None):
    handles = []
    if inputs is not None:
        handles.append(module.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone())))
    if outputs is not None:
        handles.append(module.register_forward_hook(lambda m, args, out: outputs.append(out.detach().clone())))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def tiny_tokenizer(off: Official, official: Path, writer: Writer, rel: str, seed: int) -> dict:
    import torch
    from omegaconf import OmegaConf

    started = time.time()
    config = OmegaConf.create(tiny_config("ViT"))
    torch.manual_seed(seed)
    model = off.build_titok(config).eval()
    done = reinit_scaled_(model, generator=torch.Generator().manual_seed(seed + TINY_REINIT_OFFSET),
                          keep=KEPT_TITOK, qk=_qk_mha, unit_normal=("pixel_quantize.embedding.weight",))
    build_s = time.time() - started

    started = time.time()
    size = config.dataset.preprocessing.crop_size
    x = torch.stack([synthetic_image_tiny(size), official_photo(official, size)])
    e = {}
    with torch.no_grad():
        e["z"] = model.encoder(pixel_values=x, latent_tokens=model.latent_tokens)
        z_quantized, result = model.encode(x)
        e["z_quantized"] = z_quantized
        e["tokens"] = result["min_encoding_indices"].reshape(x.shape[0], -1)
        for key in ("quantizer_loss", "commitment_loss", "codebook_loss"):
            e[key] = result[key].detach().reshape(())
        e["diag_token_distance_margin"] = _token_margin(e["z"], model.quantize.embedding.weight,
                                                        config.model.vq_model.use_l2_norm)
        e["decoder_logits"] = model.decoder(z_quantized)
        pixel_in: list = []
        with _capture(model.pixel_decoder, inputs=pixel_in):
            e["decoded"] = model(x)[0]
        e["pixel_decoder_input"] = pixel_in[-1]
        dec_in, dec_out, tok_pixel_in = [], [], []
        with _capture(model.decoder, inputs=dec_in, outputs=dec_out), _capture(model.pixel_decoder, inputs=tok_pixel_in):
            e["decoded_tokens"] = model.decode_tokens(e["tokens"])
        e["tokens_z_quantized"], e["tokens_decoder_logits"] = dec_in[-1], dec_out[-1]
        e["tokens_pixel_decoder_input"] = tok_pixel_in[-1]
    e = {k: v.detach().contiguous() for k, v in e.items()}
    run_s = time.time() - started

    what = {
        "z": "model.encoder(pixel_values=x, latent_tokens=model.latent_tokens): pre-quant latents [B, token_size, 1, N]",
        "z_quantized": "model.encode(x)[0]; straight-through value z_n + (q - z_n).detach() (z_n = l2-normalised z); "
                       "may differ from the codebook entry by ~1 ulp",
        "tokens": "model.encode(x)[1]['min_encoding_indices'].reshape(B, N)",
        "quantizer_loss": "model.encode(x)[1]['quantizer_loss'] (multiplied by 0 by TiTok.encode when finetune_decoder)",
        "commitment_loss": "model.encode(x)[1]['commitment_loss'] (multiplied by 0 by TiTok.encode when finetune_decoder)",
        "codebook_loss": "model.encode(x)[1]['codebook_loss'] (multiplied by 0 by TiTok.encode when finetune_decoder)",
        "diag_token_distance_margin": "diagnostic: 2nd-best minus best codebook distance per token",
        "decoder_logits": "model.decoder(z_quantized): TiTokDecoder alone; legacy: logits over the 1024 MaskGIT-VQGAN "
                          "proxy codes (before softmax) [B,1024,g,g]; non-legacy: RGB [B,3,H,W]",
        "decoded": "model(x)[0] = decode(encode(x)[0]), unclamped",
        "pixel_decoder_input": "forward path: einsum('nchw,cd->ndhw', decoder_logits.softmax(1), "
                               "pixel_quantize.embedding.weight), captured by hook",
        "decoded_tokens": "model.decode_tokens(tokens), unclamped (the generator->image path)",
        "tokens_z_quantized": "decode_tokens path: input of model.decoder (l2-normalised codebook rows) [B,C,1,N]",
        "tokens_decoder_logits": "decode_tokens path: output of model.decoder",
        "tokens_pixel_decoder_input": "decode_tokens path: input of model.pixel_decoder",
    }
    inputs = {"x": x}
    inputs_what = {"x": {"what": "float32 RGB in [0,1], NCHW", "images": [
        "synthetic_image(0) (gradients + shapes)", f"official:{PHOTO}, PIL BICUBIC resize to {size}x{size}"]}}
    _write_part(writer, rel, config, model, "tokenizer.bin", "modeling.titok.TiTok", inputs, inputs_what, e, what)
    return {"seed": seed, "init": _init_record(done, KEPT_TITOK), "build_s": round(build_s, 2), "run_s": round(run_s, 2)}


def tiny_generator(off: Official, writer: Writer, rel: str, seed: int, model_type: str) -> dict:
    import torch
    from omegaconf import OmegaConf

    started = time.time()
    config = OmegaConf.create(tiny_config(model_type))
    cls = off.maskgit.ImageBert if model_type == "ViT" else off.maskgit.UViTBert
    torch.manual_seed(seed)
    model = cls(config).eval()
    keep = ["pos_embed"] if model_type == "UViT" else []
    done = reinit_scaled_(model, generator=torch.Generator().manual_seed(seed + TINY_REINIT_OFFSET), keep=keep,
                          qk=_qk_bert if model_type == "ViT" else _qk_uvit)
    build_s = time.time() - started

    started = time.time()
    g = config.model.generator
    inputs = generator_inputs(seed + TINY_INPUT_OFFSET, batch=4, num_tokens=g.image_seq_len,
                              codebook_size=config.model.vq_model.codebook_size, num_classes=g.condition_num_classes)
    ids, condition = inputs["input_ids"], inputs["condition"]
    e, what = {}, {}
    with torch.no_grad():
        e["logits_cond"] = model(ids, condition, cond_drop_prob=0.0)
        e["logits_uncond"] = model(ids, condition, cond_drop_prob=1.0)
    what["logits_cond"] = {"what": "model(input_ids, condition, cond_drop_prob=0.0) [B,N,codebook_size]"}
    what["logits_uncond"] = {"what": "model(input_ids, condition, cond_drop_prob=1.0): every label replaced by the "
                                     "drop label codebook_size + 1 + condition_num_classes"}
    forward = model.forward
    for i, kwargs in enumerate(TINY_GENERATE):
        calls = []

        def traced(input_ids=None, condition=None, cond_drop_prob=0.1):
            out = forward(input_ids, condition, cond_drop_prob=cond_drop_prob)
            calls.append((input_ids.detach().clone(), float(cond_drop_prob), out.detach().clone()))
            return out

        model.forward = traced
        try:
            with torch.no_grad():
                e[f"gen{i}_ids"] = model.generate(condition, **kwargs)
        finally:
            del model.forward
        e[f"gen{i}_trace_input_ids"] = torch.stack([c[0] for c in calls])
        e[f"gen{i}_trace_cond_drop_prob"] = torch.tensor([c[1] for c in calls], dtype=torch.float32)
        e[f"gen{i}_trace_logits"] = torch.stack([c[2] for c in calls])
        what[f"gen{i}_ids"] = {"what": "model.generate(condition, **kwargs) [B,N]", "kwargs": kwargs}
        what[f"gen{i}_trace_input_ids"] = {
            "what": "ids passed to forward() at every forward call inside generate, in call order [calls,B,N] "
                    "(cond and uncond calls of a step see the same ids)", "kwargs": kwargs}
        what[f"gen{i}_trace_cond_drop_prob"] = {"what": "cond_drop_prob of each forward call (0=cond, 1=uncond)",
                                                "kwargs": kwargs}
        what[f"gen{i}_trace_logits"] = {
            "what": "forward() output of every call inside generate [calls,B,N,codebook_size]", "kwargs": kwargs}
    e = {k: v.detach().contiguous() for k, v in e.items()}
    run_s = time.time() - started

    inputs_what = {
        "input_ids": {"what": "int64 token ids; mask_token_id = codebook_size = "
                              f"{config.model.vq_model.codebook_size}; row 0 has no mask, last row is fully masked"},
        "condition": {"what": "int64 distinct class labels in [0, condition_num_classes); also the condition of every "
                              "generate() call"},
    }
    name = "modeling.maskgit.ImageBert" if model_type == "ViT" else "modeling.maskgit.UViTBert"
    _write_part(writer, rel, config, model, "generator.bin", name, inputs, inputs_what, e,
                {k: (v if isinstance(v, dict) else {"what": v}) for k, v in what.items()}, plain_what=False)
    record = {"seed": seed, "init": _init_record(done, keep), "build_s": round(build_s, 2), "run_s": round(run_s, 2)}
    if model_type == "ViT":
        record["bert_attn_implementation"] = getattr(model.model.config, "_attn_implementation", None)
    return record


def _init_record(done: dict, keep) -> dict:
    return {"scheme": "scaled", "qk_gain": QK_GAIN, "qk_scaled": done["qk_scaled"], "kept_official_init": list(keep)}


def _write_part(writer: Writer, rel: str, config, model, weights_name: str, cls: str, inputs: dict, inputs_what: dict,
                expected: dict, what: dict, *, plain_what: bool = True) -> None:
    from omegaconf import OmegaConf

    state_dict = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    writer.text(f"{rel}/config.yaml", OmegaConf.to_yaml(config, resolve=True))
    writer.tensors(f"{rel}/{weights_name}", state_dict)
    writer.json(f"{rel}/manifest.json", manifest(state_dict, file=weights_name, cls=cls))
    writer.tensors(f"{rel}/inputs.pt", inputs)
    writer.tensors(f"{rel}/expected.pt", expected)
    what = {k: {"what": v} for k, v in what.items()} if plain_what else what
    writer.json(f"{rel}/expected.json", {"inputs": _described(inputs, inputs_what),
                                         "expected": _described(expected, what)})


def make_official_tiny(off: Official, official: Path, writer: Writer, argv: list[str], threads: int) -> None:
    started = time.time()
    meta_path = writer.root / "official_tiny" / "meta.json"
    old_meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    old_parts = old_meta.get("parts", {})  # the official_training parts stay
    parts = {}
    print("official_tiny/tokenizer", flush=True)
    parts["tokenizer"] = tiny_tokenizer(off, official, writer, "official_tiny/tokenizer", TINY_BASE_SEED)
    print("official_tiny/generator_imagebert", flush=True)
    parts["generator_imagebert"] = tiny_generator(off, writer, "official_tiny/generator_imagebert",
                                                  TINY_BASE_SEED + 1, "ViT")
    print("official_tiny/generator_uvit", flush=True)
    parts["generator_uvit"] = tiny_generator(off, writer, "official_tiny/generator_uvit", TINY_BASE_SEED + 2, "UViT")
    meta = {
        "script": "scripts/make_official_fixtures.py",
        "argv": argv,
        "official_path": str(official),
        "official_commit": PINNED_COMMIT,
        "official_edits": "in memory, nothing written to the checkout (see the script's docstring): E1 packages "
                          "entered without their __init__, E2 'tiny'/'micro'/'mini' ViT size entries, E3 configurable "
                          "pixel-decoder hidden_channels (default 128)",
        "init": f"official init under torch.manual_seed(seed), then reinit_scaled_ with "
                f"torch.Generator().manual_seed(seed + {TINY_REINIT_OFFSET}) (see the docstring of reinit_scaled_)",
        "inputs": f"generators: torch.Generator().manual_seed(seed + {TINY_INPUT_OFFSET}) (generator_inputs)",
        "device": "cpu",
        "dtype": "float32",
        "mode": "eval(), torch.no_grad()",
        "versions": _versions(threads),
        "parts": {**{k: v for k, v in old_parts.items() if v.get("script_part") == "official_training"},
                  **{f"official_tiny/{k}": v for k, v in parts.items()}},
        "total_s": round(time.time() - started, 2),
        "case": "official_tiny",
        "case_settings": {"seed": TINY_BASE_SEED, "num_latent_tokens": 8, "is_legacy": None, "finetune_decoder": True,
                          "tok_batch": 2, "gen_batch": 4, "photo": "official_asset"},
        "base_seed": TINY_BASE_SEED,
        "generate_settings": TINY_GENERATE,
    }
    if "official_training" in old_meta:
        meta["official_training"] = old_meta["official_training"]
    writer.json("official_tiny/meta.json", meta)


# ---------------------------------------------------------------------------------------------
# official_vq8k_tiny, official_vae_tiny


def single_stage_config(case: str) -> dict:
    sizes = {"vit_enc_model_size": "micro", "vit_dec_model_size": "mini", "vit_enc_patch_size": 8,
             "vit_dec_patch_size": 8, "num_latent_tokens": 8, "finetune_decoder": False, "is_legacy": False}
    if case == "official_vq8k_tiny":
        vq = {"codebook_size": 256, "token_size": 16, "use_l2_norm": False, "commitment_cost": 0.25, **sizes}
    else:
        vq = {"quantize_mode": "vae", "token_size": 16, **sizes}
    return {"model": {"vq_model": vq}, "dataset": {"preprocessing": {"crop_size": 32}}}


def make_single_stage(off: Official, official: Path, writer: Writer, case: str) -> dict:
    import torch
    from omegaconf import OmegaConf

    print(case, flush=True)
    seed = SINGLE_STAGE_SEEDS[case]
    raw = single_stage_config(case)
    config = OmegaConf.create(raw)
    vae = case == "official_vae_tiny"
    torch.manual_seed(seed)
    model = off.build_titok(config).eval()
    token_size = config.model.vq_model.token_size

    def logvar_gain(name):
        return (slice(token_size, None), VAE_LOGVAR_GAIN) if vae and name.startswith("encoder.conv_out.") else None

    done = reinit_scaled_(model, generator=torch.Generator().manual_seed(seed), keep=KEPT_TITOK, qk=_qk_mha,
                          unit_normal=("quantize.embedding.weight",), extra_gain=logvar_gain)
    size = config.dataset.preprocessing.crop_size
    x = torch.stack([synthetic_image_single_stage(size), official_photo(official, size)])
    e = {}
    with torch.no_grad():
        z = model.encoder(pixel_values=x, latent_tokens=model.latent_tokens)
        e["z"] = z
        if vae:
            posterior = off.DiagonalGaussianDistribution(z)
            raw_logvar = torch.chunk(z.float(), 2, dim=1)[1]
            e["mean"], e["std"], e["logvar_clamped"] = posterior.mean, posterior.std, posterior.logvar
            e["decoded_mean"] = model.decode_tokens(posterior.mean)
            torch.manual_seed(7)
            e["sample_seed7"] = posterior.sample()
            e["decoded_sample_seed7"] = model.decode_tokens(e["sample_seed7"])
            e["diag_logvar_outside_clamp"] = torch.stack([(raw_logvar > 20).sum(), (raw_logvar < -30).sum()])
        else:
            z_quantized, result = model.encode(x)
            e["z_quantized"] = z_quantized
            e["tokens"] = result["min_encoding_indices"].reshape(x.shape[0], -1)
            e["decoded"] = model(x)[0]
            e["decoded_tokens"] = model.decode_tokens(e["tokens"])
            e["diag_token_distance_margin"] = _token_margin(z, model.quantize.embedding.weight,
                                                            config.model.vq_model.use_l2_norm)
    e = {k: v.detach().contiguous() for k, v in e.items()}
    state_dict = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    writer.text(f"{case}/config.yaml", OmegaConf.to_yaml(config, resolve=True))
    writer.tensors(f"{case}/tokenizer.bin", state_dict)
    writer.tensors(f"{case}/inputs.pt", {"x": x})
    writer.tensors(f"{case}/expected.pt", e)
    notes = [f"{name} x{QK_GAIN:g}" for name in done["qk_scaled"]]
    notes += [f"{name}/bias[{rows.start}:] x{gain} (log-variance)"
              for name, rows, gain in done["extra"] if name.endswith(".weight")]
    return {"seed": seed, "config": raw, "reinit_notes": notes, "expected": {k: list(v.shape) for k, v in e.items()}}


# ---------------------------------------------------------------------------------------------
# official_tiny training parts: discriminator, perceptual, losses, clustering_vq


def training_images(seed: int, step: int, *, size: int = 32, batch: int = 2):
    """(inputs, reconstructions), each float32 [batch, 3, size, size] in [0, 1], for one training step.

    inputs: 8x8 uniform noise upsampled bilinearly (smooth random images); reconstructions:
    inputs + 0.1 * N(0, 1) noise, clamped. Drawn from torch.Generator().manual_seed(seed * 1000 + step).
    """
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed * 1000 + step)
    x = F.interpolate(torch.rand(batch, 3, 8, 8, generator=g), size=size, mode="bilinear", align_corners=False)
    r = (x + 0.1 * torch.randn(batch, 3, size, size, generator=g)).clamp(0.0, 1.0)
    return x.contiguous(), r.contiguous()


def training_extras(seed: int, step: int, *, vae: bool, batch: int = 2, channels: int = 4, tokens: int = 8):
    """What the tokenizer hands the loss besides the images, drawn from
    torch.Generator().manual_seed(seed * 1000 + 500 + step).

    VQ: the quantiser's losses, float32 scalars (quantizer_loss = commitment_loss + codebook_loss).
    VAE: the posterior parameters float32 [batch, 2 * channels, 1, tokens] (the official layout:
    mean channels first; log-variances N(0, 2^2)).
    """
    import torch

    g = torch.Generator().manual_seed(seed * 1000 + 500 + step)
    if vae:
        mean = torch.randn(batch, channels, 1, tokens, generator=g)
        logvar = 2.0 * torch.randn(batch, channels, 1, tokens, generator=g)
        return {"posterior": torch.cat([mean, logvar], dim=1)}
    commitment, codebook = torch.rand(2, generator=g).unbind()
    return {"quantizer_loss": commitment + codebook, "commitment_loss": commitment, "codebook_loss": codebook}


def state_dict_keys(module) -> dict:
    """{key: shape} of a module's state dict, in order."""
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def _grad_record(named_parameters, head: int = TRAINING_GRAD_HEAD) -> dict:
    """The gradients of named parameters, compactly: their names, norms [P] and the first ``head``
    elements of each (flattened), concatenated."""
    import torch

    names, norms, heads = [], [], []
    for name, p in named_parameters:
        g = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
        names.append(name)
        norms.append(g.double().norm().float())
        heads.append(g.reshape(-1)[:head])
    return {"names": names, "norms": torch.stack(norms), "heads": torch.cat(heads)}


def _reinit(module, seed: int) -> dict:
    import torch

    return reinit_scaled_(module, generator=torch.Generator().manual_seed(seed))


def training_discriminator(t, writer: Writer, rel: str) -> dict:
    import torch

    e, what, keys = {}, {}, {}
    for i, (case, kwargs) in enumerate(DISCRIMINATOR_CASES.items()):
        torch.manual_seed(TRAINING_SEEDS["discriminator"])
        net = t.NLayerDiscriminator(**kwargs)
        _reinit(net, TRAINING_SEEDS["discriminator"] + i)
        keys[case] = state_dict_keys(net)
        x = training_images(TRAINING_SEEDS["inputs"], 0, size=DISCRIMINATOR_SIZE)[0].requires_grad_(True)
        logits = net(x)
        (logits.square().mean()).backward()
        grads = _grad_record(net.named_parameters())
        e[f"{case}_logits"] = logits.detach()
        e[f"{case}_input_grad"] = x.grad.detach()
        e[f"{case}_param_grad_norms"], e[f"{case}_param_grad_heads"] = grads["norms"], grads["heads"]
        what[f"{case}_logits"] = f"NLayerDiscriminator(**{kwargs})(x) [B,1,16,16]"
        what[f"{case}_input_grad"] = "d mean(logits^2) / d x"
        what[f"{case}_param_grad_norms"] = "norms of d mean(logits^2) / d parameter, in named_parameters order"
        what[f"{case}_param_grad_heads"] = (f"first {TRAINING_GRAD_HEAD} elements of each flattened parameter "
                                            "gradient, concatenated")
    e = {k: v.contiguous() for k, v in e.items()}
    writer.tensors(f"{rel}/expected.pt", e)
    writer.json(f"{rel}/expected.json", {
        "inputs": f"x = training_images({TRAINING_SEEDS['inputs']}, 0, size={DISCRIMINATOR_SIZE})[0] (not stored)",
        "weights": f"case i: torch.manual_seed({TRAINING_SEEDS['discriminator']}), NLayerDiscriminator(**kwargs), "
                   f"reinit_scaled_ with torch.Generator().manual_seed({TRAINING_SEEDS['discriminator']} + i)",
        "cases": DISCRIMINATOR_CASES, "state_dict": keys,
        "expected": _described(e, {k: {"what": v} for k, v in what.items()})})
    return {"cases": list(DISCRIMINATOR_CASES)}


def _perceptual_nets(t):
    """The official LPIPS and ConvNeXt-S (random, re-randomised with their TRAINING_SEEDS) as state dicts."""
    import torch
    from torchvision import models

    torch.manual_seed(TRAINING_SEEDS["lpips"])
    lpips = t.LPIPS().eval()
    _reinit(lpips, TRAINING_SEEDS["lpips"])
    torch.manual_seed(TRAINING_SEEDS["convnext"])
    convnext = models.convnext_small(weights=None).eval()
    _reinit(convnext, TRAINING_SEEDS["convnext"])
    return lpips.state_dict(), convnext.state_dict()


def _official_perceptual(t, name: str, nets):
    perceptual = t.PerceptualLoss(name).eval()
    if perceptual.lpips is not None:
        perceptual.lpips.load_state_dict(nets[0])
    if perceptual.convnext is not None:
        perceptual.convnext.load_state_dict(nets[1])
    return perceptual


def training_perceptual(t, writer: Writer, rel: str, nets) -> dict:

    e, what = {}, {}
    small = training_images(TRAINING_SEEDS["inputs"], 1)
    large = training_images(TRAINING_SEEDS["inputs"], 1, size=PERCEPTUAL_LARGE)
    lpips = _official_perceptual(t, "lpips", nets)
    for case, name, (x, r) in (("lpips", "lpips", small), ("convnext", "convnext_s", large),
                               ("mix", PERCEPTUAL_MIX, small)):
        net = lpips if case == "lpips" else _official_perceptual(t, name, nets)
        r = r.clone().requires_grad_(True)
        value = net(x, r)
        value.sum().backward()
        e[f"{case}_loss"] = value.detach()
        what[f"{case}_loss"] = f"PerceptualLoss({name!r})(inputs, reconstructions)" if case != "lpips" else \
            "LPIPS()(inputs, reconstructions) [B,1,1,1]"
        grad = r.grad.detach()
        if grad.numel() > 10_000:
            e[f"{case}_grad_norm"] = grad.double().norm().float()
            e[f"{case}_grad_strided"] = grad.reshape(-1)[::PERCEPTUAL_GRAD_STRIDE].contiguous()
            what[f"{case}_grad_norm"] = "norm of d sum(loss) / d reconstructions"
            what[f"{case}_grad_strided"] = ("d sum(loss) / d reconstructions, flattened, every "
                                            f"{PERCEPTUAL_GRAD_STRIDE}th element")
        else:
            e[f"{case}_grad"] = grad
            what[f"{case}_grad"] = "d sum(loss) / d reconstructions"
    writer.tensors(f"{rel}/expected.pt", e)
    writer.json(f"{rel}/expected.json", {
        "inputs": f"lpips, mix: training_images({TRAINING_SEEDS['inputs']}, 1) (32x32); convnext: "
                  f"training_images({TRAINING_SEEDS['inputs']}, 1, size={PERCEPTUAL_LARGE}) (resized to 224 inside); "
                  "not stored",
        "weights": f"torch.manual_seed(s), the network built untrained (E4), reinit_scaled_ with torch.Generator()."
                   f"manual_seed(s): LPIPS s = {TRAINING_SEEDS['lpips']}, torchvision convnext_small s = "
                   f"{TRAINING_SEEDS['convnext']}",
        "lpips_state_dict": state_dict_keys(lpips.lpips),
        "expected": _described(e, {k: {"what": v} for k, v in what.items()})})
    return {"cases": ["lpips", "convnext_s", PERCEPTUAL_MIX]}


def loss_config(case: str):
    from omegaconf import OmegaConf

    losses = dict(LOSS_CASES[case])
    mode = losses.pop("quantize_mode")
    return OmegaConf.create({"losses": losses, "model": {"vq_model": {"quantize_mode": mode}}})


def training_losses(t, writer: Writer, rel: str, nets) -> dict:
    import torch

    torch.manual_seed(TRAINING_SEEDS["discriminator"])
    discriminator = t.NLayerDiscriminator()
    _reinit(discriminator, TRAINING_SEEDS["discriminator"])  # = discriminator/ case "default"
    records = {}
    for case in LOSS_CASES:
        print(f"  losses/{case}", flush=True)
        config = loss_config(case)
        vae = config.model.vq_model.quantize_mode == "vae"
        cls = t.losses.ReconstructionLoss_Stage2 if case == "stage2" else t.losses.ReconstructionLoss_Single_Stage
        loss = cls(config)
        loss.discriminator.load_state_dict(discriminator.state_dict())
        loss.perceptual_loss = _official_perceptual(t, config.losses.perceptual_loss, nets)
        e = {}
        for step in LOSS_GENERATOR_STEPS:
            x, r = training_images(TRAINING_SEEDS["inputs"], step)
            r.requires_grad_(True)
            extra = training_extras(TRAINING_SEEDS["inputs"], step, vae=vae)
            if vae:
                posterior = extra["posterior"].requires_grad_(True)
                extra = t.DiagonalGaussianDistribution(posterior)
            total, terms = loss(x, r, extra, step, mode="generator")
            total.backward()
            for key, value in terms.items():
                e[f"gen{step}_{key}"] = torch.as_tensor(value, dtype=torch.float32).detach().reshape(())
            e[f"gen{step}_grad_reconstructions"] = r.grad.detach()
            if vae:
                e[f"gen{step}_grad_posterior"] = posterior.grad.detach()
        for step in (*LOSS_DISCRIMINATOR_STEPS, 0):
            x, r = training_images(TRAINING_SEEDS["inputs"], step)
            d_loss, terms = loss(x, r, None, step, mode="discriminator")
            d_loss.backward()
            for key, value in terms.items():
                e[f"dis{step}_{key}"] = value.detach().float().reshape(())
            grads = _grad_record(loss.discriminator.named_parameters())
            e[f"dis{step}_grad_norms"], e[f"dis{step}_grad_heads"] = grads["norms"], grads["heads"]
            if loss.lecam_regularization_weight > 0:
                e[f"dis{step}_ema_real_logits_mean"] = loss.ema_real_logits_mean.detach().clone()
                e[f"dis{step}_ema_fake_logits_mean"] = loss.ema_fake_logits_mean.detach().clone()
            loss.discriminator.zero_grad(set_to_none=True)
        writer.tensors(f"{rel}/{case}.pt", {k: v.contiguous() for k, v in e.items()})
        keys = {k: v for k, v in state_dict_keys(loss).items() if not k.startswith("perceptual_loss.convnext.")}
        records[case] = {"config": _plain(config), "state_dict_without_convnext": keys,
                         "expected": sorted(e)}
    writer.json(f"{rel}/expected.json", {
        "sequence": f"generator side at global steps {list(LOSS_GENERATOR_STEPS)} (loss(x, r, extra, step, "
                    f"mode='generator'), backward), then discriminator side at steps {list(LOSS_DISCRIMINATOR_STEPS)} "
                    "and finally at step 0 (before discriminator_start: the LeCAM term alone), each followed by a "
                    "backward; the discriminator's weights never change (no optimiser), its LeCAM EMAs do",
        "inputs": f"x, r = training_images({TRAINING_SEEDS['inputs']}, step) (r requires grad on the generator side); "
                  f"extra = training_extras({TRAINING_SEEDS['inputs']}, step, vae=...) (VAE: "
                  "DiagonalGaussianDistribution(posterior)); not stored",
        "weights": "the discriminator of discriminator/ case default; the perceptual networks of perceptual/",
        "keys": "gen{step}_{loss_dict key} (float32 scalars; discriminator_factor and d_weight as float32), "
                "gen{step}_grad_reconstructions [B,3,32,32], gen{step}_grad_posterior (VAE, official layout "
                "[B,2C,1,N]); dis{step}_{loss_dict key}, dis{step}_grad_norms / _grad_heads (the discriminator's "
                f"parameter gradients: norms and the first {TRAINING_GRAD_HEAD} elements of each), "
                "dis{step}_ema_{real,fake}_logits_mean (after the step)",
        "cases": records})
    return {"cases": list(LOSS_CASES)}


def _plain(config) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(config, resolve=True)


def training_clustering_vq(t, writer: Writer, rel: str) -> dict:
    import torch

    inputs, e = {}, {}
    for i, (case, use_l2_norm) in enumerate((("plain", False), ("l2", True))):
        seed = TRAINING_SEEDS["clustering_vq"] + i
        torch.manual_seed(seed)
        q = t.VectorQuantizer(codebook_size=CLUSTERING_CODES, token_size=CLUSTERING_DIM, commitment_cost=0.25,
                              use_l2_norm=use_l2_norm, clustering_vq=True).train()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            q.embedding.weight.copy_(0.5 * torch.randn(CLUSTERING_CODES, CLUSTERING_DIM, generator=g))
        inputs[f"{case}_codebook"] = q.embedding.weight.detach().clone()
        for step in range(CLUSTERING_STEPS):
            z = (0.7 * torch.randn(2, CLUSTERING_DIM, 1, 8, generator=g)).requires_grad_(True)
            inputs[f"{case}_z{step}"] = z.detach().clone()
            z_q, result = q(z)
            result["quantizer_loss"].backward()
            p = f"{case}_step{step}"
            e[f"{p}_z_quantized"] = z_q.detach()
            e[f"{p}_tokens"] = result["min_encoding_indices"].reshape(2, -1)
            for key in ("quantizer_loss", "commitment_loss", "codebook_loss"):
                e[f"{p}_{key}"] = result[key].detach()
            e[f"{p}_grad_z"] = z.grad.detach()
            e[f"{p}_grad_codebook"] = q.embedding.weight.grad.detach().clone()
            e[f"{p}_codebook"] = q.embedding.weight.detach().clone()
            e[f"{p}_embed_prob"] = q.embed_prob.detach().clone()
            q.embedding.weight.grad = None
    writer.tensors(f"{rel}/inputs.pt", {k: v.contiguous() for k, v in inputs.items()})
    writer.tensors(f"{rel}/expected.pt", {k: v.contiguous() for k, v in e.items()})
    writer.json(f"{rel}/expected.json", {
        "model": f"VectorQuantizer(codebook_size={CLUSTERING_CODES}, token_size={CLUSTERING_DIM}, commitment_cost=0.25, "
                 "use_l2_norm=<case>, clustering_vq=True).train(); case plain: use_l2_norm False, l2: True",
        "inputs": "{case}_codebook: the codebook before step 0 (0.5 N(0,1)); {case}_z{step}: the latents of each step, "
                  "official layout [B,T,1,N]",
        "sequence": "per step: z_q, result = q(z) (the clustering update runs inside this forward), "
                    "result['quantizer_loss'].backward(), record, clear the codebook's gradient",
        "expected": "{case}_step{step}_{z_quantized, tokens [B,N], quantizer_loss, commitment_loss, codebook_loss, "
                    "grad_z (d quantizer_loss / d z), grad_codebook, codebook (after the update), embed_prob}"})
    return {"cases": ["plain", "l2"], "steps": CLUSTERING_STEPS}


def make_official_training(off: Official, writer: Writer, argv: list[str], threads: int) -> None:
    import torch

    started = time.time()
    t = off.training
    torch.set_grad_enabled(True)
    parts = {}
    print("official_tiny/discriminator", flush=True)
    parts["discriminator"] = training_discriminator(t, writer, "official_tiny/discriminator")
    print("official_tiny/clustering_vq", flush=True)
    parts["clustering_vq"] = training_clustering_vq(t, writer, "official_tiny/clustering_vq")
    print("official_tiny/perceptual", flush=True)
    nets = _perceptual_nets(t)
    parts["perceptual"] = training_perceptual(t, writer, "official_tiny/perceptual", nets)
    print("official_tiny/losses", flush=True)
    parts["losses"] = training_losses(t, writer, "official_tiny/losses", nets)
    meta_path = writer.root / "official_tiny" / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.setdefault("parts", {})
    for name, record in parts.items():
        meta["parts"][f"official_tiny/{name}"] = {**record, "script_part": "official_training"}
    # The checkout's place on the generating machine is not part of the record.
    argv = [("OFFICIAL" if i and argv[i - 1] == "--official" else a) for i, a in enumerate(argv)]
    meta["official_training"] = {
        "argv": argv, "official_commit": PINNED_COMMIT,
        "official_edits": "in memory (see the script's docstring): E1 packages entered without their __init__, "
                          "E4 the perceptual networks built untrained (no download)",
        "mode": "the training code paths, float32 on CPU, gradients by backward()",
        "seeds": TRAINING_SEEDS, "versions": _versions(threads), "total_s": round(time.time() - started, 2)}
    writer.json("official_tiny/meta.json", meta)


# ---------------------------------------------------------------------------------------------
# official_titok_shapes.json.gz


def make_shapes(off: Official, official: Path, writer: Writer) -> None:
    import torch
    from omegaconf import OmegaConf

    print("official_titok_shapes.json.gz", flush=True)
    models = {}
    for name in sorted(RELEASED):
        full = OmegaConf.load(official / "configs" / "infer" / "TiTok" / f"{name}.yaml")
        config = OmegaConf.create({"model": {"vq_model": OmegaConf.to_container(full.model.vq_model, resolve=True)},
                                   "dataset": OmegaConf.to_container(full.dataset, resolve=True)})
        with torch.device("meta"):
            model = off.build_titok(config)
        models[name] = {"config": OmegaConf.to_container(config, resolve=True),
                        "shapes": {k: list(v.shape) for k, v in model.state_dict().items()}}
    text = json.dumps({"official_commit": PINNED_COMMIT, "models": models}, sort_keys=True)
    path = writer.root / "official_titok_shapes.json.gz"
    old = None
    if path.is_file():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            old = json.load(f)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text)
    verdict = "new" if old is None else ("same content" if old == json.loads(text) else "changed")
    writer.report.append(f"official_titok_shapes.json.gz: {verdict}")
    print(f"  official_titok_shapes.json.gz: {verdict}", flush=True)


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python scripts/make_official_fixtures.py",
        description="Regenerate the golden fixtures of tests/fixtures by running the official TiTok code "
                    f"(github.com/bytedance/1d-tokenizer at commit {PINNED_COMMIT}).",
        epilog="Recipes: tests/fixtures/README.md and tests/fixtures/official_tiny/README.md.",
    )
    parser.add_argument("--official", required=True, metavar="PATH",
                        help=f"a git clone of github.com/bytedance/1d-tokenizer checked out at {PINNED_COMMIT}")
    parser.add_argument("--out", default=str(REPO / "tests" / "fixtures"), metavar="DIR",
                        help="where the fixtures go (default: tests/fixtures of this repository)")
    parser.add_argument("--only", default=",".join(PARTS), metavar="PARTS",
                        help=f"comma-separated subset of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (default 2, as the committed fixtures; others move results by ~3e-5)")
    args = parser.parse_args(argv)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(args.only) - set(PARTS))
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    official = check_checkout(args.official)
    if "official_tiny" in args.only and importlib.util.find_spec("transformers") is None:
        raise SystemExit("official_tiny needs transformers (the official ImageBert is a BertModel): "
                         "pip install transformers, or pass --only without official_tiny")
    missing = [name for name in ("requests", "tqdm") if importlib.util.find_spec(name) is None]
    if "official_training" in args.only and missing:
        raise SystemExit(f"official_training needs {' and '.join(missing)} (imported by the official lpips.py): "
                         f"pip install {' '.join(missing)}, or pass --only without official_training")
    import torch

    torch.set_num_threads(args.threads)
    off = Official(official)
    writer = Writer(Path(args.out).resolve())
    if "official_tiny" in args.only:
        make_official_tiny(off, official, writer, sys.argv[1:] if argv is None else list(argv), args.threads)
    if "official_training" in args.only:
        make_official_training(off, writer, sys.argv[1:] if argv is None else list(argv), args.threads)
    single = [case for case in SINGLE_STAGE_SEEDS if case in args.only]
    if single:
        meta_path = writer.root / "fixtures_meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        meta.update({"official_commit": PINNED_COMMIT, "torch": torch.__version__, "threads": args.threads})
        cases = meta.setdefault("cases", {})
        for case in single:
            cases[case] = make_single_stage(off, official, writer, case)
        writer.json("fixtures_meta.json", meta, newline=False)  # as committed
    if "shapes" in args.only:
        make_shapes(off, official, writer)
    print(f"done: {len(writer.report)} files under {writer.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
