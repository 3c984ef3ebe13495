"""Reading a finished cache checks it: against what asks for it (tokenizer, resolution, flips,
dataset) and against its own manifest (tokens.npy and labels.npy whole, of the shape and dtype
it says). Every refusal is one line (CacheMismatchError)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from generator.cache.identity import FORMAT
from titok_core.errors import MismatchError, MissingFileError

log = logging.getLogger(__name__)


class CacheMismatchError(MismatchError):
    """A cache made by another tokenizer, for another resolution or from another dataset, or whose
    files do not match its manifest; one-line message."""


def _read_npy_header(path: Path) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, bytes the array should take in the file) of a .npy file, reading its header only."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unknown .npy version {version}")
        offset = f.tell()
    return shape, dtype, offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _check_array(path: Path, *, dtype, shape: tuple) -> None:
    """CacheMismatchError (one line naming ``path``) unless it is a whole .npy of ``dtype`` and ``shape``."""
    if not path.is_file():
        raise CacheMismatchError(f"token cache file {path} is missing (the manifest says the cache is finished); "
                                 "delete the cache directory and build it again")
    try:
        got_shape, got_dtype, want_size = _read_npy_header(path)
    except Exception as exc:  # noqa: BLE001 - any header the reader refuses is a bad file
        raise CacheMismatchError(f"token cache file {path} is not a readable .npy ({exc}); "
                                 "delete the cache directory and build it again") from None
    problems = []
    if got_dtype != np.dtype(dtype):
        problems.append(f"dtype {got_dtype}, the manifest says {np.dtype(dtype)}")
    if tuple(got_shape) != tuple(shape):
        problems.append(f"shape {tuple(got_shape)}, the manifest says {tuple(shape)}")
    size = path.stat().st_size
    if not problems and size != want_size:
        problems.append(f"{size} bytes, its header says {want_size}" + (" (truncated)" if size < want_size else ""))
    if problems:
        raise CacheMismatchError(f"token cache file {path} does not match its manifest: {'; '.join(problems)}; "
                                 "delete the cache directory and build it again")


def check_cache(
    out_dir: str | os.PathLike, *, fingerprint: str | None = None, resolution: int | None = None,
    flip: bool | None = None, data: dict | None = None,
) -> dict:
    """Read a finished cache's manifest; refuse one made by another tokenizer, resolution, flip
    setting or dataset (``data``: a :func:`dataset_identity`), and one whose tokens.npy / labels.npy
    are missing, truncated, or of another shape or dtype than the manifest says. Returns the manifest."""
    out_dir = Path(out_dir)
    path = out_dir / "manifest.json"
    if not path.is_file():
        raise MissingFileError(f"no finished token cache at {out_dir} (manifest.json missing)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CacheMismatchError(f"token cache manifest {path} is not readable JSON ({exc}); "
                                 "delete the cache directory and build it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise CacheMismatchError(f"{out_dir} is not a {FORMAT} cache (format {got!r})")
    made_by = manifest["tokenizer"]["fingerprint"]
    if fingerprint is not None and made_by != fingerprint:
        raise CacheMismatchError(
            f"token cache {out_dir} was made by another tokenizer ({manifest['tokenizer']['source']}, "
            f"fingerprint {made_by}, this one {fingerprint}); use another cache.dir or delete it"
        )
    if resolution is not None and manifest["resolution"] != resolution:
        raise CacheMismatchError(
            f"token cache {out_dir} was made at resolution {manifest['resolution']}, not {resolution}"
        )
    if flip is not None and manifest.get("flip", True) != flip:
        raise CacheMismatchError(
            f"token cache {out_dir} was made with data.hflip={str(manifest.get('flip', True)).lower()}, "
            f"not data.hflip={str(flip).lower()}"
        )
    if data is not None:
        made_from = manifest.get("data")
        if made_from is None:
            log.warning("token cache %s does not record its dataset (made before caches did, or from data not read "
                        "from files): it is checked for the tokenizer, resolution and flips only", out_dir)
        else:
            refuse_other_dataset(made_from, data, where=f"token cache {path} was made from another dataset")
    _check_array(out_dir / "tokens.npy", dtype=np.uint16,
                 shape=(manifest["num_sequences"], manifest["num_tokens"]))
    _check_array(out_dir / "labels.npy", dtype=np.int32, shape=(manifest["num_sequences"],))
    return manifest


def refuse_other_dataset(old: dict, new: dict, *, where: str) -> None:
    """CacheMismatchError naming every field of two dataset identities that differs (paths whole)."""
    diff = [f"{k} (was {old.get(k)}, now {new.get(k)})" for k in ("root", "split", "format", "files", "sha256")
            if old.get(k) != new.get(k)]
    diff += [f"{k} (was {old.get(k)}, now {new.get(k)})" for k in sorted(set(old) | set(new))
             if k not in ("root", "split", "format", "files", "sha256") and old.get(k) != new.get(k)]
    if diff:
        raise CacheMismatchError(f"{where}: {'; '.join(diff)}; delete it or use another cache.dir")
