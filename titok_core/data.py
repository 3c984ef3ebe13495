"""Image folders for ImageNet and the demo alike: robust loading, official preprocessing, datasets.

Layout: ``<split>/<class>/**/<image>``; classes are the sorted subfolder names, so the ImageNet
``train/<wnid>/*.JPEG`` tree gives wnids -> 0..999 in sorted order, and the demo's
``00_red_circle``... folders give their class ids.

Preprocessing is the official one (``data/webdataset_reader.py``, ``ImageTransform``): resize the
shorter side to ``resolution`` (PIL bicubic, which is antialiased), centre crop (or random crop
when training), random horizontal flip when training, and a float tensor in [0, 1]. It is written
with PIL and torch only and pinned to torchvision's transforms by a test. The official training
configs set ``resize_shorter_edge == crop_size``, which is the only case this module implements.

Bad files never crash a run:

- readable oddities are converted to RGB: grayscale, CMYK, palette, 16-bit ('I;16', and 'I' with
  values above 255, scaled by 1/257), float ('F' in [0, 1] scaled by 255);
  transparency (RGBA, LA, P or L with a transparent colour) is composited on white, so transparent
  areas look like an empty page rather than whatever colour the file stores under alpha 0;
  images smaller than the crop are upscaled by the resize. EXIF orientation is not applied
  (neither official nor torchvision's ImageFolder do).
- unreadable files (not an image, corrupt, truncated, decompression bomb) make
  :func:`load_image_rgb` return None with one warning line per file per process
  (``skipping unreadable image <file>: <why>``); :class:`ImageFolderDataset` (and every
  :class:`ImageRecordsDataset`) then returns None for that index and counts the file in
  ``num_skipped``, and :func:`collate_skip_bad` drops the Nones from the batch. A truncated file
  is skipped rather than half decoded (the rest grey), as the official reader does (PIL refuses
  it and WebDataset's handler skips the sample): a partly grey image would enter the training
  data or the rFID reference unnoticed. (A caller that set PIL's ``LOAD_TRUNCATED_IMAGES`` gets
  PIL's lenient decoding instead.)
- a class folder without images keeps its label, with one warning line naming it: labels are the
  positions of the sorted folder names, so dropping it would shift every later class by one (an
  ImageNet tree with one empty wnid folder would then label 'n01443537' as class 0), and a
  generator or classifier trained on such labels would silently disagree with everything else.

The other stores of ImageNet (Hugging Face datasets, WebDataset shards) are read by
:mod:`titok_core.formats` through the same loading and preprocessing.
"""
from __future__ import annotations

import glob
import io
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import ConcatDataset, Dataset, Subset, default_collate

from titok_core.errors import MissingFileError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
_warned: set[str] = set()  # paths already warned about in this process


def _warn_once(path: str, message: str, *args, logger: logging.Logger | None = None) -> None:
    """Log one warning about ``path`` (a file, a shard, a sample name), once per process."""
    if path not in _warned:
        _warned.add(path)
        (logger or log).warning(message, *args)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> a new 8-bit 'RGB' image (see the module docstring for each mode)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img).astype(np.float64)
        if img.mode != "I" or a.max() > 255:  # 16-bit samples; 'I' with small values is already 8-bit range
            a = a / 257.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        a = np.asarray(img).astype(np.float64)
        a = a * 255.0 if a.max() <= 1.0 else a
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image_rgb(path: str | os.PathLike | bytes, *, name: str | None = None) -> Image.Image | None:
    """Open any image file (a path, or its bytes) as an 8-bit 'RGB' PIL image, or None (with one
    warning naming ``name``, default the path) when unreadable."""
    source = path
    path = name if name is not None else ("<bytes>" if isinstance(source, bytes) else str(source))

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as im:
            im.load()
            return to_rgb(im)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, DecompressionBombError...)
        _warn_once(path, "skipping unreadable image %s: %s", path, _why_unreadable(e))
        return None


def _why_unreadable(exc: BaseException) -> str:
    """One short phrase for why Pillow could not read a file."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file (or a damaged header)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return "the file is truncated or damaged"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def preprocess(
    img: Image.Image, resolution: int, *, train: bool = False, random_crop: bool = False,
    random_flip: bool | None = None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PIL image (any mode, any size) -> float32 [3, resolution, resolution] in [0, 1].

    Resize the shorter side to ``resolution`` (bicubic), then centre crop; when ``train``, crop at
    random instead if ``random_crop`` and flip left-right with p=0.5 if ``random_flip`` (default:
    when ``train``). Random draws use ``generator`` (default: torch's global one) in torchvision's
    order, so with the same seed this equals the official ``ImageTransform`` exactly.
    Evaluation (``train=False``) is deterministic; asking it for augmentation raises ValueError.
    """
    if random_flip is None:
        random_flip = train
    if not train and (random_crop or random_flip):
        raise ValueError("random_crop/random_flip are training augmentations: pass train=True")
    if img.mode != "RGB":
        img = to_rgb(img)
    w, h = img.size
    if w <= h:
        size = (resolution, int(resolution * h / w))  # (w, h), torchvision's rounding
    else:
        size = (int(resolution * w / h), resolution)
    if size != (w, h):
        img = img.resize(size, Image.Resampling.BICUBIC)
    w, h = size
    if train and random_crop and (w, h) != (resolution, resolution):
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
    else:
        top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
    if (left, top, w, h) != (0, 0, resolution, resolution):
        img = img.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    x = x.to(torch.float32).div(255)  # (3, R, R)
    if train and random_flip and torch.rand(1, generator=generator) < 0.5:
        x = x.flip(-1)
    return x


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _scan(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive, hidden entries skipped), sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.join(dirpath, f) for f in filenames if _is_image(f))
    return sorted(found)


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Every image file under ``folder``, recursively, sorted by path (so runs and ranks agree).

    The one rule every reader of an image folder uses (:class:`ImageFolderDataset` in each class
    folder, :func:`list_images`, rFID, reference statistics, the demo classifier), so that they
    all count the same images: a file whose extension is in ``IMAGE_EXTENSIONS`` (any case), and
    nothing hidden. Files and folders whose name starts with "." are skipped: macOS's
    ``._photo.jpg`` resource forks and the copies in ``.ipynb_checkpoints`` are not images of the
    set (the first do not even decode). Links to folders are followed.
    """
    return [Path(p) for p in _scan(os.fspath(folder))]


def list_images(path_or_paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Files and folders (and glob patterns) -> image files, in the order given, each folder sorted.

    Folders are searched recursively for the known extensions (case-insensitive); a file named
    explicitly is kept whatever its extension. A path that matches nothing raises FileNotFoundError.
    """
    items = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    out: dict[Path, None] = {}  # ordered, without duplicates
    for item in items:
        item = os.path.expanduser(str(item))
        matches = [item] if os.path.exists(item) else sorted(glob.glob(item, recursive=True))
        if not matches:
            raise MissingFileError(f"no such file or folder: {item}")
        for m in matches:
            for f in _scan(m) if os.path.isdir(m) else [m]:
                out[Path(f)] = None
    return list(out)


class ImageRecordsDataset(Dataset):
    """Image records -> (float32 [3, R, R] in [0, 1], label int), or None for an unreadable image.

    ``records`` is any sequence whose item i is ``(path or encoded bytes, label, name)`` (an image
    folder's files, the rows of a Hugging Face dataset). ``num_skipped`` counts distinct
    unreadable images met so far, in all DataLoader workers together (the flags live in shared
    memory). Use :func:`collate_skip_bad` as the DataLoader's ``collate_fn``. Augmentation as
    :func:`preprocess`; ``transform`` (PIL RGB image -> tensor) replaces that preprocessing.
    """

    def __init__(
        self, records, *, classes: list[str], resolution: int, train: bool, random_crop: bool = False,
        random_flip: bool | None = None, transform=None,
    ):
        self.records, self.classes = records, list(classes)
        self.resolution, self.train = int(resolution), bool(train)
        self.random_crop = bool(random_crop)
        self.random_flip = self.train if random_flip is None else bool(random_flip)
        self.transform = transform
        if not self.train and (self.random_crop or self.random_flip):
            raise ValueError("random_crop/random_flip are training augmentations: pass train=True")
        self._bad = torch.zeros(len(records), dtype=torch.bool).share_memory_()

    @property
    def num_skipped(self) -> int:
        return int(self._bad.sum())

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        if self._bad[index]:
            return None
        source, label, name = self.records[index]
        img = load_image_rgb(source, name=name) if source is not None else None
        if img is None:
            if source is None:
                _warn_once(name, "skipping %s: no image", name)
            self._bad[index] = True
            return None
        if self.transform is not None:
            return self.transform(img), int(label)
        x = preprocess(
            img, self.resolution, train=self.train, random_crop=self.random_crop, random_flip=self.random_flip
        )
        return x, int(label)


class _FolderRecords:
    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[str, int, str]:
        path, label = self.samples[i]
        return path, label, path


class ImageFolderDataset(ImageRecordsDataset):
    """``root/<class>/**/<image>`` -> (float32 [3, R, R] in [0, 1], label int), or None for a bad file.

    ``classes`` are the sorted subfolder names (label = index); ``samples`` is a list of
    (path str, label) sorted by class then path. Otherwise as :class:`ImageRecordsDataset`.
    """

    def __init__(
        self, root: str | os.PathLike, *, resolution: int, train: bool, random_crop: bool = False,
        random_flip: bool | None = None, transform=None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingFileError(f"no image folder at {self.root}")
        classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise MissingFileError(f"no class folders in {self.root} (expected {self.root}/<class>/<image>)")
        found = [_scan(str(self.root / c)) for c in classes]
        self.samples = [(p, label) for label, files in enumerate(found) for p in files]
        if not self.samples:
            raise MissingFileError(f"no images in the class folders of {self.root}")
        for label, (c, files) in enumerate(zip(classes, found)):
            if not files:  # keeps its label: see the module docstring
                folder = str(self.root / c)
                _warn_once(folder, "class folder %s has no images; it keeps its label %d (of %d classes)",
                           folder, label, len(classes))
        super().__init__(
            _FolderRecords(self.samples), classes=classes, resolution=resolution, train=train,
            random_crop=random_crop, random_flip=random_flip, transform=transform,
        )

    def __repr__(self) -> str:
        return (f"ImageFolderDataset({str(self.root)!r}, {len(self.classes)} classes, {len(self)} images, "
                f"resolution={self.resolution}, train={self.train}, random_crop={self.random_crop}, "
                f"random_flip={self.random_flip})")


class InMemoryImages(Dataset):
    """A small dataset decoded once into one uint8 tensor, so training spends no time on decoding.

    ``dataset`` items are (float [3,R,R] in [0,1], label) or None (skipped and counted in
    ``num_skipped``); it should be a non-augmenting dataset. Items come back as (float32
    [3,R,R] in [0,1], label int), flipped left-right with p=0.5 when ``random_flip``. At 64x64
    an image takes 12 KB, so 60k images fit in 0.7 GB.
    """

    def __init__(self, dataset: Dataset, *, random_flip: bool = False, desc: str = "loading images"):
        from tqdm import tqdm

        images, labels = [], []
        for i in tqdm(range(len(dataset)), desc=desc, unit="img", mininterval=2.0, leave=False):
            item = dataset[i]
            if item is None:
                continue
            images.append((item[0] * 255).round().to(torch.uint8))
            labels.append(int(item[1]))
        if not images:
            raise MissingFileError(f"no readable images in {dataset!r}")
        self.images = torch.stack(images)  # (N, 3, R, R) uint8
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.num_skipped = len(dataset) - len(images)
        self.random_flip = random_flip
        self.classes = getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].float() / 255.0
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[index])


def count_skipped(dataset) -> int | None:
    """How many unreadable images ``dataset`` has skipped so far (a Subset or ConcatDataset is
    looked through); None when it does not count them."""
    if isinstance(dataset, Subset):
        return count_skipped(dataset.dataset)
    if isinstance(dataset, ConcatDataset):
        counts = [count_skipped(d) for d in dataset.datasets]
        return None if any(c is None for c in counts) else sum(counts)
    n = getattr(dataset, "num_skipped", None)
    return None if n is None else int(n)


def collate_skip_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """DataLoader collate that drops None items (unreadable images) and stacks the rest.

    [(float [3,R,R], int), ..., None, ...] -> (images float [B',3,R,R], labels int64 [B']), where
    B' = len(batch) - dropped; the dropped count is len(batch) - B', and the dataset's
    ``num_skipped`` keeps the total. A batch with no readable image at all comes back as None:
    a training step must skip it.
    """
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    return default_collate(kept)
