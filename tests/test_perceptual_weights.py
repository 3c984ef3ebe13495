"""Pretrained perceptual networks as a user gets them: local files, the torch hub cache, a download,
or one line naming the missing file and its source; random weights only when asked for.

No real weights exist offline: the tests write their own files with the real architectures' keys
and shapes (ConvNeXt-S as one constant per tensor, stored as expanded views, so the file is tiny).
"""
from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
from test_tokenizer_train import TINY, _cfg, _image_folder
from torchvision import models

from titok_core.checkpoints import CheckpointError
from tokenizer import perceptual
from tokenizer.lightning_module import TiTokModule
from tokenizer.perceptual import LPIPS_CHANNELS, SOURCES, build_convnext, build_lpips, build_perceptual


def _vgg_file(path: Path) -> Path:
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, path)
    return path


def _lins_file(path: Path) -> Path:
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(LPIPS_CHANNELS)}, path)
    return path


def _convnext_file(path: Path) -> Path:
    """torchvision's convnext_small state dict, tensor i filled with the value i (a few KB on disk)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in models.convnext_small(weights=None).state_dict().items()}
    torch.save({k: torch.full((), float(i)).expand(shape) for i, (k, shape) in enumerate(shapes.items())}, path)
    return path


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty torch hub cache, no lpips package, and downloads that fail as they do offline."""
    cache = tmp_path / "hub" / "checkpoints"
    monkeypatch.setattr(perceptual, "hub_checkpoint_dir", lambda: cache)
    monkeypatch.setattr(perceptual, "_lpips_package_file", lambda: None)
    calls = []

    def no_network(url, dest, source):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(perceptual, "_download", no_network)
    return cache, calls


def test_the_sources_are_the_official_ones():
    assert SOURCES["convnext"].url == models.ConvNeXt_Small_Weights.IMAGENET1K_V1.url
    assert SOURCES["vgg"].url == models.VGG16_Weights.IMAGENET1K_V1.url
    for source in SOURCES.values():  # torchvision's cache names, so its own downloads are found
        assert source.file in (source.url.rsplit("/", 1)[-1], "lpips_vgg_v0.1.pth")
    assert SOURCES["lpips"].md5 == "d507d7349b931f0638a25a48a722f98a"  # the official MD5_MAP's vgg_lpips


def test_lpips_from_local_files_keeps_every_tensor(tmp_path, offline):
    vgg, lins = _vgg_file(tmp_path / "vgg16.pth"), _lins_file(tmp_path / "lpips.pth")
    net = build_lpips(vgg_weights=vgg, lpips_weights=lins)
    state, vgg_sd, lin_sd = net.state_dict(), torch.load(vgg, weights_only=True), torch.load(lins, weights_only=True)
    assert torch.equal(state["net.slice1.0.weight"], vgg_sd["features.0.weight"])
    assert torch.equal(state["net.slice5.28.bias"], vgg_sd["features.28.bias"])
    assert torch.equal(state["lin3.model.1.weight"], lin_sd["lin3.model.1.weight"])
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    assert net(a, a).abs().max() < 1e-6 and (net(a, b) > 0).all()
    assert offline[1] == []  # nothing was downloaded


def test_convnext_from_a_local_file(tmp_path, offline):
    path = _convnext_file(tmp_path / "convnext.pth")
    assert path.stat().st_size < 1_000_000
    net, saved = build_convnext(weights=path), torch.load(path, weights_only=True)
    for i, (key, value) in enumerate(net.state_dict().items()):
        assert value.shape == saved[key].shape and float(value[(0,) * value.dim()]) == i, key
    assert not any(p.requires_grad for p in net.parameters()) and not net.training


def test_a_download_lands_in_the_torch_hub_cache_and_is_reused(tmp_path, monkeypatch):
    cache = tmp_path / "hub" / "checkpoints"
    monkeypatch.setattr(perceptual, "hub_checkpoint_dir", lambda: cache)
    monkeypatch.setattr(perceptual, "_lpips_package_file", lambda: None)
    local = {"vgg": _vgg_file(tmp_path / "vgg16.pth"), "lpips": _lins_file(tmp_path / "lins.pth")}
    fetched = []

    def fake_download(url, dest, source):  # stands in for torch.hub.download_url_to_file
        name = next(n for n, s in SOURCES.items() if s.url == url)
        fetched.append((name, dest))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(local[name].read_bytes())

    monkeypatch.setattr(perceptual, "_download", fake_download)
    build_lpips()
    assert fetched == [("vgg", cache / "vgg16-397923af.pth"), ("lpips", cache / "lpips_vgg_v0.1.pth")]
    build_lpips()
    assert len(fetched) == 2  # the second build reads the cache


def test_the_lpips_package_copy_is_used_when_installed(tmp_path, offline, monkeypatch):
    lins = _lins_file(tmp_path / "vgg.pth")
    monkeypatch.setattr(perceptual, "_lpips_package_file", lambda: lins)
    assert perceptual.weights_file("lpips") == lins and offline[1] == []


@pytest.mark.parametrize("name, option", [("convnext", "loss.convnext.weights"), ("vgg", "loss.lpips.vgg_weights"),
                                          ("lpips", "loss.lpips.lpips_weights")])
def test_offline_and_missing_is_one_line_naming_file_and_source(offline, name, option):
    cache, calls = offline
    with pytest.raises(CheckpointError) as err:
        perceptual.weights_file(name)
    message = str(err.value)
    assert "\n" not in message and str(cache / SOURCES[name].file) in message
    assert SOURCES[name].url in message and option in message and "URLError" in message
    assert calls == [SOURCES[name].url]
    with pytest.raises(CheckpointError, match="downloads are off"):
        perceptual.weights_file(name, download=False)
    assert len(calls) == 1


def test_a_given_file_that_is_missing_is_one_line(tmp_path, offline):
    with pytest.raises(CheckpointError) as err:
        build_perceptual("lpips-convnext_s-1.0-0.1", vgg_weights=tmp_path / "vgg.pth",
                         lpips_weights=_lins_file(tmp_path / "lins.pth"))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"loss.lpips.vgg_weights={tmp_path / 'vgg.pth'}: no such file")
    assert SOURCES["vgg"].url in message and offline[1] == []


def test_a_file_of_another_network_is_refused(tmp_path, offline):
    vgg = _vgg_file(tmp_path / "vgg16.pth")
    with pytest.raises(CheckpointError, match="does not match the network") as err:
        build_convnext(weights=vgg)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="not an LPIPS v0.1 VGG file"):
        build_lpips(vgg_weights=vgg, lpips_weights=vgg)


def test_training_stops_instead_of_training_without_the_perceptual_loss(tmp_path, offline):
    """Formerly a missing LPIPS file was skipped with a warning; now the run stops before it starts."""
    _image_folder(tmp_path / "data", 16, per_class=1)
    from tokenizer.train import train

    with pytest.raises(CheckpointError, match="LPIPS's VGG16 weights") as err:
        train(_cfg(tmp_path, "trainer.max_steps=1", "loss.perceptual_weight=0.1"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "last.ckpt").exists()


def test_random_weights_only_when_asked(tmp_path, offline):
    loss = {"perceptual": "lpips", "perceptual_weight": 0.1, "random_weights": True}
    module = TiTokModule(model_config=TINY, loss=loss)
    assert module.perceptual is not None and module.perceptual.lpips is not None and offline[1] == []
    with pytest.raises(CheckpointError):
        TiTokModule(model_config=TINY, loss={**loss, "random_weights": False})
