"""Evaluation library: streaming FID/IS against torch-fidelity, reference statistics, offline weights, demo classifier.

No real Inception weights exist offline, so the tests save a randomly initialised
torch-fidelity Inception to a local file and pass its path, as a user would pass the real one.
"""
from __future__ import annotations

import math
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from PIL import Image
from torch import nn

import titok_core.judges as demo
from eval.fidelity import INCEPTION_FILENAME, INCEPTION_URL, InceptionFeatures, InceptionWeightsError, build_inception
from eval.reference import (
    ReferenceStatsError,
    center_crop_uint8,
    load_reference_stats,
    read_reference_meta,
    reference_stats_from_folder,
    save_reference_stats,
    stats_from_npz_images,
)
from titok_core.checkpoints import CheckpointError
from titok_core.data import list_image_files
from titok_core.images import save_png, to_uint8
from titok_core.metrics import fid_from_stats, psnr, ssim


def _images(seed: int, n: int, size: int = 40, tint: tuple = (0, 0, 0)) -> torch.Tensor:
    """uint8 [n,3,size,size]: smooth random blobs (upsampled noise) plus a per-set colour tint."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 5, 5, generator=gen)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear") * 200
    x = x + torch.tensor(tint).view(1, 3, 1, 1)
    return x.clamp(0, 255).round().to(torch.uint8)


def _write_pngs(images: torch.Tensor, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return folder


# ---------------------------------------------------------------- FID / IS parity with torch-fidelity


def test_streaming_fid_and_is_match_torch_fidelity(inception_weights, tmp_path):
    real, fake = _images(1, 12), _images(2, 12, tint=(40, -20, 0))
    dir_real, dir_fake = _write_pngs(real, tmp_path / "real"), _write_pngs(fake, tmp_path / "fake")

    extractor = build_inception(inception_weights)
    stats = []
    for images in (real, fake):
        acc = InceptionFeatures(extractor=extractor)
        for batch in images.split(5):  # uneven batches: streaming must not depend on batching
            acc.update(batch)
        assert acc.count == 12
        stats.append(acc)
    mu_r, sigma_r = stats[0].fid_stats()
    mu_f, sigma_f = stats[1].fid_stats()
    assert mu_r.dtype == sigma_r.dtype == np.float64 and mu_r.shape == (2048,) and sigma_r.shape == (2048, 2048)
    ours_fid = fid_from_stats(mu_f, sigma_f, mu_r, sigma_r)
    ours_is = stats[1].inception_score(splits=3)

    theirs = torch_fidelity.calculate_metrics(
        input1=str(dir_fake), input2=str(dir_real), fid=True, isc=True, isc_splits=3, cuda=False, cache=False,
        verbose=False, save_cpu_ram=True, feature_extractor_weights_path=str(inception_weights),
    )
    assert ours_fid > 1.0  # the random network separates the two sets: the comparison is not 0 == 0
    assert ours_fid == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    assert ours_is[0] > 1.01
    assert ours_is[0] == pytest.approx(theirs["inception_score_mean"], rel=1e-4)
    assert ours_is[1] == pytest.approx(theirs["inception_score_std"], rel=1e-3, abs=1e-6)


def test_update_rejects_float_images():
    acc = InceptionFeatures(extractor=_FakeExtractor())
    with pytest.raises(ValueError, match="uint8"):
        acc.update(torch.rand(2, 3, 8, 8))


# ---------------------------------------------------------------- merging accumulators across ranks


class _FakeExtractor(nn.Module):
    """Stands in for Inception where only the bookkeeping is under test: a fixed random projection."""

    features_list = ["2048", "logits_unbiased"]

    def forward(self, x):
        gen = torch.Generator().manual_seed(0)
        flat = x.float().flatten(1) / 255
        feats = flat @ torch.randn(flat.shape[1], 2048, generator=gen)
        logits = flat @ torch.randn(flat.shape[1], 1008, generator=gen) * 3
        return feats, logits


def _ddp_worker(rank: int, world: int, init_file: str, images: torch.Tensor, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        acc = InceptionFeatures(extractor=_FakeExtractor())
        share = images[:6] if rank == 0 else images[6:]  # unequal shares, as the last rank often gets
        acc.update(share)
        mu, sigma = acc.fid_stats()
        is_mean, _ = acc.inception_score(splits=2)
        acc.fid_stats()  # a second call must not count the other ranks twice
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), mu=mu, sigma=sigma, is_mean=is_mean, count=acc.count)
    finally:
        dist.destroy_process_group()


def test_sync_across_two_processes_equals_one_process(tmp_path):
    images = _images(3, 10, size=8)
    single = InceptionFeatures(extractor=_FakeExtractor())
    single.update(images[:6])  # the same batches as the ranks: float32 matmuls vary with batch shape
    single.update(images[6:])
    mu, sigma = single.fid_stats()
    is_mean, _ = single.inception_score(splits=2)

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), images, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = np.load(tmp_path / f"rank{rank}.npz")
        assert int(got["count"]) == 10
        np.testing.assert_allclose(got["mu"], mu, rtol=1e-10)
        np.testing.assert_allclose(got["sigma"], sigma, rtol=1e-8, atol=1e-8)
        assert float(got["is_mean"]) == pytest.approx(is_mean, rel=1e-10)


def test_merge_in_one_process():
    images = _images(4, 9, size=8)
    whole, a, b = (InceptionFeatures(extractor=_FakeExtractor()) for _ in range(3))
    whole.update(images)
    a.update(images[:4])
    b.update(images[4:])
    a.merge(b)
    for x, y in zip(a.fid_stats(), whole.fid_stats()):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-9)
    assert a.inception_score(splits=3) == pytest.approx(whole.inception_score(splits=3))


# ---------------------------------------------------------------- reference statistics


def _random_stats(seed: int, dim: int = 2048, rank: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, rank))
    return rng.normal(size=dim), a @ a.T / rank


@pytest.mark.parametrize("with_images", [False, True])
def test_adm_reference_npz(tmp_path, with_images):
    mu, sigma = _random_stats(0)
    extra = {"arr_0": np.zeros((4, 8, 8, 3), np.uint8)} if with_images else {}
    path = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(path, mu=mu, sigma=sigma, mu_s=mu[:10], sigma_s=sigma[:10, :10], **extra)

    got_mu, got_sigma = load_reference_stats(path)
    assert got_mu.dtype == got_sigma.dtype == np.float64
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    assert read_reference_meta(path) == {}
    if not with_images:  # one 2048-dim FID (an eigendecomposition, ~3 s on 2 cores) is enough
        # Our own statistics may come as float32; FID against the float64 ADM file must still work.
        own = mu.astype(np.float32), sigma.astype(np.float32)
        assert fid_from_stats(*own, got_mu, got_sigma) == pytest.approx(0.0, abs=1e-2)


def test_save_load_roundtrip_and_errors(tmp_path):
    mu, sigma = _random_stats(1, dim=16, rank=4)
    path = save_reference_stats(tmp_path / "ref.npz", mu.astype(np.float32), sigma, {"folder": "x", "n": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]  # no temporary left behind
    got_mu, got_sigma = load_reference_stats(path)
    assert got_mu.dtype == np.float64 and got_sigma.shape == (16, 16)
    assert read_reference_meta(path)["n"] == 3

    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ReferenceStatsError, match="stats_from_npz_images"):
        load_reference_stats(tmp_path / "samples.npz")
    np.savez(tmp_path / "bad.npz", mu=mu, sigma=sigma[:3])
    with pytest.raises(ReferenceStatsError, match="sigma"):
        load_reference_stats(tmp_path / "bad.npz")
    with pytest.raises(ReferenceStatsError, match="not found"):
        load_reference_stats(tmp_path / "missing.npz")


def test_reference_stats_from_folder_cached(inception_weights, tmp_path, monkeypatch):
    images = _images(5, 6, size=48)
    _write_pngs(images[:3], tmp_path / "val" / "n01")
    _write_pngs(images[3:], tmp_path / "val" / "n02")
    cache = tmp_path / "cache" / "ref.npz"

    mu, sigma = reference_stats_from_folder(tmp_path / "val", cache, resolution=32, weights_path=inception_weights)
    meta = read_reference_meta(cache)
    assert meta["num_images"] == 6 and meta["resolution"] == 32 and meta["weights"] == inception_weights.name

    # The same images as an ADM-style sample .npz (uint8 [N,H,W,3]) give the same statistics.
    pixels = torch.stack([center_crop_uint8(Image.open(p), 32) for p in list_image_files(tmp_path / "val")])
    np.savez(tmp_path / "samples.npz", arr_0=pixels.permute(0, 2, 3, 1).numpy())
    mu2, sigma2 = stats_from_npz_images(tmp_path / "samples.npz", weights_path=inception_weights, batch_size=4)
    np.testing.assert_allclose(mu2, mu, rtol=1e-5, atol=1e-6)

    def no_inception(*args, **kwargs):
        raise AssertionError("cache not reused")

    monkeypatch.setattr("eval.reference.InceptionFeatures", no_inception)
    cached_mu, _ = reference_stats_from_folder(tmp_path / "val", cache, resolution=32, weights_path=inception_weights)
    np.testing.assert_array_equal(cached_mu, mu)
    with pytest.raises(AssertionError, match="cache not reused"):  # another resolution must recompute
        reference_stats_from_folder(tmp_path / "val", cache, resolution=24, weights_path=inception_weights)


# ---------------------------------------------------------------- offline weights


def test_offline_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", offline)
    with pytest.raises(InceptionWeightsError) as info:
        InceptionFeatures()
    message = str(info.value)
    assert "\n" not in message
    assert INCEPTION_FILENAME == "weights-inception-2015-12-05-6726825d.pth"
    assert INCEPTION_URL == tf_inception.URL_INCEPTION_V3  # written out in eval.fidelity, so torch-fidelity loads late
    for part in (INCEPTION_FILENAME, INCEPTION_URL, str(tmp_path / "hub" / "checkpoints" / INCEPTION_FILENAME),
                 "weights_path", "URLError"):
        assert part in message
    assert isinstance(info.value, CheckpointError)  # the CLIs turn these into one line and exit 1

    with pytest.raises(InceptionWeightsError, match="not found: .*nowhere.pth"):
        build_inception(tmp_path / "nowhere.pth")
    (tmp_path / "pickle.pth").write_bytes(b"not a torch file")
    with pytest.raises(InceptionWeightsError, match="pickle.pth"):
        build_inception(tmp_path / "pickle.pth")


def test_weights_found_in_hub_cache_without_download(inception_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / INCEPTION_FILENAME).symlink_to(inception_weights)
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: pytest.fail("downloaded"))
    extractor = build_inception()
    assert extractor.features_list == ["2048", "logits_unbiased"]


# ---------------------------------------------------------------- demo classifier

COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (250, 190, 212), (128, 128, 128)]


def _demo_folder(root: Path, per_class: dict[str, int], size: int = 32) -> Path:
    """A 10-class folder: a square of the class colour at a random place and size on a dark noisy ground."""
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c, colour in enumerate(COLOURS):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 40, size=(size, size, 3)).astype(np.uint8)
                side = int(rng.integers(size // 4, size // 2))
                y, x = rng.integers(0, size - side, size=2)
                img[y : y + side, x : x + side] = colour
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def test_demo_classifier_trains_and_is_cached(tmp_path, monkeypatch):
    root = _demo_folder(tmp_path / "demo", {"train": 12, "val": 5})
    calls = []
    train = demo.train_demo_classifier
    monkeypatch.setattr(demo, "train_demo_classifier", lambda *a, **k: calls.append(1) or train(*a, **k))
    hparams = dict(seed=0, cache_dir=tmp_path / "cache", resolution=32, width=16, steps=60, batch_size=32)

    clf = demo.load_demo_classifier(root, **hparams)
    images, labels = demo.load_split(root, "val", resolution=32, classes=clf.classes)
    images = images.float() / 255
    assert clf.classes[0] == "class_0" and len(clf.classes) == 10
    assert clf.class_accuracy(images, labels) > 0.9
    probs = clf.classify(images)
    assert probs.shape == (50, 10) and torch.allclose(probs.sum(-1), torch.ones(50), atol=1e-5)

    again = demo.load_demo_classifier(root, **hparams)
    assert len(calls) == 1  # read back from the cache, not retrained
    assert torch.equal(again.classify(images), probs)
    assert len(list((tmp_path / "cache").iterdir())) == 1

    demo.load_demo_classifier(root, **{**hparams, "seed": 1})  # another key trains again
    assert len(calls) == 2

    feats = clf.features(images)
    assert feats.shape == (50, 16 * 4)
    upsized = torch.nn.functional.interpolate(images, size=(64, 64), mode="nearest")  # any size is resized
    assert clf.class_accuracy(upsized, labels) > 0.9
    same = demo.classifier_fid(feats[::2], feats[::2])
    other = demo.classifier_fid(feats[labels < 5], feats[labels >= 5])
    assert abs(same) < 1e-4 and other > 1.0  # eigenvalue noise of a rank-deficient covariance is ~1e-6
    assert "not Inception FID" in demo.DEMO_FID_LABEL


def test_the_judges_cache_is_where_titok_cache_says_and_the_log_says_where(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TITOK_CACHE", str(tmp_path / "moved"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_cache_dir() == tmp_path / "moved" / "demo_classifier"
    monkeypatch.delenv("TITOK_CACHE")
    assert demo.default_cache_dir() == tmp_path / "xdg" / "titok_gen" / "demo_classifier"
    monkeypatch.setenv("TITOK_CACHE", str(tmp_path / "moved"))
    root = _demo_folder(tmp_path / "demo", {"train": 4, "val": 1})
    with caplog.at_level("INFO", logger="titok_core.judges"):
        demo.load_demo_classifier(root, seed=0, resolution=32, width=8, steps=2, batch_size=8)
    (cached,) = (tmp_path / "moved" / "demo_classifier").iterdir()
    assert f"trained and cached at {cached} (TITOK_CACHE= moves the cache)" in caplog.text
    assert not (tmp_path / "xdg").exists()


# ---------------------------------------------------------------- PSNR / SSIM


def test_psnr_ssim():
    gen = torch.Generator().manual_seed(0)
    a = 0.2 + 0.6 * torch.rand(3, 3, 32, 32, generator=gen)
    assert torch.isinf(psnr(a, a)).all()
    assert torch.allclose(ssim(a, a), torch.ones(3))

    shifted = a + 0.1  # MSE 0.01 -> 20 dB exactly
    assert torch.allclose(psnr(shifted, a), torch.full((3,), 20.0), atol=1e-4)
    sign = torch.randint(0, 2, a.shape, generator=gen) * 2 - 1
    noisy = a + 0.05 * sign  # MSE 0.0025 -> 10*log10(400) = 26.02 dB
    assert torch.allclose(psnr(noisy, a), torch.full((3,), 10 * math.log10(400)), atol=1e-3)
    s = ssim(noisy, a)
    assert s.shape == (3,) and (s < 0.99).all() and (s > 0).all()

    with pytest.raises(ValueError):
        psnr(a, a[:2])
    assert to_uint8(torch.tensor([0.0, 0.5, 1.0, 1.2, -0.1])).tolist() == [0, 128, 255, 255, 0]


@pytest.mark.parametrize("shape, nrow", [((10, 3, 9, 7), 4), ((3, 3, 8, 8), 8), ((1, 3, 5, 6), 8), ((3, 5, 6), 8),
                                         ((5, 1, 6, 6), 2)])
def test_png_grids_are_torchvisions_save_image_pixel_for_pixel(tmp_path, shape, nrow):
    from PIL import Image
    from torchvision.utils import save_image

    images = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1  # some out of [0, 1]
    save_png(images, tmp_path / "ours.png", nrow=nrow)
    save_image(images.clamp(0, 1), tmp_path / "theirs.png", nrow=nrow, padding=2, pad_value=1.0)
    with Image.open(tmp_path / "ours.png") as ours, Image.open(tmp_path / "theirs.png") as theirs:
        assert ours.mode == theirs.mode == "RGB" and ours.size == theirs.size
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_statistics_match_cpu(inception_weights):
    images = _images(6, 16, size=64)
    extractor = build_inception(inception_weights)
    stats = {}
    for device in ("cpu", "cuda"):
        acc = InceptionFeatures(device=device, extractor=extractor)
        for batch in images.split(7):
            acc.update(batch)
        stats[device] = acc.fid_stats()
    np.testing.assert_allclose(stats["cuda"][0], stats["cpu"][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["cuda"][1], stats["cpu"][1], rtol=1e-3, atol=1e-5)
