"""Precision and recall in the ADM evaluator's float16 arithmetic (eval.adm, ``float16=True``).

guided-diffusion's evaluations/evaluator.py computes the k-NN distances of its precision and
recall in float16 (DistanceBlock): |u|^2 - 2u.v + |v|^2 on the float16 casts of the features,
floored at 0, cast to float32; a block where any float16 distance is not finite is computed in
float32 instead. The reference here is that description written out in numpy, on features shaped
like Inception pool features: non-negative, 2048-d, in clusters, more rows than one block.

The bound between two float16 kernels. The norms |u|^2 and the products u.v are sums of 2048
terms. Ours and the numpy reference both add the terms in float32 (float16 squares, and products
of float16 numbers, are exact there) and round the sum to float16 once; only the order of the
float32 additions differs (torch's and numpy's reductions and BLAS). That order moves a float32
sum by ~1e-6 relative, so the two round a sum differently only where it lies that close to a
midpoint between two float16 numbers (about 1 entry in 10,000 here), and then by one float16 ulp.
A distance built from it, (|u|^2 - 2u.v) + |v|^2, then moves by that ulp plus a different
rounding of each of its two steps: at most 3 ulps of its largest operand. A point's membership
changes only where such an entry decides it, within those 3 ulps of a ball's radius: rare, so
the figures may differ by a point or two (KERNEL_SLACK) and in practice agree exactly. Kernels
that accumulate the norms in float16 (the evaluator's TensorFlow) differ more: docs/gfid.md.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eval import adm

ROWS, COLS = 192, 128  # small blocks, so that 500 x 400 rows span several in both directions
KERNEL_SLACK = 2  # points of precision or recall two float16 kernels may count differently (above)


def clustered_features(seed: int, *, n_real: int = 500, n_fake: int = 400, dim: int = 2048,
                       clusters: int = 50, shared: int = 35, novel: int = 10, novel_share: float = 0.1,
                       spread: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(fake, real) float32 [n, dim] like Inception pool features: non-negative, in clusters.

    real: rows of ``clusters`` clusters; fake: rows of ``shared`` of them, plus ``novel_share`` of
    its rows from ``novel`` clusters the reference lacks. A cluster's centre is gamma noise (pool
    features are averages of ReLUs), a row its centre, scaled a little, plus Gaussian noise,
    floored at 0. |x|^2 is about 500 to 1,500, where a float16 ulp is 0.25 to 1.
    """
    rng = np.random.default_rng(seed)
    centres = rng.gamma(0.5, 0.6, size=(clusters + novel, dim))

    def draw(n: int, ids: np.ndarray) -> np.ndarray:
        which = rng.choice(ids, size=n)
        x = centres[which] * rng.lognormal(0, 0.1, size=(n, 1)) + rng.normal(0, spread, size=(n, dim))
        return np.maximum(x, 0).astype(np.float32)

    n_novel = round(n_fake * novel_share)
    fake = np.concatenate([draw(n_fake - n_novel, np.arange(shared)), draw(n_novel, clusters + np.arange(novel))])
    return fake, draw(n_real, np.arange(clusters))


# ---------------------------------------------------------------- the reference, in numpy


def np_distances(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, bool]:
    """The evaluator's DistanceBlock for float32 rows u, v: (float32 distances, whether float16 gave them)."""
    with np.errstate(over="ignore", invalid="ignore"):
        u16, v16 = u.astype(np.float16), v.astype(np.float16)
        # float16 squares summed in float32 and rounded once; the product likewise.
        norm_u = np.square(u16).sum(1, dtype=np.float32).astype(np.float16)
        norm_v = np.square(v16).sum(1, dtype=np.float32).astype(np.float16)
        prod = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
        d16 = np.maximum((norm_u[:, None] - 2 * prod) + norm_v[None, :], np.float16(0))  # float16 steps
    assert d16.dtype == np.float16
    if np.isfinite(d16).all():
        return d16.astype(np.float32), True
    d32 = np.square(u).sum(1)[:, None] - 2 * (u @ v.T) + np.square(v).sum(1)[None, :]
    return np.maximum(d32, 0).astype(np.float32), False


def np_precision_recall(fake: np.ndarray, real: np.ndarray, *, k: int = 3, rows: int = ROWS,
                        cols: int = COLS) -> tuple[float, float, int, int]:
    """ManifoldEstimator's manifold_radii and evaluate_pr with np_distances.

    Returns (precision, recall, blocks computed in float32, blocks in all).
    """
    fallbacks, blocks = 0, 0

    def block(u, v):
        nonlocal fallbacks, blocks
        d, used16 = np_distances(u, v)
        fallbacks, blocks = fallbacks + (not used16), blocks + 1
        return d

    def radii(x):
        out = np.empty(len(x), np.float32)
        for r0 in range(0, len(x), rows):
            d = np.concatenate([block(x[r0 : r0 + rows], x[c0 : c0 + cols]) for c0 in range(0, len(x), cols)], 1)
            out[r0 : r0 + rows] = np.partition(d, k, axis=1)[:, k]  # as the evaluator's seq = arange(k + 1)
        return out

    real_radii, fake_radii = radii(real), radii(fake)
    real_in, fake_in = np.zeros(len(real), bool), np.zeros(len(fake), bool)
    for r0 in range(0, len(real), rows):
        for c0 in range(0, len(fake), cols):
            d = block(real[r0 : r0 + rows], fake[c0 : c0 + cols])
            real_in[r0 : r0 + rows] |= (d <= fake_radii[None, c0 : c0 + cols]).any(1)
            fake_in[c0 : c0 + cols] |= (d <= real_radii[r0 : r0 + rows, None]).any(0)
    return float(fake_in.mean()), float(real_in.mean()), fallbacks, blocks


def _ours(fake: np.ndarray, real: np.ndarray, *, float16: bool, device: str = "cpu") -> tuple[float, float]:
    return adm.precision_recall(torch.from_numpy(fake).to(device), torch.from_numpy(real).to(device),
                                float16=float16, row_batch_size=ROWS, col_batch_size=COLS)


def _assert_close_counts(ours: tuple[float, float], ref: tuple[float, float], n_fake: int, n_real: int) -> None:
    assert abs(ours[0] - ref[0]) * n_fake <= KERNEL_SLACK + 1e-9, (ours, ref)
    assert abs(ours[1] - ref[1]) * n_real <= KERNEL_SLACK + 1e-9, (ours, ref)


def _ulps_apart(ours: np.ndarray, ref: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """(share of entries that differ, the largest difference in float16 ulps of the entry's largest operand)."""
    x16 = x.astype(np.float16).astype(np.float64)
    norms = np.square(x16).sum(1)
    largest = np.maximum.reduce([np.broadcast_to(norms[:, None], ref.shape), np.broadcast_to(norms[None], ref.shape),
                                 2 * np.abs(x16 @ x16.T), ref.astype(np.float64)])
    ulp = np.spacing(largest.astype(np.float16)).astype(np.float64)
    diff = np.abs(ours.astype(np.float64) - ref)
    return float(np.mean(diff > 0)), float(np.max(diff / ulp))


# ---------------------------------------------------------------- the tests


def test_float16_precision_recall_is_the_numpy_float16_formula_across_blocks():
    fake, real = clustered_features(0)
    p, r, fallbacks, blocks = np_precision_recall(fake, real)
    assert fallbacks == 0 and blocks == 3 * 4 + 3 * 4 + 3 * 4  # float16 throughout, in 36 blocks
    assert 0.5 < p < 0.9 and 0.4 < r < 0.8  # neither side trivially 0 or 1

    ours = _ours(fake, real, float16=True)
    _assert_close_counts(ours, (p, r), len(fake), len(real))
    # The float32 figures are other figures: float16 moves points across a radius.
    ours32 = _ours(fake, real, float16=False)
    assert ours32 != ours
    assert abs(ours32[0] - p) <= 0.03 and abs(ours32[1] - r) <= 0.03

    # Entry by entry: the kernel bound of the module docstring.
    x = np.concatenate([real, fake])
    ref, used16 = np_distances(x, x)
    d16 = adm.float16_distances(torch.from_numpy(x), torch.from_numpy(x))
    assert used16 and d16.dtype == torch.float16
    share, ulps = _ulps_apart(d16.float().numpy(), ref, x)
    assert share <= 1e-3 and ulps <= 3


def test_float16_falls_back_to_float32_per_block_where_float16_overflows():
    """Rows of a bright cluster (|x|^2 ~ 1e5 > 65504) make their blocks float32; the others stay float16."""
    fake, real = clustered_features(1)
    rng = np.random.default_rng(2)
    bright = 7.0 + rng.gamma(0.5, 0.6, size=2048)  # |bright|^2 ~ 1.1e5

    def with_bright(x: np.ndarray, n: int) -> np.ndarray:
        rows = np.maximum(bright + rng.normal(0, 0.5, size=(n, 2048)), 0).astype(np.float32)
        return np.concatenate([x, rows])  # last: in the last row block and the last column block

    fake, real = with_bright(fake, 24), with_bright(real, 30)
    p, r, fallbacks, blocks = np_precision_recall(fake, real)
    assert 0 < fallbacks < blocks  # both paths ran
    ours = _ours(fake, real, float16=True)
    _assert_close_counts(ours, (p, r), len(fake), len(real))
    assert ours != _ours(fake, real, float16=False)  # not float32 throughout either

    # One block by one: any distance that is not finite in float16 sends the whole block to float32.
    both = torch.from_numpy(np.concatenate([real[:5], real[-2:]]))
    d = adm._squared_distances(both, both, float16=True)
    exact = torch.cdist(both.double(), both.double()).square()
    assert torch.allclose(d.double(), exact, rtol=1e-5, atol=1.0)  # float32 accuracy: the fallback


@pytest.mark.parametrize(("u", "v", "expected"), [
    ([[300.0]], [[1.0]], [[89401.0]]),  # |u|^2 = inf in float16: float32, exact
    ([[300.0]], [[300.0]], [[0.0]]),  # inf - inf = nan: float32
    ([[200.0]], [[190.0]], [[0.0]]),  # 2uv = inf, norms finite: -inf floored to 0, finite: no fallback
    ([[200.0], [1.0]], [[190.0], [2.0]], [[0.0, 39200.0], [35712.0, 1.0]]),  # float16 roundings kept
])
def test_float16_distance_block_decides_as_the_evaluator(u, v, expected):
    """Values of guided-diffusion's DistanceBlock (checked with TensorFlow 2.21 on CPU), quirk included."""
    d = adm._squared_distances(torch.tensor(u), torch.tensor(v), float16=True)
    assert d.dtype == torch.float32 and d.tolist() == expected


def test_float16_uses_float32_features_and_ignores_autocast():
    fake, real = (torch.from_numpy(x) for x in clustered_features(3, n_real=200, n_fake=150))
    expected16, expected32 = adm.precision_recall(fake, real, float16=True), adm.precision_recall(fake, real)
    assert adm.precision_recall(fake.double(), real.double(), float16=True) == expected16  # via float32, as fed
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast must not make the matmuls bf16
        assert adm.precision_recall(fake, real, float16=True) == expected16
        assert adm.precision_recall(fake, real) == expected32


@pytest.mark.gpu
def test_float16_on_gpu_counts_as_on_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    fake, real = clustered_features(0)
    cpu, gpu = _ours(fake, real, float16=True), _ours(fake, real, float16=True, device="cuda")
    _assert_close_counts(gpu, cpu, len(fake), len(real))
    x = np.concatenate([real, fake])
    on_gpu = adm.float16_distances(torch.from_numpy(x).cuda(), torch.from_numpy(x).cuda()).float().cpu().numpy()
    on_cpu = adm.float16_distances(torch.from_numpy(x), torch.from_numpy(x)).float().numpy()
    share, ulps = _ulps_apart(on_gpu, on_cpu, x)
    assert share <= 1e-3 and ulps <= 3
