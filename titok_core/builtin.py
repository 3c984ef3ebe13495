"""The built-in datasets, written as image folders on first use: ``demo`` (procedural shapes) and
``digits`` (scikit-learn's handwritten digits). ``data.builtin=<name>`` in the training configs."""
from __future__ import annotations

import os
from pathlib import Path

from titok_core.errors import UsageError

NATIVE_SIZE = {"demo": 64, "digits": 32}  # the image size each is written at by default


def make_builtin_dataset(
    name: str, root: str | os.PathLike, *, size: int | None = None, seed: int = 0, demo_train_per_class: int = 1000,
    demo_val_per_class: int = 100,
) -> Path:
    """Write built-in dataset ``name`` at ``root`` unless it is there already; returns ``root``."""
    size = size or NATIVE_SIZE.get(name)
    if name == "demo":
        from titok_core.demo_shapes import make_demo_dataset

        return make_demo_dataset(root, num_train_per_class=demo_train_per_class,
                                 num_val_per_class=demo_val_per_class, size=size, seed=seed)
    if name == "digits":
        from titok_core.digits import make_digits_dataset

        return make_digits_dataset(root, size=size, seed=seed)
    raise UsageError(f"unknown built-in dataset {name!r}; known: {', '.join(NATIVE_SIZE)}")
