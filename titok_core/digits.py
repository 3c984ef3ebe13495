"""The bundled real dataset: scikit-learn's handwritten digits as an image folder.

scikit-learn ships the UCI optical-recognition digits inside the package (1,797 images of 8x8
pixels, 17 grey levels, 10 classes), so nothing is downloaded. :func:`make_digits_dataset`
upsamples them (bicubic) and writes the usual tree, with a per-class held-out share as val::

    root/classes.json
    root/train/digit_0/0000.png ...
    root/val/digit_0/0000.png ...

Needs the optional extra ``pip install titok-gen[digits]`` (scikit-learn).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from titok_core.errors import MissingPackageError, PathTakenError

log = logging.getLogger(__name__)

CLASS_NAMES = [f"digit_{d}" for d in range(10)]
_MANIFEST = "classes.json"


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: (uint8 [1797,8,8] in 0..255, labels int64 [1797])."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise MissingPackageError("the digits dataset needs scikit-learn: pip install 'titok-gen[digits]'") from exc
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    return images, digits.target.astype(np.int64)


def make_digits_dataset(root: str | os.PathLike, *, size: int = 32, val_fraction: float = 0.15, seed: int = 0) -> Path:
    """Write the digits image-folder tree at ``root`` (grayscale PNGs of ``size`` px) and return ``root``.

    The last ``val_fraction`` of a seeded shuffle of each class is held out as ``val``. Idempotent:
    a tree whose ``classes.json`` matches is returned at once; another non-empty ``root`` raises
    FileExistsError. Written in a temporary sibling and renamed into place.
    """
    root = Path(root)
    want = {"dataset": "sklearn_digits", "classes": CLASS_NAMES, "size": size, "val_fraction": val_fraction,
            "seed": seed}
    if root.exists() and any(root.iterdir()):
        try:
            have = json.loads((root / _MANIFEST).read_text())
        except (OSError, ValueError):
            have = None
        if have == want:
            return root
        raise PathTakenError(f"{root} exists but was not made by make_digits_dataset with these settings "
                              f"(found {have}, want {want}); remove it or pick another root")
    images, labels = load_digits_arrays()
    rng = np.random.default_rng(seed)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for label, name in enumerate(CLASS_NAMES):
            idx = rng.permutation(np.flatnonzero(labels == label))
            n_val = int(round(len(idx) * val_fraction))
            for split, part in (("train", idx[: len(idx) - n_val]), ("val", idx[len(idx) - n_val :])):
                folder = tmp / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i, j in enumerate(part):
                    img = Image.fromarray(images[j], "L").resize((size, size), Image.Resampling.BICUBIC)
                    img.save(folder / f"{i:04d}.png")
        (tmp / _MANIFEST).write_text(json.dumps(want, indent=1) + "\n")
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp.replace(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("digits dataset: %d images at %s", len(labels), root)
    return root
