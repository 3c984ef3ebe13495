"""The ADM evaluator's table (IS, FID, sFID, precision, recall) and its sample .npz.

Each formula is pinned against an independent computation on random numbers; the end-to-end
tests run eval.gfid on the tiny official fixtures with a random Inception (conftest), so the
figures mean nothing, but the files and the bookkeeping are the real ones.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg
from scipy.spatial.distance import cdist

from eval import adm
from eval.fidelity import InceptionFeatures
from eval.reference import load_reference_stats
from eval.samples import class_balanced_labels, interleaved_order
from eval.state import RowLog
from titok_core.metrics import fid_from_stats

# ---------------------------------------------------------------- the formulas


def test_fid_equals_the_evaluators_scipy_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(600, 256))
    b = 0.8 * rng.normal(size=(500, 256)) @ rng.normal(size=(256, 256)) / 16 + 0.3
    (mu1, s1), (mu2, s2) = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    # guided-diffusion evaluations/evaluator.py, FIDStatistics.frechet_distance, written out directly.
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert expected > 1.0
    assert fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)


def test_inception_score_is_the_evaluators():
    logits = torch.randn(12_000, 50, generator=torch.Generator().manual_seed(0)) * 3
    p = np.exp(logits.double().numpy())
    p /= p.sum(1, keepdims=True)
    scores = []
    for start in (0, 5000, 10_000):  # the evaluator's splits of 5,000, in order: 5000, 5000, 2000
        part = p[start : start + 5000]
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0))), axis=1))))
    assert adm.inception_score(logits) == pytest.approx(np.mean(scores), rel=1e-12)


def _brute_force_precision_recall(fake: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkaanniemi et al.'s definition, straight from full distance matrices."""
    def radii(x):
        return np.sort(cdist(x, x, "sqeuclidean"), axis=1)[:, k]  # column 0 is the point itself

    d = cdist(fake, real, "sqeuclidean")  # (fake, real)
    precision = np.mean((d <= radii(real)[None, :]).any(1))
    recall = np.mean((d <= radii(fake)[:, None]).any(0))
    return float(precision), float(recall)


def test_precision_recall_equals_brute_force_knn_across_batches():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(2500, 16))
    fake = 1.1 * rng.normal(size=(2500, 16)) + 0.7
    expected = _brute_force_precision_recall(fake, real, k=3)
    assert 0.2 < expected[0] < 0.9 and 0.2 < expected[1] < 0.9  # neither side trivially 0 or 1

    t_real, t_fake = torch.from_numpy(real), torch.from_numpy(fake)
    # Uneven blocks: 4 row blocks x 3 column blocks, the last of each shorter.
    assert adm.precision_recall(t_fake, t_real, row_batch_size=700, col_batch_size=900) == expected
    assert adm.precision_recall(t_fake, t_real) == expected  # the evaluator's 10,000: one block
    p32, r32 = adm.precision_recall(t_fake.float(), t_real.float(), row_batch_size=700, col_batch_size=900)
    assert abs(p32 - expected[0]) <= 2 / 2500 and abs(r32 - expected[1]) <= 2 / 2500


def test_manifold_radii_and_the_evaluators_settings():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0], [15.0]], dtype=torch.float64)
    # Squared distance to the 3rd nearest other point: from 0 -> 7, from 1 -> 6, ...
    assert adm.manifold_radii(x, k=3, row_batch_size=2, col_batch_size=3).tolist() == [49.0, 36.0, 16.0, 49.0, 196.0]
    clamped = adm.manifold_radii(x, k=3, clamp_to_percentile=50)
    assert clamped.tolist() == [49.0, 36.0, 16.0, 49.0, 0.0]
    assert (adm.PR_NEIGHBOURS, adm.PR_ROW_BATCH_SIZE, adm.PR_COL_BATCH_SIZE, adm.IS_SPLIT_SIZE) == (3, 10_000, 10_000, 5000)
    with pytest.raises(ValueError, match="more than 3"):
        adm.manifold_radii(x[:3])


def test_interleaved_order_is_one_of_each_class_in_turn():
    labels = class_balanced_labels(50_000, 1000)
    order = interleaved_order(labels)
    assert sorted(order.tolist()) == list(range(50_000))
    assert (labels[order] == torch.arange(1000).repeat(50)).all()  # TiTok's sample_imagenet_titok.py order
    small = class_balanced_labels(7, 3)  # [0,0,0,1,1,1,2]: uneven counts
    assert small[interleaved_order(small)].tolist() == [0, 1, 2, 0, 1, 0, 1]


def test_row_log_cuts_back_to_committed_rows(tmp_path):
    log = RowLog(tmp_path / "rows", (2, 3), np.uint8)
    log.append(np.arange(12, dtype=np.uint8).reshape(2, 2, 3))
    log.append(np.full((1, 2, 3), 7))
    with open(tmp_path / "rows", "ab") as f:
        f.write(b"\x01\x02")  # a torn row, as a kill mid-append leaves
    assert len(log) == 3
    assert not log.truncate(4)
    assert log.truncate(2) and len(log) == 2 and (tmp_path / "rows").stat().st_size == 12
    np.testing.assert_array_equal(log.read(), np.arange(12).reshape(2, 2, 3))
    memory = RowLog(None, (2,), np.float32)
    memory.append(np.ones((3, 2)))
    assert memory.truncate(1) and memory.read().shape == (1, 2)


def test_samples_npz_reads_as_the_evaluator_reads_it(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, size=(5, 4, 6, 3), dtype=np.uint8)
    labels = np.array([2, 0, 1, 0, 2])
    order = np.array([1, 2, 0, 3, 4])
    path = adm.write_samples_npz(tmp_path / "s.npz", lambda i: images[i], order, labels, chunk=2)
    with np.load(path) as npz:
        assert npz.files == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(npz["arr_0"], images[order])
        assert npz["arr_1"].dtype == np.int64 and npz["arr_1"].tolist() == [0, 1, 2, 0, 2]
    # The evaluator streams arr_0 from the zip: a v1.0 header, C order, then the raw rows.
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        assert np.lib.format.read_magic(f) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        assert (shape, fortran, dtype) == ((5, 4, 6, 3), False, np.dtype(np.uint8))
        np.testing.assert_array_equal(np.frombuffer(f.read(), np.uint8).reshape(shape), images[order])
    again = adm.write_samples_npz(tmp_path / "again.npz", lambda i: images[i], order, labels)
    assert again.read_bytes() == path.read_bytes()  # no timestamps: the same samples, the same bytes


def test_table_order_and_wording():
    lines = adm.table(inception_score=1.5, fid=2.25, precision=None, recall=None, precision_recall_missing="n/a (x)")
    assert [line.split(":")[0] for line in lines] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    assert lines[2] == "sFID: n/a (needs the TF graph's spatial features)" and lines[3] == "Precision: n/a (x)"


# ---------------------------------------------------------------- eval.gfid end to end


def _smooth_images(seed: int, n: int, size: int = 64) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 5, 5, generator=gen)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear") * 255
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def adm_reference(official_tiny, tmp_path_factory) -> Path:
    """An ADM-style reference batch: arr_0 images and (random) mu/sigma that FID must take as they are.

    The images: 10 of the tiny generator's own samples (another seed) and 6 of smooth noise, so
    that precision and recall land strictly between 0 and 1.
    """
    from sampling.pipeline import load_pipeline, sample_images

    fx = official_tiny
    pipe = load_pipeline(
        generator={"spec": fx / "generator_imagebert" / "config.yaml",
                   "checkpoint": fx / "generator_imagebert" / "generator.bin"},
        tokenizer={"spec": fx / "tokenizer" / "config.yaml", "checkpoint": fx / "tokenizer" / "tokenizer.bin"},
    )
    own = sample_images(pipe, torch.arange(10), seed=99, batch_size=10, dtype="fp32")
    own = (own * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    features = np.random.default_rng(3).normal(size=(64, 2048))
    path = tmp_path_factory.mktemp("reference") / "ref.npz"
    np.savez(path, arr_0=np.concatenate([own, _smooth_images(4, 6)]), mu=features.mean(0),
             sigma=np.cov(features, rowvar=False))
    return path


def _cfg(compose, official_tiny, reference, inception_weights, tmp_path, **overrides):
    fx = official_tiny
    args = {
        "mode": "inception", "generator.spec": fx / "generator_imagebert" / "config.yaml",
        "generator.checkpoint": fx / "generator_imagebert" / "generator.bin",
        "tokenizer.spec": fx / "tokenizer" / "config.yaml", "tokenizer.checkpoint": fx / "tokenizer" / "tokenizer.bin",
        "reference": reference, "inception_weights": inception_weights, "num_samples": 12, "batch_size": 3,
        "state_every": 1, "out": "null", "seed": 5, "trainer.accelerator": "cpu", "dtype": "fp32", **overrides,
    }
    return compose("eval.gfid", [f"{k}={v}" for k, v in args.items()])


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing in eval.gfid catches it."""


def test_save_npz_survives_a_kill_and_the_table_is_of_its_samples(
    compose, official_tiny, adm_reference, inception_weights, tmp_path, monkeypatch
):
    from eval.gfid import run, summary
    from eval.state import Progress

    whole = run(_cfg(compose, official_tiny, adm_reference, inception_weights, tmp_path,
                     state_dir=tmp_path / "a", save_npz=tmp_path / "a.npz"))
    cache = adm_reference.with_name("ref.inception.npz")
    assert cache.is_file()  # the reference images' features, beside the reference

    # Killed after the 2nd batch's rows were appended but before its state was saved.
    save, calls = Progress.save, []

    def save_then_die(self, accumulators):
        calls.append(self.done)
        if len(calls) == 2:
            raise _Killed
        save(self, accumulators)

    monkeypatch.setattr(Progress, "save", save_then_die)
    cfg = _cfg(compose, official_tiny, adm_reference, inception_weights, tmp_path,
               state_dir=tmp_path / "b", save_npz=tmp_path / "b.npz")
    with pytest.raises(_Killed):
        run(cfg)
    assert not (tmp_path / "b.npz").exists()
    monkeypatch.setattr(Progress, "save", save)
    monkeypatch.setattr("eval.reference._npz_image_features", lambda *a, **k: pytest.fail("reference not cached"))
    resumed = run(cfg)
    assert resumed["batches_this_run"] == 3  # batches 2 to 4: the uncommitted 2nd is made again
    assert (tmp_path / "b.npz").read_bytes() == (tmp_path / "a.npz").read_bytes()
    table = ("inception_score", "fid", "precision", "recall", "precision_fp32", "recall_fp32", "is_mean")
    assert [resumed[k] for k in table] == [whole[k] for k in table]

    # The file holds what was measured: 12 samples, one of each class in turn, and the table's
    # IS and precision/recall come back from its images (as the official evaluator would read them).
    with np.load(tmp_path / "a.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (12, 64, 64, 3)
    assert labels.dtype == np.int64 and labels.tolist() == list(range(6)) * 2
    file_order = interleaved_order(class_balanced_labels(12, 10))  # file position -> sample index
    generated = images[np.argsort(file_order)]  # back in the order they were made: the same Inception batches
    acc = InceptionFeatures(inception_weights)
    features = torch.cat([acc.update(torch.from_numpy(generated[i : i + 3]).permute(0, 3, 1, 2)) for i in range(0, 12, 3)])
    assert whole["inception_score"] == adm.inception_score(acc.logits()[file_order])
    with np.load(cache) as ref:
        ref_features = torch.from_numpy(ref["features"])
    assert ref_features.shape == (16, 2048)
    assert 0 < whole["recall"] < 1
    # The table's precision/recall are the evaluator's (float16 distances); the float32 ones are beside them.
    assert (whole["precision"], whole["recall"]) == adm.precision_recall(features, ref_features, float16=True)
    assert (whole["precision_fp32"], whole["recall_fp32"]) == adm.precision_recall(features, ref_features)
    # FID against the reference file's own mu/sigma, as the evaluator does.
    mu, sigma = acc.fid_stats()
    assert whole["reference_stats"] == "file"
    assert whole["fid"] == pytest.approx(fid_from_stats(mu, sigma, *load_reference_stats(adm_reference)), rel=1e-6)

    lines = summary(whole).splitlines()
    assert "torch-fidelity inception-v3-compat" in lines[1] and str(inception_weights) in lines[1]
    assert [line.split(":")[0] for line in lines[2:7]] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    assert lines[4] == f"sFID: {adm.SFID_NOT_AVAILABLE}"
    assert lines[5:7] == [f"Precision: {whole['precision']:.4f}", f"Recall: {whole['recall']:.4f}"]


def test_save_npz_needs_state_dir(compose, official_tiny, adm_reference, inception_weights, tmp_path):
    from eval.gfid import run

    with pytest.raises(ValueError, match="save_npz needs state_dir"):
        run(_cfg(compose, official_tiny, adm_reference, inception_weights, tmp_path, state_dir="null",
                 save_npz=tmp_path / "x.npz"))
