"""The perceptual losses of the official TiTok training: LPIPS, ConvNeXt-S, and their weighted mix.

Official: ``modeling/modules/perceptual_loss.py`` (``PerceptualLoss``) and ``lpips.py``
(``LPIPS``, after taming-transformers). Their quirks (normalisation, resizing, the mix) are
named in :mod:`tokenizer.official`; the module names and state-dict keys are the official ones.

Pretrained weights, as the official code gets them (:data:`SOURCES`):

* ConvNeXt-S: torchvision's ``ConvNeXt_Small_Weights.IMAGENET1K_V1``,
  ``convnext_small-0c510722.pth``, from download.pytorch.org;
* LPIPS's VGG16: torchvision's ``VGG16_Weights.IMAGENET1K_V1``, ``vgg16-397923af.pth``;
* LPIPS's linear layers (v0.1): ``vgg.pth``, which the official code downloads from the
  taming-transformers link and checks by md5; the ``lpips`` package ships the same file
  (``lpips/weights/v0.1/vgg.pth``, same md5), which is used when that package is installed.

A file given by path is used as it is. Otherwise the torch hub cache
(``$TORCH_HOME/hub/checkpoints``, where torchvision keeps them too) is looked at, and a missing
file is downloaded there. When that fails (offline), :class:`CheckpointError` says in one line
which file is missing and where it comes from. Random weights are built only when
``random_weights=True`` asks for them (tests, timings), never as a fallback.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from titok_core.checkpoints import CheckpointError, key_mismatches, read_state_dict
from tokenizer import official

LPIPS_CHANNELS = (64, 128, 256, 512, 512)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # torchvision vgg16().features index ranges


@dataclass(frozen=True)
class WeightSource:
    """Where a pretrained file comes from: its file name (in the torch hub cache), URL and check."""

    what: str
    file: str
    url: str
    option: str  # the tokenizer.train key that takes a local copy
    sha256_prefix: str | None = None
    md5: str | None = None


SOURCES = {
    "convnext": WeightSource(
        what="ConvNeXt-S weights (torchvision ConvNeXt_Small_Weights.IMAGENET1K_V1)",
        file="convnext_small-0c510722.pth", url="https://download.pytorch.org/models/convnext_small-0c510722.pth",
        option="loss.convnext.weights", sha256_prefix="0c510722"),
    "vgg": WeightSource(
        what="LPIPS's VGG16 weights (torchvision VGG16_Weights.IMAGENET1K_V1)",
        file="vgg16-397923af.pth", url="https://download.pytorch.org/models/vgg16-397923af.pth",
        option="loss.lpips.vgg_weights", sha256_prefix="397923af"),
    "lpips": WeightSource(
        what="LPIPS v0.1 linear layers (the lpips package's lpips/weights/v0.1/vgg.pth)",
        file="lpips_vgg_v0.1.pth", url="https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1",
        option="loss.lpips.lpips_weights", md5="d507d7349b931f0638a25a48a722f98a"),
}


# --------------------------------------------------------------------------- finding the files

def hub_checkpoint_dir() -> Path:
    """The torch hub cache's checkpoint folder ($TORCH_HOME/hub/checkpoints), where torchvision keeps weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _download(url: str, dest: Path, source: WeightSource) -> None:
    """Fetch ``url`` into ``dest`` (atomically, via torch.hub), checked by sha256 prefix or md5."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(dest), hash_prefix=source.sha256_prefix, progress=False)
    if source.md5 and _md5(dest) != source.md5:
        dest.unlink()
        raise RuntimeError(f"md5 mismatch (expected {source.md5})")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _lpips_package_file() -> Path | None:
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth"
    return path if path.is_file() else None


def weights_file(name: str, path: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """The local file of pretrained weights ``name`` ("convnext", "vgg" or "lpips"; see :data:`SOURCES`).

    ``path`` given: that file, which must exist. Otherwise the torch hub cache, then (for
    "lpips") the lpips package's copy, then a download into the cache when ``download``.
    Raises CheckpointError (one line: the file, its source and how to supply it) when none works.
    """
    source = SOURCES[name]
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{source.option}={path}: no such file (the {source.what}, from {source.url})")
        return path
    cached = hub_checkpoint_dir() / source.file
    if cached.is_file():
        return cached
    if name == "lpips" and _lpips_package_file() is not None:
        return _lpips_package_file()
    reason = "downloads are off"
    if download:
        try:
            _download(source.url, cached, source)
            return cached
        except Exception as exc:  # noqa: BLE001 - offline, refused, or a damaged download: one line below
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            reason = f"the download failed ({type(exc).__name__}{': ' + detail if detail else ''})"
    raise CheckpointError(
        f"the {source.what} are not in {cached} and {reason}; download {source.url} to that file, "
        f"or pass a local copy as {source.option}=FILE"
    )


def _load_assigned(module: nn.Module, state_dict: dict[str, torch.Tensor], *, what: str) -> nn.Module:
    """Load every tensor of a meta-device ``module`` from ``state_dict`` (keys and shapes checked)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    problems = key_mismatches(expected, {k: tuple(v.shape) for k, v in state_dict.items()})
    if problems:
        raise CheckpointError(f"{what} does not match the network: " + "; ".join(problems))
    module.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True, assign=True)
    return module.requires_grad_(False).eval()


# --------------------------------------------------------------------------- LPIPS

class _ScalingLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(official.LPIPS_SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(official.LPIPS_SCALE)[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class _VGG16Features(nn.Module):
    """torchvision's VGG16 convolutions up to relu5_3, in five slices keyed by their torchvision index."""

    def __init__(self):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        features = make_layers(cfgs["D"])
        for i, (start, stop) in enumerate(VGG_SLICES, start=1):
            part = nn.Sequential()
            for index in range(start, stop):
                part.add_module(str(index), features[index])
            setattr(self, f"slice{i}", part)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i in range(1, len(VGG_SLICES) + 1):
            x = getattr(self, f"slice{i}")(x)
            outs.append(x)
        return outs


class _NetLinLayer(nn.Module):
    """LPIPS's per-layer weights: dropout (inactive: the loss runs in eval mode) and a 1x1 conv to one channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, stride=1, padding=0, bias=False))


class LPIPS(nn.Module):
    """LPIPS with VGG16 (v0.1), as the official training uses it: two float [B,3,H,W] in [0,1]
    -> distances float [B,1,1,1] (>= 0 with the real weights; 0 for identical images).

    Built with random weights; :func:`build_lpips` loads the pretrained ones. Always in eval mode.
    Keys: ``scaling_layer.{shift,scale}``, ``net.slice{1..5}.{index}.{weight,bias}`` (torchvision's
    ``features.{index}``), ``lin{0..4}.model.1.weight``.
    """

    def __init__(self):
        super().__init__()
        self.scaling_layer = _ScalingLayer()
        self.net = _VGG16Features()
        for k, channels in enumerate(LPIPS_CHANNELS):
            setattr(self, f"lin{k}", _NetLinLayer(channels))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        outs0 = self.net(self.scaling_layer(input * 2.0 - 1.0))
        outs1 = self.net(self.scaling_layer(target * 2.0 - 1.0))
        total = None
        for k, (f0, f1) in enumerate(zip(outs0, outs1)):
            diff = (official.lpips_normalize(f0) - official.lpips_normalize(f1)) ** 2
            layer = getattr(self, f"lin{k}").model(diff).mean([2, 3], keepdim=True)
            total = layer if total is None else total + layer
        return total


def lpips_state_dict(vgg: dict[str, torch.Tensor], lins: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's VGG16 state dict (``features.{i}.*``; the classifier is ignored) and the LPIPS
    v0.1 file (``lin{k}.model.1.weight``) -> the state dict of :class:`LPIPS`."""
    out = {"scaling_layer.shift": torch.tensor(official.LPIPS_SHIFT)[None, :, None, None],
           "scaling_layer.scale": torch.tensor(official.LPIPS_SCALE)[None, :, None, None]}
    for key, value in vgg.items():
        parts = key.split(".")
        if parts[0] != "features" or len(parts) != 3:
            continue
        index = int(parts[1])
        for i, (start, stop) in enumerate(VGG_SLICES, start=1):
            if start <= index < stop:
                out[f"net.slice{i}.{index}.{parts[2]}"] = value
    for k in range(len(LPIPS_CHANNELS)):
        key = f"lin{k}.model.1.weight"
        if key in lins:
            out[key] = lins[key]
    return out


def build_lpips(*, vgg_weights: str | os.PathLike | None = None, lpips_weights: str | os.PathLike | None = None,
                random_weights: bool = False, download: bool = True) -> LPIPS:
    """LPIPS with the pretrained VGG16 and linear layers (see :func:`weights_file`), or, with
    ``random_weights``, untrained. Raises CheckpointError (one line) for a missing or wrong file."""
    if random_weights:
        return LPIPS()
    vgg_path = weights_file("vgg", vgg_weights, download=download)
    lpips_path = weights_file("lpips", lpips_weights, download=download)
    lins = read_state_dict(lpips_path)
    if "lin0.model.1.weight" not in lins:
        raise CheckpointError(f"{lpips_path} is not an LPIPS v0.1 VGG file (no lin0.model.1.weight); "
                              f"it comes from {SOURCES['lpips'].url}")
    with torch.device("meta"):
        net = LPIPS()
    state = lpips_state_dict(read_state_dict(vgg_path), lins)
    return _load_assigned(net, state, what=f"{vgg_path} + {lpips_path} (LPIPS)")


# --------------------------------------------------------------------------- ConvNeXt-S

def build_convnext(*, weights: str | os.PathLike | None = None, random_weights: bool = False,
                   download: bool = True) -> nn.Module:
    """torchvision's ConvNeXt-S (a classifier: float [B,3,224,224] normalised -> logits [B,1000]),
    frozen and in eval mode, with the ImageNet weights (see :func:`weights_file`) or, with
    ``random_weights``, untrained."""
    from torchvision.models import convnext_small

    if random_weights:
        return convnext_small(weights=None).requires_grad_(False).eval()
    path = weights_file("convnext", weights, download=download)
    with torch.device("meta"):
        net = convnext_small(weights=None)
    return _load_assigned(net, read_state_dict(path), what=f"{path} (ConvNeXt-S)")


# --------------------------------------------------------------------------- the mix

class PerceptualLoss(nn.Module):
    """The official perceptual loss ``name`` (``lpips``, ``convnext_s`` or ``lpips-convnext_s-<a>-<b>``):
    input, target float [B,3,H,W] in [0,1] -> float [B,1,1,1] (with LPIPS) or a scalar (ConvNeXt alone);
    the training loss takes its mean.

    LPIPS runs at the images' own size; ConvNeXt-S at 224 x 224 (:func:`official.convnext_resize`)
    on ImageNet-normalised images, its loss the mean squared difference of the class logits.
    Both networks are frozen and always in eval mode. Keys as the official module: ``lpips.*``,
    ``convnext.*`` (torchvision's), ``imagenet_mean``, ``imagenet_std``.
    """

    def __init__(self, name: str = "convnext_s", *, lpips: LPIPS | None = None, convnext: nn.Module | None = None):
        super().__init__()
        self.name = name
        self.weight_lpips, self.weight_convnext = official.perceptual_mix(name)
        if (self.weight_lpips is not None) != (lpips is not None):
            need = "needs" if lpips is None else "has no use for"
            raise ValueError(f"perceptual loss {name!r} {need} an LPIPS network")
        if (self.weight_convnext is not None) != (convnext is not None):
            need = "needs" if convnext is None else "has no use for"
            raise ValueError(f"perceptual loss {name!r} {need} a ConvNeXt")
        self.lpips = lpips
        self.convnext = convnext
        self.register_buffer("imagenet_mean", torch.tensor(official.IMAGENET_MEAN)[None, :, None, None])
        self.register_buffer("imagenet_std", torch.tensor(official.IMAGENET_STD)[None, :, None, None])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)

    def lpips_loss(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """LPIPS alone: float [B,1,1,1]."""
        return self.lpips(input, target)

    def convnext_loss(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """ConvNeXt-S alone: the mean squared difference of the logits, a float scalar."""
        a = self.convnext((official.convnext_resize(input) - self.imagenet_mean) / self.imagenet_std)
        b = self.convnext((official.convnext_resize(target) - self.imagenet_mean) / self.imagenet_std)
        return torch.nn.functional.mse_loss(a, b, reduction="mean")

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total, count = 0.0, 0.0
        if self.lpips is not None:
            total = total + self.weight_lpips * self.lpips_loss(input, target)
            count += self.weight_lpips
        if self.convnext is not None:
            total = total + self.weight_convnext * self.convnext_loss(input, target)
            count += self.weight_convnext
        return total / count


def build_perceptual(name: str, *, vgg_weights: str | os.PathLike | None = None,
                     lpips_weights: str | os.PathLike | None = None, convnext_weights: str | os.PathLike | None = None,
                     random_weights: bool = False, download: bool = True) -> PerceptualLoss:
    """The perceptual loss ``name`` with the networks it needs, pretrained (or untrained with
    ``random_weights``). Raises ValueError for an unknown name and CheckpointError for a missing file."""
    use_lpips, use_convnext = official.perceptual_mix(name)
    lpips = convnext = None
    if use_lpips is not None:
        lpips = build_lpips(vgg_weights=vgg_weights, lpips_weights=lpips_weights, random_weights=random_weights,
                            download=download)
    if use_convnext is not None:
        convnext = build_convnext(weights=convnext_weights, random_weights=random_weights, download=download)
    return PerceptualLoss(name, lpips=lpips, convnext=convnext)
