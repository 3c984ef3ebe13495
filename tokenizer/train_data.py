"""The images tokenizer.train learns from: the training split (augmented) and held-out images.

``data.root`` is any format of :mod:`titok_core.formats`; ``data.split`` is trained on and
``data.val_split`` held out (without one, images of the training split are held out instead).
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset, Subset

from titok_core.data import ImageFolderDataset, InMemoryImages, preprocess
from titok_core.errors import MissingFileError
from titok_core.formats import WebDatasetShards, WebDatasetTrainStream, decode_sample, has_split, open_split

log = logging.getLogger(__name__)


def first_image_side(root: Path) -> int:
    """The shorter side in pixels of the first image of the image folder ``root`` (<class>/<image>)."""
    from PIL import Image

    for path, _ in ImageFolderDataset(root, resolution=1, train=False).samples:
        try:
            with Image.open(path) as img:
                return min(img.size)
        except OSError:
            continue
    raise MissingFileError(f"no readable image in {root}")


def build_datasets(data: DictConfig, *, image_size: int, seed: int) -> tuple[Dataset, Dataset]:
    """Train images (augmented: ``data.hflip``) and a fixed random subset of ``data.val_images``
    held-out images (not augmented), each (float32 [3,R,R] in [0,1], label) with R = image_size.

    data: the ``data`` group of tokenizer.train. WebDataset shards give an endless shuffled stream
    for training (see :func:`_webdataset_datasets`). ``data.in_memory``: the training split is
    decoded once into RAM (small datasets). seed: picks the held-out images.
    """
    root, fmt = data.root, data.get("format", "auto")
    train_set = open_split(root, data.split, format=fmt, resolution=image_size, train=True, random_flip=data.hflip)
    if isinstance(train_set, WebDatasetShards):  # streamed, never held in memory
        return _webdataset_datasets(data, train_set, image_size=image_size, seed=seed)
    if data.in_memory:  # small datasets: decode once, augment (flip) on the tensor
        plain_train = open_split(root, data.split, format=fmt, resolution=image_size, train=False)
        train_set = InMemoryImages(plain_train, random_flip=data.hflip, desc=f"loading {root}")
        log.info("%d training images in memory (%d unreadable skipped)", len(train_set), train_set.num_skipped)
    g = torch.Generator().manual_seed(seed)
    if has_split(root, data.val_split, format=fmt):
        val_set = open_split(root, data.val_split, format=fmt, resolution=image_size, train=False)
        order = torch.randperm(len(val_set), generator=g).tolist()
        return train_set, Subset(val_set, order[: data.val_images])
    # No val split: hold out images of the training split (seen without augmentation).
    plain = open_split(root, data.split, format=fmt, resolution=image_size, train=False)
    if data.in_memory:
        plain = InMemoryImages(plain)
    order = torch.randperm(len(plain), generator=g).tolist()
    n_val = min(data.val_images, len(plain) // 10 or 1)
    log.warning("no %s split in %s; holding out %d training images for validation", data.val_split, root, n_val)
    return Subset(train_set, order[n_val:]), Subset(plain, order[:n_val])


def _webdataset_datasets(data: DictConfig, shards: WebDatasetShards, *, image_size: int, seed: int):
    """Streamed shards: an endless shuffled training stream, and the first ``val_images`` readable
    images of the val shards (or, without them, of the training shards, then left out of training)."""
    root, fmt, want = data.root, data.get("format", "auto"), data.val_images
    held_out = not has_split(root, data.val_split, format=fmt)
    val_shards = shards if held_out else open_split(root, data.val_split, format=fmt, resolution=image_size)
    val, names = [], set()
    for shard in range(len(val_shards)):
        for image, label, name in val_shards.samples(shard, damaged="skip"):
            item = decode_sample(image, label, name, partial(preprocess, resolution=image_size))
            if item is not None:
                val.append(item)
                names.add(name)
            if len(val) >= want:
                break
        if len(val) >= want:
            break
    if held_out:
        log.warning("no %s shards; holding out the first %d training images for validation", data.val_split, len(val))
    stream = WebDatasetTrainStream(shards, resolution=image_size, seed=seed,
                                   exclude=frozenset(names) if held_out else frozenset())
    return stream, val
