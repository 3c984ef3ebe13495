"""Inception features through torch-fidelity: the FID statistics and Inception Score of a stream of images.

The network, the TF1-compatible resize to 299 and the metric formulas are torch-fidelity's
(``inception-v3-compat``, the 2015-12-05 TF Inception that the ADM evaluator and TiTok's
reported gFID use); this module only streams batches through it and keeps the statistics.
The FID of two sets of statistics is :func:`titok_core.metrics.fid_from_stats`; reference
statistics are read and cached by :mod:`eval.reference`.

Accumulation: FID needs the mean and covariance of the pool3 features, so we keep running
float64 sums (sum of features, sum of outer products, count): 32 MB whatever the sample
count, exact enough (float64 over 50k features of size ~1), and merging ranks is one
all-reduce. IS needs every image's logits (torch-fidelity shuffles and splits them), so those
are kept on the CPU as float32: 50k x 1008 x 4 B = 200 MB.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from titok_core.checkpoints import CheckpointError, read_state_dict
from titok_core.errors import UsageError

# torch-fidelity's URL_INCEPTION_V3, written out so that importing eval does not import torch-fidelity
# (and torchvision's models with it) before Inception is needed; a test pins the two equal.
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FILENAME = INCEPTION_URL.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
FEATURE_DIM = 2048  # pool3
NUM_LOGITS = 1008  # the TF graph's classifier (1000 classes + 8 unused)
# torch-fidelity's defaults for IS (samples_shuffle=True, rng_seed=2020), so our IS equals its IS.
ISC_SHUFFLE_SEED = 2020


class InceptionWeightsError(CheckpointError):
    """The Inception weights cannot be found or read; the message is one line."""


def hub_weights_path() -> Path:
    """Where torch-fidelity downloads the Inception weights to (and looks for them first)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def check_weights_file(weights_path: str | os.PathLike | None) -> None:
    """Raises InceptionWeightsError (one line) when a weights file is named and is not there (None: the hub's)."""
    if weights_path is not None and not Path(weights_path).is_file():
        raise InceptionWeightsError(f"Inception weights file not found: {weights_path} (it is {INCEPTION_URL})")


def build_inception(
    weights_path: str | os.PathLike | None = None, *, features: Iterable[str] = ("2048", "logits_unbiased")
) -> torch.nn.Module:
    """torch-fidelity's ``inception-v3-compat`` extractor (eval mode, no grad, on the CPU).

    ``weights_path=None`` uses the torch hub cache, downloading the weights there when absent.
    Raises InceptionWeightsError (one line: the file, its URL, where to put it) when the
    weights are neither local nor downloadable.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    features = list(features)
    check_weights_file(weights_path)
    local = Path(weights_path) if weights_path is not None else hub_weights_path()
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
        extractor: torch.nn.Module | None = None,
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
            raise UsageError(f"FID statistics need at least 2 images, got {self.count}")
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
            raise UsageError(f"IS with {splits} splits needs at least {splits} images, got {logits.shape[0]}")
        from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

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
