"""The dataset's own judges: a small CNN classifier trained on its images (class accuracy, a
feature-space FID), and which images it holds out for judging.

A small or unusual dataset (the demo's procedural shapes, digits, a user's own 10 classes) is far
from ImageNet, so Inception FID says little there. Its judges are instead how often a generated
image is recognised as its class, and the Frechet distance between this CNN's features of real
held-out and generated images. That number is labelled ``DEMO_FID_LABEL`` wherever it is shown:
it is not comparable with any Inception FID. ``eval.gfid mode=demo`` reports them, and
``generator.fit_sampling`` picks sampling settings with them.

The data is an image folder, ``<root>/train/<class>/*`` and, when present, ``<root>/val/<class>/*``.
Judging uses held-out images (:func:`judge_files`): the val split, or, when there is none, a fixed
``HELDOUT_FRACTION`` of each train class, which the classifiers then never train on.

The classifier trains once on the CPU (a fixed number of steps, about a minute) and is cached
in a file keyed by the dataset (path, file names and sizes, the held-out rule), the seed and the
hyperparameters.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from titok_core.checkpoints import CheckpointError, read_model_file, save_model_file
from titok_core.data import list_image_files
from titok_core.errors import MissingFileError, UsageError
from titok_core.metrics import features_to_stats, fid_from_stats

log = logging.getLogger(__name__)

DEMO_FID_NAME = "demo_classifier_fid"
DEMO_FID_LABEL = "demo-classifier FID (not Inception FID)"
KIND = "demo_classifier"


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DemoCNN(nn.Module):
    """Four 3x3 conv layers and a global average pool; ``features`` are the pooled activations."""

    def __init__(self, *, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            _conv(3, width, stride=2),  # the first stride keeps CPU training to about a minute
            _conv(width, width),
            nn.MaxPool2d(2),
            _conv(width, 2 * width),
            nn.MaxPool2d(2),
            _conv(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)
        self.feature_dim = 4 * width

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """float [B,3,H,W] in [0,1] -> float [B,4*width] (non-negative, post-ReLU)."""
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """float [B,3,H,W] in [0,1] -> logits [B,num_classes]."""
        return self.head(self.features(images))


def colour_blind(images: torch.Tensor, *, generator: torch.Generator | None = None, knots: int = 6) -> torch.Tensor:
    """Remove colour and brightness, keep shape: float [B,3,H,W] in [0,1] -> float [B,3,H,W] (grey).

    Each image is projected on its own main colour axis (first principal component of its pixel
    colours, so a shape stays visible whatever its hue and its background's), stretched to [0, 1],
    passed through a random increasing piecewise-linear intensity map with ``knots`` knots and
    inverted with probability 1/2. The direction, the map and the inversion are drawn per image,
    so neither colour, nor brightness, nor which side is brighter carries the class; only where
    the intensity changes, the shape, does.
    """
    b = images.shape[0]
    x = images.float().flatten(2)  # (B, 3, HW)
    centred = x - x.mean(-1, keepdim=True)
    cov = centred @ centred.transpose(1, 2) / x.shape[-1]  # (B, 3, 3)
    axis = torch.linalg.eigh(cov + 1e-6 * torch.eye(3, device=x.device)).eigenvectors[..., -1]  # (B, 3)
    grey = torch.einsum("bc,bcn->bn", axis, centred)
    lo, hi = grey.amin(-1, keepdim=True), grey.amax(-1, keepdim=True)
    grey = (grey - lo) / (hi - lo).clamp(min=1e-6)  # (B, HW) in [0, 1]
    dev = images.device
    ys = torch.rand(b, knots, generator=generator, device=generator.device if generator else dev).to(dev).sort(-1).values
    ys = (ys - ys[:, :1]) / (ys[:, -1:] - ys[:, :1]).clamp(min=1e-6)  # increasing, from 0 to 1
    pos = grey * (knots - 1)
    i = pos.floor().clamp(max=knots - 2).long()
    frac = pos - i
    mapped = ys.gather(1, i) * (1 - frac) + ys.gather(1, i + 1) * frac
    invert = torch.rand(b, 1, generator=generator, device=generator.device if generator else dev).to(dev) < 0.5
    mapped = torch.where(invert, 1 - mapped, mapped)
    return mapped.view(b, 1, *images.shape[2:]).expand(-1, 3, -1, -1).to(images.dtype)


class DemoClassifier:
    """A trained DemoCNN with its class names and input resolution; inference in chunks, no grad."""

    def __init__(self, net: DemoCNN, *, classes: list[str], resolution: int, config: dict | None = None):
        self.net = net.eval()
        self.classes = list(classes)
        self.resolution = resolution
        self.config = config or {}
        # Colour-blind classifiers see every image through colour_blind(), with maps drawn from
        # a fixed seed per call, so the same images always get the same verdict.
        self.colour_blind = bool(self.config.get("colour_blind", False))

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: str | torch.device) -> "DemoClassifier":
        self.net.to(device)
        return self

    @torch.no_grad()
    def _run(self, images: torch.Tensor, fn, chunk: int = 256) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"expected float [B,3,H,W] images in [0,1], got {images.dtype} {tuple(images.shape)}")
        out = []
        g = torch.Generator().manual_seed(1234)
        for part in images.split(chunk):
            part = part.to(self.device, torch.float32)
            if part.shape[-2:] != (self.resolution, self.resolution):
                part = F.interpolate(part, size=(self.resolution,) * 2, mode="bilinear", antialias=True)
            if self.colour_blind:
                part = colour_blind(part, generator=g)
            out.append(fn(part).float().cpu())
        return torch.cat(out)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """float [B,3,H,W] in [0,1] (any H,W; resized) -> class probabilities float [B,num_classes] on the CPU."""
        return self._run(images, lambda x: self.net(x).softmax(-1))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """float [B,3,H,W] in [0,1] -> penultimate features float [B,D] on the CPU."""
        return self._run(images, self.net.features)

    def class_accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of images (float [B,3,H,W] in [0,1]) whose argmax class equals ``labels`` (int [B])."""
        predicted = self.classify(images).argmax(-1)
        return float((predicted == labels.cpu()).float().mean())


def classifier_fid(features_real: torch.Tensor | np.ndarray, features_fake: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between two feature sets [N,D], [M,D] of the demo classifier.

    This is the DEMO_FID_LABEL number, "demo-classifier FID (not Inception FID)".
    """
    return fid_from_stats(*features_to_stats(features_real), *features_to_stats(features_fake))


# ---------------------------------------------------------------- data


def class_names(root: str | os.PathLike, split: str = "train") -> list[str]:
    """Sorted class folder names of ``<root>/<split>``; their index is the label."""
    split_dir = Path(root) / split
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir()) if split_dir.is_dir() else []
    if not names:
        raise MissingFileError(f"no class folders in {split_dir} (expected <root>/{split}/<class>/*.png)")
    return names


def _read_images(files: list[Path], resolution: int) -> torch.Tensor:
    """Image files -> uint8 [N,3,R,R] (RGB; bilinear resize when an image is not R x R)."""
    images = []
    for path in files:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), resample=Image.BILINEAR)
            images.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return torch.stack(images) if images else torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8)


def load_split(
    root: str | os.PathLike, split: str, *, resolution: int = 64, classes: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of ``<root>/<split>/<class>/*`` in memory: (uint8 [N,3,R,R], labels int64 [N]).

    Minimal local reading (bilinear resize when an image is not R x R); the demo set is small.
    """
    classes = classes or class_names(root, split)
    files, labels = [], []
    for label, name in enumerate(classes):
        found = list_image_files(Path(root) / split / name)
        files += found
        labels += [label] * len(found)
    if not files:
        raise MissingFileError(f"no images under {Path(root) / split}")
    return _read_images(files, resolution), torch.tensor(labels, dtype=torch.int64)


# Without <root>/val, the judges hold out this share of every class of <root>/train (a fixed seeded
# choice of files, the same on every run and machine) and never train on it.
HELDOUT_FRACTION = 0.1
HELDOUT_SEED = 0


def has_val_split(root: str | os.PathLike) -> bool:
    """Whether ``<root>/val`` holds at least one image (then it is the judges' held-out split)."""
    return (Path(root) / "val").is_dir() and bool(list_image_files(Path(root) / "val"))


def judge_files(root: str | os.PathLike, classes: list[str] | None = None) -> dict:
    """The judges' split of ``root``: which files they train on and which are held out.

    ``<root>/val`` when it has images; else, per class of ``<root>/train``, ``HELDOUT_FRACTION`` of
    the files (at least one; a seeded permutation of the sorted names, so the same files on every
    run) are held out and excluded from the judges' training. Returns {"train": [(path, label)],
    "heldout": [(path, label)], "heldout_from": "val" | "train", "classes": [...]}. A class of
    ``train/`` with fewer than 2 images and no ``val/`` is a user's error (UsageError, at once).
    """
    classes = classes or class_names(root)
    train = [[(p, label) for p in list_image_files(Path(root) / "train" / name)] for label, name in enumerate(classes)]
    if has_val_split(root):
        heldout = [(p, label) for label, name in enumerate(classes) for p in list_image_files(Path(root) / "val" / name)]
        return {"train": [f for c in train for f in c], "heldout": heldout, "heldout_from": "val", "classes": classes}
    kept, heldout = [], []
    for name, files in zip(classes, train):
        if len(files) < 2:
            raise UsageError(f"{Path(root) / 'train' / name} has {len(files)} image(s) and {root} has no val/: "
                             "the judges need at least 2 a class to hold one out (or add <root>/val/<class>/*)")
        n = max(1, round(HELDOUT_FRACTION * len(files)))
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(HELDOUT_SEED)).tolist()
        held = set(order[:n])
        heldout += [f for i, f in enumerate(files) if i in held]
        kept += [f for i, f in enumerate(files) if i not in held]
    return {"train": kept, "heldout": heldout, "heldout_from": "train", "classes": classes}


def heldout_description(split: dict) -> str:
    """One line saying which images the judges hold out (for the printed summary and the JSON)."""
    n = len(split["heldout"])
    if split["heldout_from"] == "val":
        return f"held out: the {n} images of val/"
    return (f"held out: {n} images of train/ ({HELDOUT_FRACTION:.0%} of each class, fixed; no val/), "
            "excluded from the judges' training")


def load_judge_part(split: dict, part: str, *, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``part`` ("train" | "heldout") of a :func:`judge_files` split: (uint8 [N,3,R,R], labels int64 [N])."""
    files = split[part]
    if not files:
        raise MissingFileError(f"no {part} images for the judges")
    return _read_images([f for f, _ in files], resolution), torch.tensor([y for _, y in files], dtype=torch.int64)


# ---------------------------------------------------------------- training and cache


colour_blind_fn = colour_blind  # train_demo_classifier's flag of the same name shadows it


def train_demo_classifier(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    resolution: int = 64,
    width: int = 32,
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 2e-3,
    colour_blind: bool = False,
    device: str = "cpu",
) -> DemoClassifier:
    """Train a DemoCNN on the judges' training part of ``root`` (:func:`judge_files`: ``<root>/train``, less
    the held-out share when there is no ``<root>/val``) for ``steps`` Adam steps; reports the held-out accuracy.

    ``colour_blind``: every training batch goes through :func:`colour_blind` with fresh random
    maps, and so does every image it classifies later: it must tell the classes by shape alone.
    Deterministic for a seed on one device and thread count; leaves the global RNG untouched.
    """
    split = judge_files(root)
    classes = split["classes"]
    images, labels = load_judge_part(split, "train", resolution=resolution)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DemoCNN(num_classes=len(classes), width=width).to(device)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        net.train()
        order = torch.randperm(len(images), generator=gen)
        pos = 0
        for step in range(steps):
            if pos + batch_size > len(order):
                order, pos = torch.randperm(len(images), generator=gen), 0
            idx = order[pos : pos + batch_size]
            pos += batch_size
            x = images[idx].to(device, torch.float32) / 255
            if colour_blind:
                x = colour_blind_fn(x, generator=gen)
            loss = F.cross_entropy(net(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 100 == 0 or step == steps - 1:
                log.info("demo classifier step %d/%d loss %.4f", step + 1, steps, loss.item())
    config = {"classes": classes, "resolution": resolution, "width": width, "seed": seed, "steps": steps,
              "batch_size": batch_size, "lr": lr, "root": str(Path(root).resolve()), "colour_blind": colour_blind}
    classifier = DemoClassifier(net, classes=classes, resolution=resolution, config=config)
    config["heldout_from"] = split["heldout_from"]
    val_images, val_labels = load_judge_part(split, "heldout", resolution=resolution)
    config["val_accuracy"] = classifier.class_accuracy(val_images.float() / 255, val_labels)
    log.info("demo classifier held-out accuracy %.4f (%s)", config["val_accuracy"], heldout_description(split))
    return classifier


CACHE_ENV = "TITOK_CACHE"  # where titok-gen caches what it trains for itself (the demo judges)


def default_cache_dir() -> Path:
    """``$TITOK_CACHE/demo_classifier``; without it ``$XDG_CACHE_HOME/titok_gen/demo_classifier``
    (``~/.cache`` when that is unset too)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "demo_classifier"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "titok_gen" / "demo_classifier"


def cache_key(root: str | os.PathLike, **hparams) -> str:
    """A short hash of the dataset (resolved path, train file names and sizes, whether val/ is the held-out
    split) and the hyperparameters."""
    root = Path(root).resolve()
    files = [(str(p.relative_to(root)), p.stat().st_size) for p in list_image_files(root / "train")]
    heldout = "val" if has_val_split(root) else f"train {HELDOUT_FRACTION} seed {HELDOUT_SEED}"
    blob = json.dumps({"root": str(root), "files": files, **hparams, **({} if heldout == "val" else {"heldout": heldout})},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_demo_classifier(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    **hparams,
) -> DemoClassifier:
    """The demo classifier for ``root``: read from the cache, or trained (``train_demo_classifier``) and cached.

    ``hparams`` are passed to ``train_demo_classifier`` and are part of the cache key. The cache
    file is written atomically, so concurrent ranks at worst train twice.
    """
    key = cache_key(root, seed=seed, **hparams)
    path = Path(cache_dir or default_cache_dir()) / f"demo_classifier-{key}.safetensors"
    cached = _read_cached(path)
    if cached is not None:
        log.info("demo classifier: cached %s", path)
        return cached.to(device)
    classifier = train_demo_classifier(root, seed=seed, device=device, **hparams)
    save_model_file(path, kind=KIND, config=classifier.config, state_dict=classifier.net.state_dict())
    log.info("demo classifier: trained and cached at %s (%s= moves the cache)", path, CACHE_ENV)
    return classifier


def _read_cached(path: Path) -> DemoClassifier | None:
    if not path.is_file():
        return None
    try:
        found = read_model_file(path)
    except CheckpointError as exc:
        log.warning("demo classifier cache %s unreadable (%s); retraining", path, exc)
        return None
    if found is None or found[0] != KIND:
        log.warning("demo classifier cache %s is not a demo classifier; retraining", path)
        return None
    _, config, state = found
    net = DemoCNN(num_classes=len(config["classes"]), width=config["width"])
    net.load_state_dict(state)
    return DemoClassifier(net, classes=config["classes"], resolution=config["resolution"], config=config)
