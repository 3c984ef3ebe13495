"""The ADM evaluator's table and sample format, computed on torch-fidelity's Inception.

The field reports generators with guided-diffusion's ``evaluations/evaluator.py`` (``python
evaluator.py VIRTUAL_imagenet256_labeled.npz samples.npz``), which prints, in this order:
Inception Score, FID, sFID, Precision, Recall. This module computes them as that script does,
from the pool features (2048) and the logits of torch-fidelity's ``inception-v3-compat``, a
PyTorch port of the TF graph the script runs (the figures agree closely, not bit for bit):

* Inception Score: softmax of the logits, consecutive splits of 5,000 samples in file order,
  unshuffled; the mean of exp(KL) over the splits (``Evaluator.compute_inception_score``).
* FID: the reference file's ``mu``/``sigma`` where it has them (the ADM reference does),
  otherwise the statistics of its images; the samples' mean and unbiased covariance.
* Precision and recall (Kynkaanniemi et al. 2019): k = 3 nearest neighbours, squared Euclidean
  distances computed in row x column blocks of 10,000 (``ManifoldEstimator``; see
  :func:`precision_recall`), in float16 as its ``DistanceBlock`` computes them, with its float32
  fallback for a block where float16 overflows (:func:`float16_distances`). The float32 figures,
  about 1 to 4 points apart on Inception-like features, are reported beside them.
* sFID: not computed. It compares the first 7 channels of the TF graph's ``mixed_6/conv``
  activations (17 x 17 x 7 = 2,023 values an image), a layer torch-fidelity's port does not
  expose (it gives pooled features of 64, 192, 768 and 2,048 values and the logits), so for
  sFID run the official evaluator on the .npz that ``save_npz`` writes (docs/gfid.md).
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from titok_core.checkpoints import atomic_path
from titok_core.errors import UsageError

# From guided-diffusion evaluations/evaluator.py: Evaluator.compute_inception_score(split_size=5000);
# ManifoldEstimator(row_batch_size=10000, col_batch_size=10000, nhood_sizes=(3,), clamp_to_percentile=None,
# eps=1e-5), built by Evaluator with these defaults. clamp_to_percentile is None there, so no radius is
# pruned; eps only enters the realism score, which the table does not report.
IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3
PR_ROW_BATCH_SIZE = 10_000
PR_COL_BATCH_SIZE = 10_000
SFID_NOT_AVAILABLE = "n/a (needs the TF graph's spatial features)"
INCEPTION_NAME = "torch-fidelity inception-v3-compat (a PyTorch port of the TF Inception graph the evaluator runs)"


def inception_score(logits: torch.Tensor | np.ndarray, *, split_size: int = IS_SPLIT_SIZE) -> float:
    """The evaluator's Inception Score of logits [N, C] (N >= 1), rows in file order.

    Each consecutive split of ``split_size`` rows (the last may be shorter) scores
    exp(mean_i KL(p_i || mean_j p_j)) with p = softmax(logits); the result is the mean score.
    torch-fidelity's own IS shuffles first and splits in 10: other splits, another figure.
    """
    probs = torch.softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=1)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"expected logits [N>=1, C], got {list(probs.shape)}")
    scores = []
    for part in probs.split(split_size):
        kl = part * (part.log() - part.mean(0, keepdim=True).log())
        scores.append(float(kl.sum(1).mean().exp()))
    return float(np.mean(scores))


def _squared_distances(a: torch.Tensor, b: torch.Tensor, *, float16: bool = False) -> torch.Tensor:
    """[n, m] squared Euclidean distances of rows a [n, D] and b [m, D]: |a|^2 - 2ab + |b|^2, floored at 0.

    float16=False: in a's dtype (float32 or float64). float16=True: the evaluator's DistanceBlock,
    float32 [n, m] from :func:`float16_distances`, or, where any of this block's float16 distances
    is not finite (inf or nan: float16 ends at 65504), this block's distances in float32.
    """
    if float16:
        a, b = a.float(), b.float()  # the evaluator's inputs are float32; float16 is rounded from those
        d = float16_distances(a, b)
        if bool(torch.isfinite(d).all()):
            return d.float()
    d = a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)[None]
    return d.clamp_min_(0)


def float16_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float16 [n, m] squared distances of a [n, D] and b [m, D] in the evaluator's float16 arithmetic.

    guided-diffusion's ``_batch_pairwise_distances`` on the float16 casts of the inputs: the
    squares in float16, their row sums, the product a b^T, then ``max((|a|^2 - 2ab) + |b|^2, 0)``,
    every one of these a float16 tensor (inf past 65504, nan for inf - inf; max keeps nan).

    The product accumulates in float32 and is rounded to float16 once, as TF's float16 matmul does
    (products of float16 numbers are exact in float32). The row sums are made the same way, so a
    norm is the float16 number nearest its exact value; TF adds them up in float16 instead, in an
    order its kernel picks, and lands one ulp off for about a quarter of the rows, which moves
    precision/recall by up to about half a point (docs/gfid.md). Computed as a float32 matmul of the
    float16 values rather than a float16 matmul: on a CPU that is float32's speed (float16 matmul
    was slower here), and on a GPU it rules out float16 partial sums (cuBLAS may use them);
    the elementwise steps are float16 ops, correctly rounded on any device. So CPU and GPU agree
    but for the order of float32 additions (TF32 included: float16 values are exact in TF32).
    """
    a16, b16 = a.to(torch.float16), b.to(torch.float16)
    norm_a = (a16 * a16).float().sum(1).to(torch.float16)
    norm_b = (b16 * b16).float().sum(1).to(torch.float16)
    ab = (a16.float() @ b16.float().T).to(torch.float16)
    # Three roundings, in the evaluator's order: (norm_a - 2ab) + norm_b; 2ab is exact (or inf).
    d = (norm_a[:, None] - ab * 2) + norm_b[None, :]
    return d.clamp_min(0)  # clamp_min keeps nan, as tf.maximum does


def manifold_radii(
    features: torch.Tensor, *, k: int = PR_NEIGHBOURS, row_batch_size: int = PR_ROW_BATCH_SIZE,
    col_batch_size: int = PR_COL_BATCH_SIZE, clamp_to_percentile: float | None = None, float16: bool = False,
) -> torch.Tensor:
    """Each row's squared distance to its k-th nearest neighbour (itself not counted): [N].

    features [N, D]. Rows ``row_batch_size`` at a time, each against all rows in column blocks
    of ``col_batch_size`` (the evaluator's ManifoldEstimator.manifold_radii), distances as
    :func:`_squared_distances` with ``float16``. The radius is the (k+1)-th smallest distance of
    the row, the value np.partition puts at index k: the row's own distance (0 in float32; in
    float16 it may come out above 0 and then need not be the smallest) takes one place. With
    ``clamp_to_percentile`` (None in the evaluator), radii above that percentile become 0.
    """
    n = len(features)
    if n <= k:
        raise UsageError(f"{k} nearest neighbours need more than {k} feature vectors, got {n}")
    radii = torch.empty(n, dtype=torch.float32 if float16 else features.dtype, device=features.device)
    for r0 in range(0, n, row_batch_size):
        rows = features[r0 : r0 + row_batch_size]
        d = torch.cat([_squared_distances(rows, features[c0 : c0 + col_batch_size], float16=float16)
                       for c0 in range(0, n, col_batch_size)], dim=1)
        radii[r0 : r0 + len(rows)] = d.kthvalue(k + 1, dim=1).values
    if clamp_to_percentile is not None:
        limit = np.percentile(radii.cpu().numpy(), clamp_to_percentile)
        radii[radii > float(limit)] = 0
    return radii


def precision_recall(
    fake: torch.Tensor, real: torch.Tensor, *, k: int = PR_NEIGHBOURS, row_batch_size: int = PR_ROW_BATCH_SIZE,
    col_batch_size: int = PR_COL_BATCH_SIZE, clamp_to_percentile: float | None = None, float16: bool = False,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of features fake [N,D] vs real [M,D].

    Precision: the share of fake rows inside some real row's k-NN ball (are the samples
    realistic?); recall: the share of real rows inside some fake row's ball (is the variety of
    the real data covered?). Computed as the evaluator's compute_prec_recall: radii of both
    sets, then real blocks of ``row_batch_size`` x fake blocks of ``col_batch_size`` compared
    (ManifoldEstimator.evaluate_pr); a point on a ball's surface is inside.

    float16=True: the evaluator's figures, distances in its float16 arithmetic with its float32
    fallback per block (:func:`float16_distances`), from the float32 features; this is what
    papers report. float16=False: exact distances, float64 when both inputs are, else float32.
    The two differ by about 1 to 4 points on Inception-like features (docs/gfid.md).
    """
    if float16:
        dtype = torch.float32
    else:
        dtype = torch.float64 if real.dtype == torch.float64 and fake.dtype == torch.float64 else torch.float32
    real, fake = real.to(dtype), fake.to(dtype=dtype, device=real.device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected features [N,D] and [M,D], got {list(fake.shape)} and {list(real.shape)}")
    opts = dict(k=k, row_batch_size=row_batch_size, col_batch_size=col_batch_size,
                clamp_to_percentile=clamp_to_percentile, float16=float16)
    # The distances are the dtype chosen here, whatever autocast a caller has on.
    with torch.autocast(real.device.type, enabled=False):
        real_radii, fake_radii = manifold_radii(real, **opts), manifold_radii(fake, **opts)
        real_in = torch.zeros(len(real), dtype=torch.bool, device=real.device)  # inside some fake ball
        fake_in = torch.zeros(len(fake), dtype=torch.bool, device=real.device)  # inside some real ball
        for r0 in range(0, len(real), row_batch_size):
            r1 = r0 + row_batch_size
            for c0 in range(0, len(fake), col_batch_size):
                c1 = c0 + col_batch_size
                d = _squared_distances(real[r0:r1], fake[c0:c1], float16=float16)  # (real block, fake block)
                real_in[r0:r1] |= (d <= fake_radii[None, c0:c1]).any(1)
                fake_in[c0:c1] |= (d <= real_radii[r0:r1, None]).any(0)
    return float(fake_in.double().mean()), float(real_in.double().mean())


def table(*, inception_score: float, fid: float, precision: float | None, recall: float | None,
          precision_recall_missing: str = "n/a") -> list[str]:
    """The evaluator's five lines, in its order and wording ("Inception Score: 123.4" ...)."""
    def value(x: float | None, missing: str) -> str:
        return missing if x is None else f"{x:.4f}"

    return [
        f"Inception Score: {inception_score:.4f}",
        f"FID: {fid:.4f}",
        f"sFID: {SFID_NOT_AVAILABLE}",
        f"Precision: {value(precision, precision_recall_missing)}",
        f"Recall: {value(recall, precision_recall_missing)}",
    ]


# ---------------------------------------------------------------- the sample .npz


def write_samples_npz(path: str | os.PathLike, rows, order: np.ndarray, labels: np.ndarray, *,
                      chunk: int = 256) -> Path:
    """Write the evaluator's sample batch: ``arr_0`` uint8 [N,H,W,3] and ``arr_1`` int64 [N] labels.

    rows(indices) -> uint8 [n,H,W,3]: the samples of those indices (int64 [n]), e.g. a memory
    map's rows; order: int64 [N], the sample indices in file order; labels: int64 [N] by sample
    index. arr_0 is written ``chunk`` rows at a time, never whole in memory. The layout is
    np.savez's (entries stored, not compressed, zip64) with fixed entry times, so the same samples
    give the same bytes; written to a temporary file beside ``path`` and renamed into place.
    """
    order = np.asarray(order, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(order) != len(labels) or len(order) == 0:
        raise ValueError(f"order ({len(order)}) and labels ({len(labels)}) must be as long, and not empty")
    first = np.asarray(rows(order[:1]))
    shape = (len(order), *first.shape[1:])
    if first.dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"samples must be uint8 [N,H,W,3], got {first.dtype} {list(shape)}")
    header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False, "shape": shape}
    path = Path(path)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open(_entry("arr_0.npy"), "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for start in range(0, len(order), chunk):
                f.write(np.ascontiguousarray(rows(order[start : start + chunk]), dtype=np.uint8).tobytes())
        with zf.open(_entry("arr_1.npy"), "w", force_zip64=True) as f:
            np.lib.format.write_array(f, labels[order], allow_pickle=False)
    return path


def _entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info
