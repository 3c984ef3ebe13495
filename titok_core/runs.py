"""A run knows what it is: the identity of a training run, recorded when it starts and checked on resume.

A run directory holds ``run.json``: the dataset (:func:`dataset_identity`: root, split, format and
a cheap fingerprint of its files), the tokenizer, the model config and the recipe. A rerun of the same command finds
its record equal and resumes from ``checkpoints/last.ckpt``; a command that would continue
someone else's run (another dataset, tokenizer, model or recipe) stops with one line that names
what differs. ``resume=false`` moves the old run aside (never deletes it) and starts afresh.
A larger ``trainer.max_steps`` or ``trainer.max_time`` is a continuation, not a difference: they
are not part of the identity.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

from titok_core.checkpoints import atomic_path
from titok_core.errors import MismatchError, MissingFileError, UsageError
from titok_core.formats import dataset_name

log = logging.getLogger(__name__)
RECORD = "run.json"

# Where each built-in dataset is written unless data.builtin names it for another root.
BUILTIN_ROOTS = {"demo": "data/demo_shapes", "digits": "data/digits"}
DATA_LAYOUTS = (
    "an image folder <root>/<split>/<class>/*, a Hugging Face dataset (save_to_disk folder or <split>-*.parquet) "
    "or WebDataset shards (<split>-*.tar)"
)


class RunMismatchError(MismatchError):
    """A run directory that holds another run; the message is one line."""


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.abspath(os.fspath(a)) == os.path.abspath(os.fspath(b))


def builtin_for(root: str | os.PathLike, builtin: str | None) -> str | None:
    """The built-in dataset to write at ``root``: ``builtin`` when given, else the one whose default
    location ``root`` is (``data/demo_shapes`` -> demo), else None (the data must be there)."""
    if builtin:
        if builtin not in BUILTIN_ROOTS:
            raise UsageError(f"data.builtin must be one of {', '.join(BUILTIN_ROOTS)}, got {builtin!r}")
        return builtin
    return next((name for name, default in BUILTIN_ROOTS.items() if _same_path(root, default)), None)


def require_dataset(root: str | os.PathLike) -> None:
    """FileNotFoundError (one line) unless something is at ``root`` (a folder, a file or shards)."""
    text = os.fspath(root)
    if "{" in text or Path(text).exists():
        return
    raise MissingFileError(f"no dataset at {text}: expected {DATA_LAYOUTS}")


def default_run_dir(*, package: str, name: str, root: str | os.PathLike, builtin: str | None) -> Path:
    """``runs/<package>/<name>`` for a built-in dataset at its default place, else
    ``runs/<package>/<name>-<dataset folder>``, so one recipe on two datasets gives two runs."""
    at_home = builtin is not None and _same_path(root, BUILTIN_ROOTS[builtin])
    return Path("runs") / package / (name if at_home else f"{name}-{dataset_name(root)}")


def file_identity(path: str | os.PathLike | None) -> dict | None:
    """A model or reference file as path, size and modification time: a file retrained or replaced
    in place is another file (None for no path, or a name that is not a file, such as a preset)."""
    if path is None or not Path(os.fspath(path)).is_file():
        return None
    st = Path(os.fspath(path)).stat()
    return {"path": os.path.abspath(os.fspath(path)), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def dataset_fingerprint(root: str | os.PathLike, split: str | None = None) -> dict:
    """A cheap fingerprint of the files of a dataset: how many, and a hash of their names and sizes.

    ``<root>/<split>`` when it is a folder, else every file under ``root`` (parquet, tar shards).
    Reads no file contents, so a million-image folder takes seconds.
    """
    root_path = Path(os.fspath(root))
    base = root_path / split if split and (root_path / split).is_dir() else root_path
    if base.is_file():
        files = [(base.name, base.stat().st_size)]
    else:
        files = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for f in sorted(filenames):
                p = os.path.join(dirpath, f)
                try:
                    files.append((os.path.relpath(p, base), os.path.getsize(p)))
                except OSError:
                    continue
    return names_and_sizes_fingerprint(files)


def names_and_sizes_fingerprint(files: list[tuple[str, int]]) -> dict:
    """``{"files": count, "sha256": 16 hex digits}`` over (name, size) pairs, in the order given."""
    h = hashlib.sha256()
    for name, size in files:
        h.update(f"{name}\0{size}\n".encode())
    return {"files": len(files), "sha256": h.hexdigest()[:16]}


def urls_fingerprint(urls: list[str]) -> dict:
    """:func:`names_and_sizes_fingerprint` of listed files (shards): a local file as its base name and
    size, a remote URL (``s3://``, ``pipe:``) whole with size -1."""
    entries = []
    for url in urls:
        local = "://" not in url and not url.startswith("pipe:")
        size = os.path.getsize(url) if local and os.path.isfile(url) else -1
        entries.append((os.path.basename(url) if local else url, size))
    return names_and_sizes_fingerprint(entries)


def dataset_identity(root: str | os.PathLike, split: str | None, format: str = "auto") -> dict:
    """What a run, a token cache and an evaluation record of a dataset: ``{"root", "split", "format",
    "files", "sha256"}``.

    root: absolute (a URL or brace pattern of shards as given); format: the one it is read in
    (``auto`` detected, see :func:`titok_core.formats.resolve_format`); files and sha256: how many
    files the split is read from and a hash of their names and sizes (no contents: a million-image
    folder takes seconds). The same split of the same files gives the same identity.
    """
    from titok_core.formats import is_saved_dataset, parquet_files, resolve_format, webdataset_urls

    fmt = resolve_format(format, root)
    text = os.fspath(root)
    absolute = text if "://" in text else os.path.abspath(text)
    if fmt == "webdataset":
        files = urls_fingerprint(webdataset_urls(root, split))
    elif fmt == "hf" and not is_saved_dataset(text):  # parquet: the split's own files, as the dataset reads them
        files = urls_fingerprint([str(p) for p in parquet_files(text, split)])
    else:
        files = dataset_fingerprint(root, split)
    return {"root": absolute, "split": split, "format": fmt, **files}


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def _as_today(old: dict, new: dict, renamed: Mapping[str, str], added: Mapping[str, object] = {}) -> dict:
    """A record an earlier version wrote, flattened, in today's terms: keys renamed since (``renamed``:
    old dotted key -> new), keys added since (``added``: dotted key -> the value every earlier run had),
    and a dataset format recorded as given (``auto``) read as the detected one."""
    flat = {renamed.get(k, k): v for k, v in _flatten(old).items()}
    for key, value in added.items():
        flat.setdefault(key, value)
    if flat.get("dataset.format") == "auto" and "dataset.format" in new:
        flat["dataset.format"] = new["dataset.format"]
    return flat


def differences(old: dict, new: dict, *, renamed: Mapping[str, str] = {}, added: Mapping[str, object] = {}) -> list[str]:
    """``key (was A, now B)`` for every leaf that differs between two identity records; ``old`` is read
    in today's terms first (see :func:`start_run`)."""
    b = _flatten(new)
    a = _as_today(old, b, renamed, added)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"{key} (was {_short(a.get(key))}, now {_short(b.get(key))})")
    return out


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def start_run(
    run_dir: str | os.PathLike, identity: dict, *, resume: bool | str = "auto", renamed: Mapping[str, str] = {},
    added: Mapping[str, object] = {},
) -> bool:
    """Record ``identity`` in ``run_dir`` or check it against the record there; True when the run resumes.

    resume: "auto" (resume when the record agrees, stop with a RunMismatchError naming the
    differences when not) or False (move an existing run aside to ``<run_dir>.old-<time>`` and
    start afresh). ``identity`` must be JSON-serialisable. renamed: keys of records written
    before an option was renamed (old dotted key -> new), so that those runs still resume; added:
    keys of the identity that records written before them lack (dotted key -> the value those
    runs had), likewise; a
    dataset format recorded as ``auto`` by earlier versions counts as the detected one.
    """
    run_dir = Path(run_dir)
    record = run_dir / RECORD
    identity = json.loads(json.dumps(identity))  # tuples -> lists, as it will read back
    if resume not in ("auto", True, False):
        raise UsageError(f"resume must be auto or false, got {resume!r}")
    exists = record.is_file() or (run_dir / "checkpoints").is_dir()
    if exists and resume is False:
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        aside.mkdir()
        for entry in run_dir.iterdir():
            entry.rename(aside / entry.name)
        log.warning("resume=false: the old run is kept at %s", aside)
        exists = False
    if exists and record.is_file():
        old = json.loads(record.read_text())
        diff = differences(old, identity, renamed=renamed, added=added)
        if diff:
            raise RunMismatchError(
                f"{run_dir} holds another run: it differs in {'; '.join(diff[:3])}"
                f"{f' and {len(diff) - 3} more' if len(diff) > 3 else ''}. Pass a new name=... for a new run, "
                "or resume=false to move the old one aside"
            )
        return (run_dir / "checkpoints" / "last.ckpt").is_file()
    if exists and (run_dir / "checkpoints" / "last.ckpt").is_file():
        raise RunMismatchError(
            f"{run_dir} holds a run with no record of what it trained ({RECORD}); pass a new name=... for a new run, "
            "or resume=false to move the old one aside"
        )
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps(identity, indent=1, sort_keys=True))
    return False
