"""ImageNet as users store it: image folders, Hugging Face datasets, WebDataset shards.

One root (``data.root``) names any of them; :func:`detect_format` tells which (``data.format``,
``format=`` here, overrides it), and :func:`open_split` opens one split:

* ``"folder"`` — ``<root>/<split>/<class>/**/<image>`` (:class:`titok_core.data.ImageFolderDataset`).
* ``"hf"`` — a Hugging Face ``datasets`` image dataset with ``image`` and ``label`` columns:
  a folder written by ``save_to_disk`` (a Dataset, or a DatasetDict whose splits are picked
  by ``split``), or parquet shards (a ``.parquet`` file, a glob, or a folder holding them,
  e.g. the imagenet-1k layout ``data/train-00000-of-00294.parquet``; ``split`` picks the files
  named ``<split>-*`` or those under a ``<split>/`` folder). Class names come from the label
  feature (a ClassLabel). Both are read by row, memory-mapped or one parquet row group at a
  time, without copying the data.
* ``"webdataset"`` — ``.tar`` shards given as a brace pattern (``train-{0000..1023}.tar``), a
  single ``.tar``, or a folder of them (``split`` picks ``<split>-*.tar``); samples are the
  members ``<key>.jpg`` (or another image extension) and ``<key>.cls`` (the label as text),
  as the official converter writes them. Shards are streamed, never indexed: readers take
  whole shards (:class:`WebDatasetShards`). Tar shards carry no class names.

Every format decodes images with :func:`titok_core.data.load_image_rgb` and the same
preprocessing, so the same image bytes give the same tensor in every format; unreadable
images (or samples without an image or label) are skipped and counted, with one warning line
naming the file, or the shard and the sample (``<shard>.parquet[<row>]``, ``<shard>.tar:<key>``).

Damaged shards (a download cut short, a disk error) are not images, and each format says so
in one line naming the shard (:class:`ShardError`):

* parquet: the row index lives in the footer at the end of the file, so a cut file cannot be
  opened at all; it stops the job when the dataset is opened, before any work is spent, and a
  row group that cannot be read stops it when reached. Going on without the shard would make a
  dataset silently smaller (a token cache with a class missing rows, an rFID over fewer images)
  and the fix is to fetch one file again.
* WebDataset tar: shards are streamed, so a cut is met only when reading reaches it (a file
  that ends inside a member, or without the tar end-of-archive block; streams that are not
  local files are checked for the former only). :meth:`WebDatasetShards.samples` stops there
  by default (``damaged="stop"``): the token cache and rFID read every sample of every shard
  and must not come out silently shorter. The endless training stream
  (:class:`WebDatasetTrainStream`) skips the rest of that shard instead (``damaged="skip"``,
  one warning line per shard saying so): for training, an epoch with a shard's tail missing is
  harmless. The samples before the cut are used; the sample in which the cut falls is dropped.

One file (over 500 lines) on purpose: the three formats share detection, split selection,
decoding and the damaged-shard rules above, and read best side by side.
"""
from __future__ import annotations

import bisect
import glob
import logging
import os
import random
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from titok_core.data import (
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    ImageRecordsDataset,
    _warn_once,
    load_image_rgb,
    preprocess,
)
from titok_core.errors import BadFileError, MissingFileError, UsageError

log = logging.getLogger(__name__)

FORMATS = ("folder", "hf", "webdataset")
SPLIT_ALIASES = {"val": "validation", "validation": "val"}  # imagenet-1k on the Hub says "validation"
_IMAGE_KEYS = tuple(e.lstrip(".") for e in sorted(IMAGE_EXTENSIONS))
DAMAGED = ("stop", "skip")


class ShardError(BadFileError):
    """A shard that cannot be read to its end (see the module docstring); the message is one line,
    also when it was raised in a DataLoader worker (see :class:`titok_core.errors.UserError`)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------- detection


def _is_brace_pattern(root: str) -> bool:
    return "{" in root and "}" in root


def detect_format(root: str | os.PathLike) -> str:
    """Which of :data:`FORMATS` ``root`` is; FileNotFoundError when it is none of them."""
    root = str(root)
    if _is_brace_pattern(root) or root.endswith(".tar"):
        return "webdataset"
    if root.endswith(".parquet") or (glob.has_magic(root) and not os.path.exists(root)):
        return "hf"
    path = Path(root)
    if not path.is_dir():
        raise MissingFileError(f"no dataset at {root}")
    if is_saved_dataset(path):
        return "hf"
    if any(path.glob("*.tar")):
        return "webdataset"
    if any(path.rglob("*.parquet")):
        return "hf"
    return "folder"


def resolve_format(format: str, root: str | os.PathLike) -> str:
    """``format`` (``data.format``: auto or one of :data:`FORMATS`) -> the format ``root`` is read in:
    auto detects it (:func:`detect_format`); another name is checked and kept."""
    if format == "auto":
        return detect_format(root)
    if format not in FORMATS:
        raise UsageError(f"data.format must be auto or one of {', '.join(FORMATS)}, got {format!r}")
    return format


def _split_files(files: list[Path], split: str | None, root: Path) -> list[Path]:
    """Files of one split: named ``<split>-*``/``<split>_*`` or under a ``<split>/`` folder."""
    if split is None:
        return files
    for name in (split, SPLIT_ALIASES.get(split)):
        if name is None:
            continue
        picked = [f for f in files if f.name.startswith((f"{name}-", f"{name}_", f"{name}."))
                  or name in f.relative_to(root).parts[:-1]]
        if picked:
            return picked
    return []


# ---------------------------------------------------------------------------- Hugging Face datasets


def _image_cell(cell, name: str):
    """An ``image`` value (a datasets Image struct {bytes, path}) -> bytes or a path, or None."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        return cell.get("path") or None
    if isinstance(cell, (bytes, str)):
        return cell
    return None


def _class_names(features) -> list[str]:
    from datasets import ClassLabel

    label = features.get("label") if features is not None else None
    return list(label.names) if isinstance(label, ClassLabel) else []


def _check_columns(columns, where: str) -> None:
    missing = [c for c in ("image", "label") if c not in columns]
    if missing:
        raise BadFileError(f"{where} has no {' or '.join(missing)} column (columns: {', '.join(columns)})")


class ArrowRecords:
    """Rows of a ``save_to_disk`` Dataset (memory-mapped) as (bytes or path, label, name)."""

    def __init__(self, dataset, where: str):
        from datasets import Image

        _check_columns(dataset.column_names, where)
        self.where = where
        self.classes = _class_names(dataset.features)
        # Undecoded image structs, so decoding (and bad-image handling) is ours.
        self.dataset = dataset.select_columns(["image", "label"]).cast_column("image", Image(decode=False))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        row = self.dataset[int(i)]
        name = f"{self.where}[{i}]"
        return _image_cell(row["image"], name), int(row["label"]), name


class ParquetRecords:
    """Rows of parquet shards as (bytes or path, label, name), read one row group at a time."""

    def __init__(self, files: list[Path]):
        import pyarrow.parquet as pq
        from datasets import Features

        self.files = [str(f) for f in files]
        self.starts, self.groups = [], []  # global first row of each row group, (file, group)
        self.file_starts = []  # global first row of each file
        total, classes = 0, None
        for fi, f in enumerate(self.files):
            self.file_starts.append(total)
            try:
                pf = pq.ParquetFile(f)
            except Exception as exc:  # noqa: BLE001 - pyarrow's errors: ArrowInvalid, OSError, ...
                raise ShardError(
                    f"parquet shard {f} cannot be opened, it is truncated or not a parquet file ({_first_line(exc)}); "
                    "stopping: fetch it again (without it the dataset would be silently smaller)"
                ) from None
            _check_columns(pf.schema_arrow.names, f)
            if classes is None:
                try:  # the ClassLabel names that datasets writes into the schema metadata
                    classes = _class_names(Features.from_arrow_schema(pf.schema_arrow))
                except Exception:  # noqa: BLE001 - parquet written by another tool: no names
                    classes = []
            for g in range(pf.metadata.num_row_groups):
                self.starts.append(total)
                self.groups.append((fi, g))
                total += pf.metadata.row_group(g).num_rows
        self.num_rows, self.classes = total, classes or []
        self._cached = None  # ((file, group), rows) of this process

    def __getstate__(self):
        return {**self.__dict__, "_cached": None}

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, i: int):
        import pyarrow.parquet as pq

        if not 0 <= i < self.num_rows:
            raise IndexError(i)
        k = bisect.bisect_right(self.starts, i) - 1
        if self._cached is None or self._cached[0] != self.groups[k]:
            fi, g = self.groups[k]
            try:
                table = pq.ParquetFile(self.files[fi]).read_row_group(g, columns=["image", "label"])
            except Exception as exc:  # noqa: BLE001 - pyarrow's errors: ArrowInvalid, OSError, ...
                raise ShardError(
                    f"parquet shard {self.files[fi]} is damaged: row group {g} (from row "
                    f"{self.starts[k] - self.file_starts[fi]}) cannot be read ({_first_line(exc)}); "
                    "stopping: fetch it again"
                ) from None
            self._cached = (self.groups[k], table.column("image").to_pylist(), table.column("label").to_pylist())
        _, images, labels = self._cached
        j, fi = i - self.starts[k], self.groups[k][0]
        name = f"{self.files[fi]}[{i - self.file_starts[fi]}]"
        return _image_cell(images[j], name), int(labels[j]), name


def is_saved_dataset(root: str | os.PathLike) -> bool:
    """Whether ``root`` is a Hugging Face ``save_to_disk`` folder (a DatasetDict or one Dataset)."""
    path = Path(os.fspath(root))
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def parquet_files(root: str | os.PathLike, split: str | None) -> list[Path]:
    """The parquet shards of ``split`` that a Hugging Face dataset at ``root`` is read from: the file
    itself, the split's files under a folder, or the files a glob pattern names; [] when none."""
    root_s = os.fspath(root)
    path = Path(root_s)
    if path.is_file():
        return [path]
    if path.is_dir():
        return _split_files(sorted(path.rglob("*.parquet")), split, path)
    return [Path(f) for f in sorted(glob.glob(root_s, recursive=True)) if f.endswith(".parquet")]


def open_hf_records(root: str | os.PathLike, split: str | None):
    """A Hugging Face dataset split -> ArrowRecords or ParquetRecords; FileNotFoundError if absent."""
    root_s = str(root)
    if is_saved_dataset(root_s):
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(root_s)
        if isinstance(ds, DatasetDict):
            names = [n for n in (split, SPLIT_ALIASES.get(split)) if n in ds] if split else list(ds)
            if not names or (split is None and len(ds) > 1):
                raise MissingFileError(
                    f"Hugging Face dataset {root_s} has no split {split!r} (splits: {', '.join(ds)}); pass data.split=..."
                )
            return ArrowRecords(ds[names[0]], f"{root_s}:{names[0]}")
        return ArrowRecords(ds, root_s)
    files = parquet_files(root_s, split)
    if not files:
        raise MissingFileError(f"no parquet files{f' of split {split!r}' if split else ''} at {root_s}")
    return ParquetRecords(files)


# ---------------------------------------------------------------------------- WebDataset


def webdataset_urls(root: str | os.PathLike, split: str | None) -> list[str]:
    """The shards a brace pattern, a .tar or a folder of .tar files names, in order."""
    from braceexpand import braceexpand

    root = str(root)
    if _is_brace_pattern(root) or root.endswith(".tar"):
        urls = list(braceexpand(root))
        missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
        if missing:
            raise MissingFileError(f"{len(missing)} of {len(urls)} WebDataset shard(s) not found, e.g. {missing[0]}")
        return urls
    path = Path(root)
    urls = [str(p) for p in _split_files(sorted(path.glob("*.tar")), split, path)] if path.is_dir() else []
    if not urls:
        raise MissingFileError(f"no .tar shards{f' of split {split!r}' if split else ''} at {root}")
    return urls


class _Cut(Exception):
    """A tar stream that ends early or breaks; the message says how."""


_TAR_META = re.compile(r"__[^/]*__($|/)")  # WebDataset's metadata members, not samples
_TAR_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # key = the name up to the first dot of its last part


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _tar_files(url: str) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of each regular file of a tar shard, in order; raises _Cut when the
    archive is cut short or damaged. Python's tarfile ends quietly at a block that is not a
    header; a local, uncompressed file is therefore also checked for the end-of-archive block."""
    if _is_local(url):
        stream = open(url, "rb")
    else:
        from webdataset.gopen import gopen

        stream = gopen(url, "rb")
    with stream:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
            while (info := tar.next()) is not None:
                if info.isreg() and not _TAR_META.match(info.name):
                    data = tar.extractfile(info).read()
                    yield info.name, data
                tar.members = []  # a streamed archive would otherwise keep every header
        except (tarfile.TarError, OSError, EOFError) as exc:
            reason = _first_line(exc)
            raise _Cut("the file ends inside a tar header" if reason in ("empty header", "truncated header")
                       else reason) from None
        end = tar.offset
    if _is_local(url):
        with open(url, "rb") as f:
            compressed = f.read(6).startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ"))
            f.seek(end)
            block = f.read(tarfile.BLOCKSIZE)
        if not compressed and (len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE):
            raise _Cut("the file ends before the tar end-of-archive block" if len(block) < tarfile.BLOCKSIZE
                       else f"no tar header at byte {end}")


class WebDatasetShards:
    """WebDataset ``.tar`` shards, streamed one shard at a time.

    :meth:`samples` yields (image bytes or None, label or None, name) in the shard's order;
    a sample without an image or a ``.cls`` label yields None for it (the caller skips and
    counts it). ``classes`` is [] (tar shards carry no class names).
    """

    def __init__(self, urls: list[str], root: str):
        self.urls, self.root, self.classes = list(urls), str(root), []

    def __len__(self) -> int:
        return len(self.urls)

    def samples(self, shard: int, *, damaged: str = "stop") -> Iterator[tuple[bytes | None, int | None, str]]:
        """The samples of tar ``shard`` as (image bytes or None, label or None, ``<url>:<key>``).

        Members are grouped into samples by key as WebDataset does (``<key>.<ext>``, the
        extension lower-cased). A shard cut short or damaged (see the module docstring): with
        ``damaged="stop"`` raise :class:`ShardError`; with ``"skip"`` warn once (one line naming
        the shard and where it breaks) and end this shard's samples there.
        """
        if damaged not in DAMAGED:
            raise ValueError(f"damaged must be one of {', '.join(DAMAGED)}, got {damaged!r}")
        url = self.urls[shard]
        key, members, done = None, {}, 0
        try:
            for fname, data in _tar_files(url):
                match = _TAR_KEY.match(fname)
                if match is None:
                    continue
                prefix, suffix = match.group(1), match.group(2).lower()
                if prefix != key:
                    if members:
                        yield self._sample(url, key, members)
                        done += 1
                    key, members = prefix, {}
                members.setdefault(suffix, data)
        except _Cut as cut:
            where = f"in or after sample {key}" if key is not None else "before its first sample"
            what = f"WebDataset shard {url} is truncated or damaged {where} ({done} samples read before): {cut}"
            if damaged == "skip":
                _warn_once(url, "%s; skipping the rest of this shard", what, logger=log)
                return
            raise ShardError(f"{what}; stopping rather than going on with a silently shorter dataset "
                             "(fetch or write the shard again)") from None
        if members:
            yield self._sample(url, key, members)

    @staticmethod
    def _sample(url: str, key: str, members: dict) -> tuple[bytes | None, int | None, str]:
        image = next((members[k] for k in _IMAGE_KEYS if k in members), None)
        label = members.get("cls")
        try:
            label = int(label.decode()) if label is not None else None
        except (ValueError, UnicodeDecodeError):
            label = None
        return image, label, f"{url}:{key}"

    def decoded(self, shard: int, transform) -> Iterator[tuple[object, int] | None]:
        """(transform(RGB image), label) per sample of ``shard``, or None for a bad sample."""
        for image, label, name in self.samples(shard):
            yield decode_sample(image, label, name, transform)


def decode_sample(image: bytes | None, label: int | None, name: str, transform):
    """One streamed sample -> (transform(RGB image), label), or None (with a warning) when bad."""
    if image is None or label is None:
        _warn_once(name, "skipping %s: %s", name, "no image member" if image is None else "no .cls label", logger=log)
        return None
    img = load_image_rgb(image, name=name)  # warns when unreadable
    return None if img is None else (transform(img), label)


class WebDatasetTrainStream(IterableDataset):
    """Endless training stream over WebDataset shards: (float [3,R,R], label), or None for a bad sample.

    Each epoch, this process's shards (rank r of W takes shards i % W == r, DataLoader worker w
    of K takes every K-th of those) are shuffled, and samples pass through a shuffle buffer.
    Samples whose name is in ``exclude`` (held-out validation images) are skipped. A damaged
    shard is read up to the damage, with one warning (see the module docstring).
    ``num_skipped``: the distinct bad samples met so far by this rank (all its DataLoader
    workers together: the counts live in shared memory), each counted once however many epochs.
    """

    def __init__(self, shards: WebDatasetShards, *, resolution: int, random_crop: bool = False,
                 random_flip: bool = True, buffer_size: int = 1000, seed: int = 0, exclude: frozenset = frozenset()):
        self.shards, self.resolution = shards, resolution
        self.random_crop, self.random_flip = random_crop, random_flip
        self.buffer_size, self.seed, self.exclude = buffer_size, seed, exclude
        self.classes = shards.classes
        self._bad = torch.zeros(len(shards), dtype=torch.int64).share_memory_()  # bad samples per shard

    @property
    def num_skipped(self) -> int:
        return int(self._bad.sum())

    def _mine(self) -> list[int]:
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = list(range(rank, len(self.shards), world))[wid::nworkers]
        if not mine:  # more processes than shards: share them rather than idle
            mine = [(rank * nworkers + wid) % len(self.shards)]
        return mine

    def __iter__(self):
        info = get_worker_info()
        rng = random.Random(self.seed * 1_000_003 + (info.id if info is not None else 0))
        gen = torch.Generator().manual_seed(rng.getrandbits(62))

        def transform(img):
            return preprocess(img, self.resolution, train=True, random_crop=self.random_crop,
                              random_flip=self.random_flip, generator=gen)

        buffer: list = []
        cap, mine = self.buffer_size, self._mine()
        while True:
            order, seen = mine[:], 0
            rng.shuffle(order)
            for shard in order:
                bad = 0
                for image, label, name in self.shards.samples(shard, damaged="skip"):
                    if name in self.exclude:
                        continue
                    seen += 1
                    item = decode_sample(image, label, name, transform)
                    if item is None:
                        bad += 1
                        if bad > self._bad[shard]:  # each pass meets the same samples: count them once
                            self._bad[shard] = bad
                    buffer.append(item)
                    if len(buffer) > cap:
                        k = rng.randrange(len(buffer))
                        buffer[k], buffer[-1] = buffer[-1], buffer[k]
                        yield buffer.pop()
            if seen == 0:
                raise BadFileError(f"no training samples in the WebDataset shards of {self.shards.root}")
            cap = min(cap, len(buffer) - 1)  # fewer samples than the buffer holds: shuffle what there is


# ---------------------------------------------------------------------------- one entry point


def open_split(
    root: str | os.PathLike, split: str | None = None, *, format: str = "auto", resolution: int,
    train: bool = False, random_crop: bool = False, random_flip: bool | None = None, transform=None,
):
    """One split of any format -> a map-style dataset or, for WebDataset, :class:`WebDatasetShards`.

    Map-style (folder, hf): an :class:`~titok_core.data.ImageRecordsDataset` giving
    (float32 [3,R,R] in [0,1] — or ``transform(PIL image)`` — , label int) or None for an
    unreadable image, with ``classes`` and ``num_skipped``. ``split`` None: ``root`` itself is
    the split (a class-folder tree, a single Dataset, parquet files, shards). ``format``: see
    :func:`resolve_format`; the dataset's ``format`` attribute says which was read. Raises
    MissingFileError when the split is not there.
    """
    fmt = resolve_format(format, root)
    kwargs = dict(resolution=resolution, train=train, random_crop=random_crop, random_flip=random_flip,
                  transform=transform)
    if fmt == "folder":
        folder = Path(root) / split if split else Path(root)
        if not folder.is_dir():
            raise MissingFileError(f"no image folder at {folder} (expected <root>/<split>/<class>/*)")
        dataset = ImageFolderDataset(folder, **kwargs)
    elif fmt == "hf":
        records = open_hf_records(root, split)
        if len(records) == 0:
            raise MissingFileError(f"no rows in the Hugging Face dataset at {root}")
        dataset = ImageRecordsDataset(records, classes=records.classes, **kwargs)
        dataset.root = str(root)
    else:
        dataset = WebDatasetShards(webdataset_urls(root, split), str(root))
    dataset.format = fmt
    return dataset


def dataset_name(root: str | os.PathLike) -> str:
    """A short name for a dataset root: its folder name; a brace pattern's or a file's parent folder
    name. The same before and after the folder exists (a built-in dataset is written later)."""
    text = os.fspath(root)
    path = Path(text)
    if "{" in text or path.is_file() or (path.suffix and not path.is_dir()):
        return path.parent.name or "data"
    return path.name or "data"


def has_split(root: str | os.PathLike, split: str, *, format: str = "auto") -> bool:
    """Whether ``root`` is organised by splits and has ``split`` (a folder ``<root>/<split>``, a
    DatasetDict split, parquet or tar files named for it)."""
    try:
        fmt = resolve_format(format, root)
    except FileNotFoundError:
        return False
    if fmt == "folder":
        return (Path(root) / split).is_dir()
    path = Path(str(root))
    if not path.is_dir():  # a pattern, a glob or a file is one split
        return False
    if fmt == "hf" and (path / "dataset_dict.json").is_file():
        from datasets import load_from_disk

        names = list(load_from_disk(str(path)))
        return split in names or SPLIT_ALIASES.get(split) in names
    if fmt == "hf" and (path / "state.json").is_file():
        return False
    files = sorted(path.rglob("*.parquet")) if fmt == "hf" else sorted(path.glob("*.tar"))
    return bool(_split_files(files, split, path))
