"""Inception features, FID and Inception Score through torch-fidelity; reference statistics and features.

The network, the TF1-compatible resize to 299 and the metric formulas are torch-fidelity's
(``inception-v3-compat``, the 2015-12-05 TF Inception that the ADM evaluator and TiTok's
reported gFID use); this module only streams batches through it and keeps the statistics.

Accumulation: FID needs the mean and covariance of the pool3 features, so we keep running
float64 sums (sum of features, sum of outer products, count): 32 MB whatever the sample
count, exact enough (float64 over 50k features of size ~1), and merging ranks is one
all-reduce. IS needs every image's logits (torch-fidelity shuffles and splits them), so those
are kept on the CPU as float32: 50k x 1008 x 4 B = 200 MB.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import zipfile
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch_fidelity
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from tqdm import tqdm

from titok_core.checkpoints import CheckpointError, atomic_path, read_state_dict

log = logging.getLogger(__name__)

INCEPTION_URL = URL_INCEPTION_V3
INCEPTION_FILENAME = URL_INCEPTION_V3.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
ADM_REFERENCE_URL = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
    "VIRTUAL_imagenet256_labeled.npz"
)
FEATURE_DIM = 2048  # pool3
NUM_LOGITS = 1008  # the TF graph's classifier (1000 classes + 8 unused)
# torch-fidelity's defaults for IS (samples_shuffle=True, rng_seed=2020), so our IS equals its IS.
ISC_SHUFFLE_SEED = 2020
STATS_KIND = "titok_gen.reference_stats"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".JPEG")


class InceptionWeightsError(CheckpointError):
    """The Inception weights cannot be found or read; the message is one line."""


class ReferenceStatsError(ValueError):
    """A reference-statistics file that cannot be used; the message is one line."""


def hub_weights_path() -> Path:
    """Where torch-fidelity downloads the Inception weights to (and looks for them first)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def build_inception(
    weights_path: str | os.PathLike | None = None, *, features: Iterable[str] = ("2048", "logits_unbiased")
) -> FeatureExtractorInceptionV3:
    """torch-fidelity's ``inception-v3-compat`` extractor (eval mode, no grad, on the CPU).

    ``weights_path=None`` uses the torch hub cache, downloading the weights there when absent.
    Raises InceptionWeightsError (one line: the file, its URL, where to put it) when the
    weights are neither local nor downloadable.
    """
    features = list(features)
    local = Path(weights_path) if weights_path is not None else hub_weights_path()
    if weights_path is not None and not local.is_file():
        raise InceptionWeightsError(f"Inception weights file not found: {local} (it is {INCEPTION_URL})")
    if local.is_file():
        # torch-fidelity reads with weights_only=False; a weights_only read first means a file
        # that holds anything but tensors is refused before it is unpickled.
        try:
            read_state_dict(local)
        except CheckpointError as exc:
            raise InceptionWeightsError(f"Inception weights: {exc}") from exc
        return FeatureExtractorInceptionV3("inception-v3-compat", features, feature_extractor_weights_path=str(local))
    try:
        with redirect_stdout(sys.stderr):
            return FeatureExtractorInceptionV3("inception-v3-compat", features)
    except OSError as exc:  # URLError, socket timeouts and refused connections are all OSErrors
        raise InceptionWeightsError(
            f"Inception weights {INCEPTION_FILENAME} are not in the torch hub cache and could not be downloaded "
            f"({type(exc).__name__}: {str(exc).strip() or 'no detail'}); download {INCEPTION_URL} and put it at "
            f"{local}, or pass the local file as weights_path"
        ) from exc


class InceptionFeatures:
    """Streams uint8 image batches through Inception; keeps FID moments and IS logits.

    ``update`` as often as needed, then ``fid_stats`` / ``inception_score``. Under
    torch.distributed every rank feeds its own share and both results are collective: every
    rank must call them, and each returns the statistics of all ranks' images together.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        *,
        device: str | torch.device = "cpu",
        keep_logits: bool = True,
        extractor: FeatureExtractorInceptionV3 | None = None,
    ):
        self.device = torch.device(device)
        self.keep_logits = keep_logits
        features = ("2048", "logits_unbiased") if keep_logits else ("2048",)
        if extractor is None:
            extractor = build_inception(weights_path, features=features)
        elif list(extractor.features_list) != list(features):
            raise ValueError(f"extractor must produce features {features}, got {tuple(extractor.features_list)}")
        self.extractor = extractor.to(self.device)
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        self.count = 0
        self._sum = torch.zeros(FEATURE_DIM, dtype=torch.float64, device=self.device)
        self._outer = torch.zeros(FEATURE_DIM, FEATURE_DIM, dtype=torch.float64, device=self.device)
        self._logits: list[torch.Tensor] = []
        self._synced = False

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> torch.Tensor:
        """Add a batch: uint8 [B,3,H,W] in [0,255], any H,W (resized to 299 inside, TF1-style).

        Returns the batch's pool features, float32 [B,2048] on this accumulator's device.
        """
        if self._synced:
            raise RuntimeError("statistics were already gathered across ranks; call reset() before update()")
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 [B,3,H,W] images, got {images.dtype} {tuple(images.shape)}")
        with _full_precision(self.device):
            out = self.extractor(images.to(self.device))
        feats = out[0].double()  # (B, 2048)
        self._sum += feats.sum(0)
        self._outer += feats.T @ feats
        self.count += images.shape[0]
        if self.keep_logits:
            self._logits.append(out[1].float().cpu())  # (B, 1008)
        return out[0].float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's accumulated state (for resuming a long evaluation after a kill)."""
        return {"count": torch.tensor(self.count), "sum": self._sum.cpu(), "outer": self._outer.cpu(),
                "logits": self.logits() if self.keep_logits else torch.zeros(0, NUM_LOGITS)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned."""
        self.reset()
        self.count = int(state["count"])
        self._sum = state["sum"].to(self.device, torch.float64)
        self._outer = state["outer"].to(self.device, torch.float64)
        if self.keep_logits and len(state["logits"]):
            self._logits = [state["logits"].float()]

    def merge(self, other: "InceptionFeatures") -> None:
        """Fold another accumulator's images into this one (e.g. one per GPU in one process)."""
        self._sum += other._sum.to(self.device)
        self._outer += other._outer.to(self.device)
        self.count += other.count
        self._logits.extend(other._logits)

    def sync(self) -> None:
        """Gather all ranks' statistics into every rank (no-op without torch.distributed, or twice)."""
        if self._synced or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        dev = _collective_device(self.device)
        count = torch.tensor([self.count], dtype=torch.int64, device=dev)
        sums = [self._sum.to(dev), self._outer.to(dev)]
        for t in [count, *sums]:
            dist.all_reduce(t)
        self._sum, self._outer = (t.to(self.device) for t in sums)
        self.count = int(count.item())
        if self.keep_logits:
            self._logits = [gather_rows(self.logits())]
        self._synced = True

    def logits(self) -> torch.Tensor:
        """This rank's 'logits_unbiased' so far: float32 [N,1008] on the CPU, in update order."""
        if not self.keep_logits:
            raise RuntimeError("this InceptionFeatures was made with keep_logits=False")
        return torch.cat(self._logits) if self._logits else torch.zeros(0, NUM_LOGITS)

    def fid_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu float64 [2048], sigma float64 [2048,2048]) of all images; collective under DDP."""
        self.sync()
        if self.count < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.count}")
        mu = self._sum / self.count
        # Unbiased covariance, as np.cov (torch-fidelity) computes it.
        sigma = (self._outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()

    def inception_score(self, splits: int = 10) -> tuple[float, float]:
        """(mean, std) of the Inception Score over ``splits`` splits; collective under DDP.

        Exactly torch-fidelity's IS: the logits are shuffled with its default seed first.
        """
        self.sync()
        logits = self.logits()
        if logits.shape[0] < splits:
            raise ValueError(f"IS with {splits} splits needs at least {splits} images, got {logits.shape[0]}")
        out = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=ISC_SHUFFLE_SEED)
        return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


@contextmanager
def _full_precision(device: torch.device) -> Iterator[None]:
    """float32 Inception whatever the caller set: no autocast, no TF32 (cuDNN convs default to TF32).

    The reference statistics (ADM, TF) were computed in float32; TF32 or bf16 would shift FID.
    """
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False), torch.backends.cudnn.flags(
            enabled=torch.backends.cudnn.enabled, allow_tf32=False
        ):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


def _collective_device(device: torch.device) -> torch.device:
    """Where tensors must be for a collective: NCCL only moves CUDA tensors; gloo takes them where they are."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's [N_r, C] tensor concatenated in rank order (N_r may differ), on the CPU; collective.

    Without torch.distributed (or with one process), ``rows`` on the CPU.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows.cpu()
    device = _collective_device(rows.device)
    n = torch.tensor([rows.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    counts = [int(c.item()) for c in counts]
    padded = torch.zeros(max(counts), rows.shape[1], dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:c].cpu() for g, c in zip(gathered, counts)])


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between two Gaussians (mu [D], sigma [D,D]); torch-fidelity's formula, in float64."""
    stats = [
        {"mu": np.asarray(m, dtype=np.float64), "sigma": np.asarray(s, dtype=np.float64)}
        for m, s in ((mu1, sigma1), (mu2, sigma2))
    ]
    return float(fid_statistics_to_metric(stats[0], stats[1], verbose=False)[KEY_METRIC_FID])


def features_to_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mu float64 [D], sigma float64 [D,D]) of a feature matrix [N,D] (N >= 2)."""
    features = np.asarray(features.cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"expected features [N>=2, D], got {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)


# ---------------------------------------------------------------- reference statistics


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
        raise ReferenceStatsError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    weights = INCEPTION_FILENAME if weights_path is None else Path(weights_path).name
    meta = {"folder": str(folder), "num_images": len(paths), "resolution": resolution, "weights": weights,
            "features": FEATURE_DIM, "torch_fidelity": torch_fidelity.__version__}
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
            "features": FEATURE_DIM, "torch_fidelity": torch_fidelity.__version__}
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


def _open_npz(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise ReferenceStatsError(f"reference statistics not found: {path} (ImageNet 256: {ADM_REFERENCE_URL})")
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


# ---------------------------------------------------------------- image files
# Minimal local reading; titok_core/data.py has list_images and load_image_rgb.


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Every image file under ``folder``, recursively, sorted (so runs and ranks agree)."""
    suffixes = {s.lower() for s in IMAGE_SUFFIXES}
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


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
