"""The built-in demo domain: procedural images of 10 coloured shapes, one class per shape.

Each class differs from every other in both shape and colour (``CLASSES``); position, scale,
rotation, a little colour jitter and the background (solid or gradient, slight noise) vary per
image, so there is something to learn while a small tokenizer and generator still learn it fast.
Shapes are drawn as a mask at ``SUPERSAMPLE`` times the size and box-filtered down, which gives
clean antialiased edges.

Every image is a pure function of ``(seed, split, class_id, index)`` (see :func:`image_rng`), so
any one image can be remade alone. :func:`make_demo_dataset` writes the usual image-folder tree::

    root/classes.json                      # class names and the settings that made the tree
    root/train/00_red_circle/00000.png ... # sorted folder order == class id
    root/val/00_red_circle/00000.png ...

    python -m titok_core.demo_shapes data/demo_shapes --train 1000 --val 100
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from titok_core.errors import PathTakenError

log = logging.getLogger(__name__)

# (folder name, RGB 0..255); the folder names sort in class-id order.
CLASSES: list[tuple[str, tuple[int, int, int]]] = [
    ("00_red_circle", (230, 30, 30)),
    ("01_green_square", (40, 190, 60)),
    ("02_blue_triangle", (40, 90, 255)),
    ("03_yellow_star", (250, 225, 30)),
    ("04_magenta_cross", (235, 40, 235)),
    ("05_cyan_ring", (40, 225, 235)),
    ("06_orange_hexagon", (255, 135, 0)),
    ("07_white_heart", (248, 248, 248)),
    ("08_purple_arrow", (120, 50, 200)),
    ("09_pink_crescent", (255, 150, 190)),
]
CLASS_NAMES: list[str] = [name for name, _ in CLASSES]
SUPERSAMPLE = 4
SPLITS = {"train": 0, "val": 1}  # part of each image's seed
FORMAT_VERSION = 1  # bump when rendering changes, so old trees are not taken for new ones
_MANIFEST = "classes.json"
_CHUNK = 250  # images per parallel job


def _polygon(n: int, *, inner: float | None = None) -> np.ndarray:
    """Regular n-gon (or 2n-point star when ``inner`` is set) of radius 1: float [V,2]."""
    if inner is None:
        t = np.arange(n) * 2 * np.pi / n - np.pi / 2
        return np.stack([np.cos(t), np.sin(t)], 1)
    t = np.arange(2 * n) * np.pi / n - np.pi / 2
    r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], 1)  # centre the bounding box vertically
    return pts / np.abs(pts).max()


# Outlines in unit coordinates (radius ~1, y down), scaled so the shapes look about equally big.
_OUTLINES: dict[str, np.ndarray] = {
    "square": _polygon(4) * 1.15,
    "triangle": _polygon(3) * 1.25 + [0.0, 0.2],
    "star": _polygon(5, inner=0.45) * 1.1 + [0.0, 0.08],
    "cross": np.array([[-1, -0.3], [-0.3, -0.3], [-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3],
                       [1, 0.3], [0.3, 0.3], [0.3, 1], [-0.3, 1], [-0.3, 0.3], [-1, 0.3]]) * 1.05,
    "hexagon": _polygon(6) * 1.0,
    "heart": _heart() * 1.15,
    "arrow": np.array([[-1, -0.25], [0.15, -0.25], [0.15, -0.7], [1, 0], [0.15, 0.7], [0.15, 0.25], [-1, 0.25]]),
}


def _draw_mask(shape: str, draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float) -> None:
    """Paint the shape (255) on an 'L' canvas; centre, radius in canvas pixels, angle in radians."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = 0.55 * r
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = cx + 0.45 * r * np.cos(angle), cy + 0.45 * r * np.sin(angle)
        ri = 0.85 * r
        draw.ellipse([ox - ri, oy - ri, ox + ri, oy + ri], fill=0)
    else:
        c, s = np.cos(angle), np.sin(angle)
        pts = _OUTLINES[shape] @ np.array([[c, s], [-s, c]]) * r + [cx, cy]
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Solid or linear-gradient, low-saturation background with slight noise: float [H,W,3] in 0..255."""
    def colour() -> np.ndarray:
        grey = rng.uniform(15, 150)
        return np.clip(grey + rng.normal(0, 12, 3), 0, 255).astype(np.float32)

    a = colour()
    if rng.random() < 0.5:
        bg = np.broadcast_to(a, (size, size, 3))
    else:
        b = colour()
        theta = rng.uniform(0, 2 * np.pi)
        t = np.linspace(-0.5, 0.5, size, dtype=np.float32)
        w = np.clip((t[None, :] * np.cos(theta) + t[:, None] * np.sin(theta)) / 0.71 + 0.5, 0, 1)[..., None]
        bg = a * (1 - w) + b * w
    return bg + 2.0 * rng.standard_normal((size, size, 3), dtype=np.float32)


def render_demo_sample(
    class_id: int, rng: np.random.Generator, *, size: int = 64
) -> tuple[Image.Image, np.ndarray]:
    """One demo image of class ``class_id`` (0..9) and its shape's coverage.

    Returns (RGB ``PIL.Image`` of ``size`` x ``size``, float32 [size, size] in [0, 1], the
    antialiased fraction of each pixel the shape covers). All randomness comes from ``rng``
    (position, scale, rotation, colour jitter, background) and every class draws from it in the
    same order, so one generator state gives the same layout for every class.
    """
    name, rgb = CLASSES[class_id]
    shape = name.split("_", 2)[2]
    bg = _background(rng, size)
    r = rng.uniform(0.22, 0.36) * size
    margin = 0.8 * r  # most of the shape stays inside the frame
    cx, cy = rng.uniform(margin, size - margin, 2)
    angle = rng.uniform(0, 2 * np.pi)
    fg = np.clip(np.array(rgb, np.float32) + rng.normal(0, 8, 3).astype(np.float32), 0, 255)

    big = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    _draw_mask(shape, ImageDraw.Draw(big), cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE, angle)
    alpha = np.asarray(big.resize((size, size), Image.Resampling.BOX), np.float32) / 255.0  # (H, W)
    out = bg * (1 - alpha[..., None]) + fg * alpha[..., None]
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB"), alpha


def render_demo_image(class_id: int, rng: np.random.Generator, *, size: int = 64) -> Image.Image:
    """One demo image of class ``class_id`` (0..9): RGB ``PIL.Image`` of ``size`` x ``size``."""
    return render_demo_sample(class_id, rng, size=size)[0]


def image_rng(seed: int, split: str, class_id: int, index: int) -> np.random.Generator:
    """The generator that makes image ``index`` of class ``class_id`` in ``split`` ("train"/"val")."""
    return np.random.default_rng([seed, SPLITS[split], class_id, index])


def _manifest(*, num_train_per_class: int, num_val_per_class: int, size: int, seed: int) -> dict:
    return {
        "classes": CLASS_NAMES, "size": size, "seed": seed, "num_train_per_class": num_train_per_class,
        "num_val_per_class": num_val_per_class, "format_version": FORMAT_VERSION,
    }


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _remove_dead_temp_dirs(root: Path) -> None:
    """Temp trees of killed builds (their pid is gone) are leftovers; live ones belong to another builder."""
    for tmp in root.parent.glob(f".{root.name}.tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def _write_images(
    folder: Path, split: str, class_id: int, start: int, stop: int, width: int, *, size: int, seed: int
) -> int:
    """Render and save images start..stop-1 of one class; returns how many."""
    for i in range(start, stop):
        img = render_demo_image(class_id, image_rng(seed, split, class_id, i), size=size)
        img.save(folder / f"{i:0{width}d}.png", compress_level=1)  # fast; the noise barely compresses anyway
    return stop - start


def make_demo_dataset(
    root: str | os.PathLike, *, num_train_per_class: int, num_val_per_class: int, size: int = 64, seed: int = 0,
    num_workers: int = 0,
) -> Path:
    """Write the demo image-folder tree at ``root`` (see the module docstring) and return ``root``.

    Idempotent: a tree whose ``classes.json`` matches these arguments is returned at once. The tree
    is built in a temporary sibling directory and renamed into place, so a killed build never leaves
    a tree that looks complete. An existing, non-empty ``root`` made with other arguments (or not
    by this function) raises ``FileExistsError``; nothing is ever overwritten. ``val/`` is only
    written when ``num_val_per_class > 0``. ``num_workers`` > 1 renders in that many processes
    (the pixels do not depend on it); the default renders here, about 1.5 ms of CPU per 64x64
    image, which on a busy 2-core machine was faster than 2 workers.
    """
    root = Path(root)
    want = _manifest(
        num_train_per_class=num_train_per_class, num_val_per_class=num_val_per_class, size=size, seed=seed
    )

    def check_existing() -> bool:
        if not root.exists() or (root.is_dir() and not any(root.iterdir())):
            return False
        have = _read_manifest(root)
        if have == want:
            return True
        raise PathTakenError(
            f"{root} exists but was not made by make_demo_dataset with these settings "
            f"(found {have}, want {want}); remove it or pick another root"
        )

    if check_existing():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temp_dirs(root)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    jobs = []  # (folder, split, class_id, first index, end index, file-name width), <= _CHUNK images each
    for split, n in {"train": num_train_per_class, "val": num_val_per_class}.items():
        width = max(5, len(str(n - 1)))
        for class_id, name in enumerate(CLASS_NAMES):
            for i in range(0, n, _CHUNK):
                jobs.append((tmp / split / name, split, class_id, i, min(i + _CHUNK, n), width))
    total = len(CLASSES) * (num_train_per_class + num_val_per_class)
    try:
        for folder, *_ in jobs:
            folder.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=total, desc=f"demo shapes -> {root}", unit="img", disable=True if total < 500 else None)
        with bar, contextlib.ExitStack() as stack:
            if num_workers > 1:
                pool = ProcessPoolExecutor(num_workers)
                stack.callback(pool.shutdown, cancel_futures=True)  # on error, drop what has not started
                futures = [pool.submit(_write_images, *job, size=size, seed=seed) for job in jobs]
                done = (f.result() for f in as_completed(futures))
            else:
                done = (_write_images(*job, size=size, seed=seed) for job in jobs)
            for count in done:
                bar.update(count)
        (tmp / _MANIFEST).write_text(json.dumps(want, indent=1) + "\n")  # last: marks the tree complete
        try:
            tmp.replace(root)  # atomic; also replaces an empty directory
        except OSError:
            # Another process (e.g. another DDP rank) finished first: use its tree if it matches.
            if not check_existing():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("demo dataset: %d images at %s", total, root)
    return root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write the demo shapes image-folder dataset.")
    p.add_argument("root", help="output folder (root/train/<class>/*.png, root/val/..., root/classes.json)")
    p.add_argument("--train", type=int, default=1000, help="training images per class")
    p.add_argument("--val", type=int, default=100, help="validation images per class")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="render in this many processes (default: here)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    make_demo_dataset(
        a.root, num_train_per_class=a.train, num_val_per_class=a.val, size=a.size, seed=a.seed, num_workers=a.workers
    )


if __name__ == "__main__":
    main()
