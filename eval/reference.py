"""Reference statistics for gFID: what the samples are measured against, read and cached.

A reference is an .npz of FID statistics (``mu``, ``sigma``: the ADM evaluator's reference batch,
or a file :func:`save_reference_stats` wrote, which may also hold the reference images' pool
features for precision and recall), an .npz of images (``arr_0``, the ADM sample format), or a
folder of images. Images are reduced the ADM way (:func:`center_crop_uint8`) and run through
:class:`eval.fidelity.InceptionFeatures` once; the result is cached beside them.
"""
from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from eval.fidelity import FEATURE_DIM, INCEPTION_FILENAME, InceptionFeatures
from titok_core.checkpoints import atomic_path
from titok_core.data import IMAGE_EXTENSIONS, list_image_files
from titok_core.errors import BadFileError

log = logging.getLogger(__name__)

ADM_REFERENCE_URL = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
    "VIRTUAL_imagenet256_labeled.npz"
)
STATS_KIND = "titok_gen.reference_stats"


class ReferenceStatsError(BadFileError):
    """A reference-statistics file that cannot be used; the message is one line."""


def save_reference_stats(
    path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, meta: dict, features: np.ndarray | None = None
) -> Path:
    """Write mu float64 [D], sigma float64 [D,D], a JSON-able ``meta`` dict and optionally the
    images' pool features (float32 [N,D], for precision and recall) to an .npz, atomically."""
    mu, sigma = _checked_stats(np.asarray(mu), np.asarray(sigma), str(path))
    extra = {} if features is None else {"features": np.asarray(features, dtype=np.float32)}
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, mu=mu, sigma=sigma, meta=np.array(json.dumps({"kind": STATS_KIND, **meta})), **extra)
    return path


def load_reference_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu float64 [D], sigma float64 [D,D]) from an .npz with 'mu' and 'sigma' keys.

    Reads the ADM reference batches (e.g. VIRTUAL_imagenet256_labeled.npz; its 'arr_0' images
    and 'mu_s'/'sigma_s' are not read) and the files ``save_reference_stats`` writes. For an
    .npz of images only ('arr_0', uint8 [N,H,W,3]), use ``stats_from_npz_images``.
    """
    with _open_npz(path) as npz:
        if "mu" not in npz.files or "sigma" not in npz.files:
            hint = " (it holds images in 'arr_0': use stats_from_npz_images)" if "arr_0" in npz.files else ""
            raise ReferenceStatsError(f"{path} has no 'mu'/'sigma' statistics, keys: {sorted(npz.files)}{hint}")
        return _checked_stats(npz["mu"], npz["sigma"], str(path))


def load_reference_features(path: str | os.PathLike) -> np.ndarray | None:
    """The pool features (float32 [N,2048]) a statistics file holds, or None."""
    with _open_npz(path) as npz:
        return npz["features"].astype(np.float32) if "features" in npz.files else None


def read_reference_meta(path: str | os.PathLike) -> dict:
    """The meta dict ``save_reference_stats`` stored; {} for files from elsewhere (ADM)."""
    with _open_npz(path) as npz:
        if "meta" not in npz.files:
            return {}
        return json.loads(str(npz["meta"]))


def stats_from_npz_images(
    path: str | os.PathLike, *, weights_path: str | os.PathLike | None = None, device: str = "cpu",
    batch_size: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """Inception statistics of the images in an .npz's 'arr_0' (uint8 [N,H,W,3], the ADM sample format)."""
    mu, sigma, _ = _npz_image_features(path, weights_path=weights_path, device=device, batch_size=batch_size)
    return mu, sigma


def _npz_image_features(path, *, weights_path, device, batch_size: int, progress: bool = False):
    """(mu, sigma, features float32 [N,2048]) of the images in an .npz's 'arr_0'."""
    with _open_npz(path) as npz:
        if "arr_0" not in npz.files:
            raise ReferenceStatsError(f"{path} has no 'arr_0' images, keys: {sorted(npz.files)}")
        images = npz["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ReferenceStatsError(f"{path}: 'arr_0' must be uint8 [N,H,W,3], got {images.dtype} {images.shape}")
    acc = InceptionFeatures(weights_path, device=device, keep_logits=False)
    features = [
        acc.update(torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2)).cpu()
        for start in tqdm(range(0, len(images), batch_size), desc="reference images", disable=not progress)
    ]
    return *acc.fid_stats(), torch.cat(features).numpy()


def reference_stats_from_folder(
    folder: str | os.PathLike,
    cache_path: str | os.PathLike,
    *,
    resolution: int = 256,
    weights_path: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Inception statistics of every image under ``folder`` (recursive, e.g. ImageNet val), cached.

    Each image is reduced to ``resolution`` x ``resolution`` as the ADM reference batches were
    (box-halve while at least twice the size, bicubic resize of the short side, centre crop).
    ``cache_path`` is reused when its meta matches (folder, image count, resolution, weights);
    otherwise the statistics, with every image's pool features (for precision and recall; see
    :func:`load_reference_features`), are computed and written there atomically.
    Returns (mu float64 [2048], sigma float64 [2048,2048]).
    """
    folder = Path(folder).resolve()
    paths = list_image_files(folder)
    if not paths:
        raise ReferenceStatsError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {folder}")
    weights = INCEPTION_FILENAME if weights_path is None else Path(weights_path).name
    meta = {"folder": str(folder), "num_images": len(paths), "resolution": resolution, "weights": weights,
            "features": FEATURE_DIM, "torch_fidelity": _torch_fidelity_version()}
    cached = _cached_stats(cache_path, meta)
    if cached is not None:
        return cached

    from titok_core.stopping import ignore_stop_signals  # the job stops at a safe point, not its workers

    acc = InceptionFeatures(weights_path, device=device, keep_logits=False)
    loader = torch.utils.data.DataLoader(
        _ImageFiles(paths, resolution), batch_size=batch_size, num_workers=num_workers, shuffle=False,
        worker_init_fn=ignore_stop_signals,
    )
    features = [acc.update(images).cpu() for images in tqdm(loader, desc="reference statistics", disable=not progress)]
    mu, sigma = acc.fid_stats()
    save_reference_stats(cache_path, mu, sigma, meta, torch.cat(features).numpy())
    return mu, sigma


def _cached_stats(cache_path: str | os.PathLike, meta: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """The statistics in ``cache_path`` when its meta matches ``meta`` (the torch-fidelity version aside), else None."""
    cache_path = Path(cache_path)
    if not cache_path.is_file():
        return None
    cached = read_reference_meta(cache_path)
    if all(cached.get(k) == v for k, v in meta.items() if k != "torch_fidelity"):
        log.info("reference statistics: reusing %s", cache_path)
        return load_reference_stats(cache_path)
    log.info("reference statistics: %s does not match (%s), recomputing", cache_path, cached)
    return None


def reference_features_from_npz(
    path: str | os.PathLike, cache_path: str | os.PathLike, *, weights_path: str | os.PathLike | None = None,
    device: str = "cpu", batch_size: int = 100, progress: bool = False,
) -> np.ndarray:
    """The pool features (float32 [N,2048]) of the images in a reference .npz's 'arr_0', cached.

    ``cache_path`` (statistics and features, as a folder's) is reused when its meta matches (the
    file, its size and image count, the weights); otherwise it is computed and written there.
    """
    path = Path(path).resolve()
    shape = _npz_array_shape(path, "arr_0")
    weights = INCEPTION_FILENAME if weights_path is None else Path(weights_path).name
    meta = {"npz": str(path), "bytes": path.stat().st_size, "num_images": int(shape[0]), "weights": weights,
            "features": FEATURE_DIM, "torch_fidelity": _torch_fidelity_version()}
    if _cached_stats(cache_path, meta) is None:
        mu, sigma, features = _npz_image_features(path, weights_path=weights_path, device=device,
                                                  batch_size=batch_size, progress=progress)
        save_reference_stats(cache_path, mu, sigma, meta, features)
    return load_reference_features(cache_path)


@dataclass
class ReferenceBatch:
    """What the generator is measured against: FID statistics and, where the reference has images, their features."""

    mu: np.ndarray  # float64 [2048]
    sigma: np.ndarray  # float64 [2048, 2048]
    features: np.ndarray | None  # float32 [N, 2048] pool features of the reference images; None: statistics only
    stats_from: str  # "file" (the reference's own mu/sigma, e.g. the ADM file's) or the cache they were computed into


def load_reference(
    reference: str | os.PathLike, *, cache: str | os.PathLike | None = None, resolution: int = 256,
    weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu", progress: bool = False,
) -> ReferenceBatch:
    """The reference of a gFID run, as the ADM evaluator reads its reference batch.

    An .npz: its ``mu``/``sigma`` where present (the ADM VIRTUAL_imagenet256_labeled.npz holds
    the TF graph's), and the pool features of its ``arr_0`` images (10,000 in the ADM file),
    computed once with our Inception and cached at ``cache`` (default: ``<name>.inception.npz``
    beside it); without ``mu``/``sigma``, the statistics of those images. A folder: statistics
    and features of its images at ``resolution`` (see :func:`reference_stats_from_folder`),
    cached at ``cache`` (default: ``<folder>.fid_stats_<resolution>.npz`` beside it).
    """
    path = Path(reference)
    opts = dict(weights_path=weights_path, device=str(device), progress=progress)
    if path.is_dir():
        cache = Path(cache) if cache else path.parent / f"{path.name}.fid_stats_{resolution}.npz"
        mu, sigma = reference_stats_from_folder(path, cache, resolution=resolution, **opts)
        return ReferenceBatch(mu, sigma, load_reference_features(cache), str(cache))
    with _open_npz(path) as npz:
        keys = set(npz.files)
    cache = Path(cache) if cache else path.with_name(f"{path.stem}.inception.npz")
    features = reference_features_from_npz(path, cache, **opts) if "arr_0" in keys else None
    if {"mu", "sigma"} <= keys or features is None:
        return ReferenceBatch(*load_reference_stats(path), features, "file")
    return ReferenceBatch(*load_reference_stats(cache), features, str(cache))


def _npz_array_shape(path: Path, name: str) -> tuple[int, ...]:
    """The shape of one array of an .npz, read from its header (the array itself is not loaded)."""
    with _open_npz(path) as npz:
        if name not in npz.files:
            raise ReferenceStatsError(f"{path} has no '{name}', keys: {sorted(npz.files)}")
    with zipfile.ZipFile(path) as zf, zf.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read_header(f)[0]


def check_reference_exists(reference: str | os.PathLike) -> None:
    """Raises ReferenceStatsError (one line) unless ``reference`` is a file or a folder."""
    path = Path(reference)
    if not (path.is_file() or path.is_dir()):
        raise ReferenceStatsError(f"reference statistics not found: {path} (ImageNet 256: {ADM_REFERENCE_URL})")


def _open_npz(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        check_reference_exists(path)
        raise ReferenceStatsError(f"{path} is a folder, not an .npz")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
        raise ReferenceStatsError(f"cannot read {path} as .npz: {exc}") from exc


def _checked_stats(mu: np.ndarray, sigma: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ReferenceStatsError(f"{source}: need mu [D] and sigma [D,D], got {mu.shape} and {sigma.shape}")
    # ADM files hold float64 mu and sigma; torch-fidelity's FID asserts equal dtypes, so all is float64.
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ReferenceStatsError(f"{source}: mu or sigma is not finite")
    return mu, sigma


def center_crop_uint8(image: Image.Image, resolution: int) -> torch.Tensor:
    """PIL image -> uint8 [3,R,R] the ADM way (box-halve, bicubic short side to R, centre crop)."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    arr = arr[top : top + resolution, left : left + resolution]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # PIL's arrays are read-only


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], resolution: int):
        self.paths, self.resolution = paths, resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as image:
            return center_crop_uint8(image, self.resolution)


def _torch_fidelity_version() -> str:
    """torch-fidelity's version, recorded in a cache's meta (read from its metadata: no import)."""
    from importlib.metadata import version

    return version("torch-fidelity")
