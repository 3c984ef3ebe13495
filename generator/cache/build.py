"""Building a cache: reuse a finished one, resume a half-built one made of the same things, or
start; with Lightning Fabric every rank writes its own shards and rank 0 merges them."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from functools import partial
from pathlib import Path

import torch
from filelock import FileLock
from torch.utils.data import Dataset

from generator.cache.check import CacheMismatchError, check_cache, refuse_other_dataset
from generator.cache.identity import cache_manifest, default_cache_dir, tokenizer_fingerprint
from generator.cache.shards import build_shards, build_stream_shards, merge_shards
from titok_core.checkpoints import atomic_path
from titok_core.errors import MissingFileError
from titok_core.formats import WebDatasetShards, open_split
from titok_core.runs import dataset_identity

log = logging.getLogger(__name__)


def _remove_leftovers(out_dir: Path) -> None:
    """Temporary files a killed write left behind (``.<name>.*.tmp`` of atomic_path); they are never read."""
    for folder in (out_dir, out_dir / "shards"):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


def build_token_cache(
    *, tokenizer: torch.nn.Module, tokenizer_source: str, dataset: Dataset, out_dir: str | os.PathLike,
    batch_size: int = 64, device: torch.device | str = "cpu", dtype: str = "auto", num_workers: int = 0,
    fabric=None, flip: bool = True, decode: str = "pil", compile: bool = False, data: dict | None = None,
) -> dict:
    """Build (or resume, or reuse) a cache; returns its manifest.

    data: the dataset's :func:`dataset_identity` (what ``dataset`` was opened from: root, split,
    format), recorded in the manifest and checked when the cache exists; None: taken from the
    dataset object (see :func:`cache_manifest`).

    With a launched ``lightning.Fabric``, every rank builds its own shards on its own device
    and rank 0 merges them; without one, this process does everything. decode, compile: see
    :func:`build_shards`.
    """
    from titok_core.runtime import resolve_workers
    from tokenizer import require_discrete

    require_discrete(tokenizer, "a token cache for MaskGIT training")
    num_workers = resolve_workers(num_workers)
    rank, world_size = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    barrier = fabric.barrier if fabric is not None else (lambda: None)
    manifest = cache_manifest(
        tokenizer=tokenizer, tokenizer_source=tokenizer_source, dataset=dataset, resolution=tokenizer.image_size,
        flip=flip, decode=decode, data=data,
    )
    fingerprint = manifest["tokenizer"]["fingerprint"]
    check = partial(check_cache, out_dir, fingerprint=fingerprint, resolution=manifest["resolution"], flip=flip,
                    data=manifest["data"])
    if (Path(out_dir) / "manifest.json").is_file():
        found = check()
        # A kill after the manifest was written but before the shards were removed leaves them: drop them.
        shutil.rmtree(Path(out_dir) / "shards", ignore_errors=True)
        return found
    # Another job may be building this very cache (a sweep started at once): wait for it, then take
    # its result or resume what it left. The ranks of one Fabric job share out the work instead.
    # The lock file lives in the cache folder and goes once the cache is finished: from then on
    # nobody builds it (whoever gets the lock checks manifest.json first), so removing the file
    # under a process that waits for it is harmless.
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    locked = fabric is None
    with FileLock(_lock_path(out_dir)) if locked else contextlib.nullcontext():
        if (Path(out_dir) / "manifest.json").is_file():
            if locked:
                _lock_path(out_dir).unlink(missing_ok=True)
            return check()
        stream = isinstance(dataset, WebDatasetShards)
        if rank == 0:
            images = "streamed images" if stream else f"{manifest['num_images']} images"
            log.info("token cache %s: building it from %s (a rerun resumes it)", out_dir, images)
            _check_partial(out_dir, manifest, batch_size, shards=dataset.urls if stream else None)
            _remove_leftovers(Path(out_dir))  # the other ranks wait at the barrier: nothing is being written
        barrier()
        if stream:
            build_stream_shards(
                tokenizer=tokenizer, shards=dataset, out_dir=out_dir, batch_size=batch_size, device=device,
                dtype=dtype, num_workers=num_workers, rank=rank, world_size=world_size, flip=flip,
            )
        else:
            build_shards(
                tokenizer=tokenizer, dataset=dataset, out_dir=out_dir, batch_size=batch_size, device=device,
                dtype=dtype, num_workers=num_workers, rank=rank, world_size=world_size, flip=flip, decode=decode,
                compile=compile,
            )
        barrier()
        if rank == 0:
            merge_shards(out_dir=out_dir, num_images=manifest["num_images"], batch_size=batch_size,
                         manifest=manifest, num_tars=len(dataset) if stream else None)
        barrier()
        if locked:
            _lock_path(out_dir).unlink(missing_ok=True)
    return check()


def _lock_path(out_dir: str | os.PathLike) -> Path:
    """The lock of a cache being built: a hidden file in its folder, removed when the cache is finished."""
    return Path(out_dir) / ".lock"


def _check_partial(
    out_dir: str | os.PathLike, manifest: dict, batch_size: int, shards: list[str] | None = None,
) -> None:
    """A half-built cache may only be resumed by the same tokenizer, data, batch size and flip setting.

    Plans written before they recorded the dataset or the flip setting are checked for the rest."""
    out_dir = Path(out_dir)
    plan = dict(
        fingerprint=manifest["tokenizer"]["fingerprint"], resolution=manifest["resolution"],
        num_images=manifest["num_images"], batch_size=batch_size, decode=manifest["decode"],
        flip=manifest.get("flip", True), data=manifest.get("data"),
    )
    if shards is not None:
        plan["shards"] = list(shards)
    path = out_dir / "shards" / "plan.json"
    if path.is_file():
        try:
            old = {"decode": "pil", **json.loads(path.read_text())}  # plans from before decode="device"
        except ValueError as exc:
            raise CacheMismatchError(f"half-built token cache plan {path} is not readable JSON ({exc}); "
                                     "delete the cache directory and build it again") from None
        for key in ("flip", "data"):  # plans from before these were recorded
            if key not in old:
                log.warning("half-built token cache %s does not record its %s: resuming it checks the rest only",
                            out_dir, "dataset" if key == "data" else "flip setting")
                old[key] = plan[key]
        if old["data"] is not None and plan["data"] is not None:
            refuse_other_dataset(old["data"], plan["data"],
                                  where=f"half-built token cache {out_dir} ({path}) was started from another dataset")
        old["data"] = plan["data"]
        if old != plan:
            diff = ", ".join(f"{k} (was {old.get(k)}, now {plan[k]})" if k != "shards" else k
                             for k in plan if old.get(k) != plan[k])
            raise CacheMismatchError(
                f"half-built token cache {out_dir} differs in {diff}; delete it or use another cache.dir")
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(plan))


def open_cache(
    *, tokenizer: torch.nn.Module, tokenizer_source: str, data, cache, device: torch.device | str = "cpu",
    fabric=None, identity: dict | None = None, refuse_to_build: str | None = None,
) -> tuple[Path, dict]:
    """The token cache of a dataset by ``tokenizer``: checked when it exists, else built (or resumed).

    The one way from options to a cache, for ``python -m generator.cache`` and ``generator.train``.
    data: the ``data`` group (root, split, format; hflip: the cache also holds each image's mirror);
    cache: the ``cache`` group (dir, else :func:`default_cache_dir`; batch_size, dtype, num_workers,
    decode, compile); identity: the dataset's :func:`titok_core.runs.dataset_identity` when the caller
    has it. refuse_to_build: when given, a missing cache is not built: MissingFileError
    ``no token cache at DIR: <refuse_to_build>``. Returns (cache directory, manifest).
    """
    identity = identity if identity is not None else dataset_identity(data.root, data.split, data.format)
    out_dir = Path(cache.dir or default_cache_dir(root=data.root, split=data.split, tokenizer=tokenizer,
                                                 flip=data.hflip))
    if (out_dir / "manifest.json").is_file():
        manifest = check_cache(out_dir, fingerprint=tokenizer_fingerprint(tokenizer), resolution=tokenizer.image_size,
                               flip=data.hflip, data=identity)
        # A kill after the manifest was written but before the shards were removed leaves them: drop them.
        shutil.rmtree(out_dir / "shards", ignore_errors=True)
        return out_dir, manifest
    if refuse_to_build:
        raise MissingFileError(f"no token cache at {out_dir}: {refuse_to_build}")
    dataset = open_split(data.root, data.split, format=data.format, resolution=tokenizer.image_size)
    manifest = build_token_cache(
        tokenizer=tokenizer, tokenizer_source=tokenizer_source, dataset=dataset, out_dir=out_dir, device=device,
        fabric=fabric, data=identity, flip=data.hflip, **{k: v for k, v in cache.items() if k != "dir"},
    )
    return out_dir, manifest
