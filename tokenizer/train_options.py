"""The option groups of tokenizer training (``loss``, ``optim``, ``codebook`` of ``conf/tokenizer/train.yaml``)
as frozen dataclasses; :class:`tokenizer.lightning_module.TiTokModule` takes each group whole."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tokenizer import official


@dataclass(frozen=True)
class LpipsConfig:
    vgg_weights: str | None = None  # torchvision vgg16-397923af.pth
    lpips_weights: str | None = None  # the lpips package's weights/v0.1/vgg.pth


@dataclass(frozen=True)
class ConvnextConfig:
    weights: str | None = None  # torchvision convnext_small-0c510722.pth


@dataclass(frozen=True)
class GanConfig:
    """The official discriminator (tokenizer.discriminator.NLayerDiscriminator), its hinge loss and LeCAM."""

    weight: float = 0.0  # official discriminator_weight; 0: no discriminator
    start_step: int = 20000  # official discriminator_start
    factor: float = 1.0  # official discriminator_factor
    lr: float | None = None  # official discriminator_learning_rate; None: optim.lr
    lecam_weight: float = 0.0  # official lecam_regularization_weight
    lecam_ema_decay: float = official.LECAM_EMA_DECAY
    schedule_processes: int = 1  # the official launch's processes, on which its schedule depends
    channels: int = 128  # the discriminator's hidden_channels (a multiple of 32)
    layers: int = 3  # its num_stages


@dataclass(frozen=True)
class LossConfig:
    """The ``loss`` group of tokenizer.train (conf/tokenizer/train.yaml says what each key does)."""

    reconstruction: str = "l2"
    reconstruction_weight: float = 1.0
    rate_weight: float = 0.0
    rate_warmup_steps: int = 0  # the rate weight grows linearly from 0 over these steps
    gradient_weight: float = 0.0
    quantizer_weight: float = 1.0
    kl_weight: float = 1e-6  # VAE
    logvar_init: float = 0.0  # VAE
    perceptual: str = "lpips"  # lpips | convnext_s | lpips-convnext_s-<w_lpips>-<w_convnext> (official names)
    perceptual_weight: float = 0.0
    random_weights: bool = False  # the perceptual networks untrained (tests, timings); never a fallback
    lpips: LpipsConfig = LpipsConfig()
    convnext: ConvnextConfig = ConvnextConfig()
    gan: GanConfig = GanConfig()

    @classmethod
    def from_mapping(cls, group: Mapping) -> "LossConfig":
        group = dict(group)
        lpips, gan = LpipsConfig(**dict(group.pop("lpips", {}))), GanConfig(**dict(group.pop("gan", {})))
        convnext = ConvnextConfig(**dict(group.pop("convnext", {})))
        return cls(**group, lpips=lpips, convnext=convnext, gan=gan)


@dataclass(frozen=True)
class OptimConfig:
    """The ``optim`` group: AdamW, linear warm-up then cosine to end_lr, EMA of the weights (exported)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 1e-4
    warmup_steps: int = 1000
    end_lr: float = 1e-5
    ema: bool = True
    ema_decay: float = 0.999


@dataclass(frozen=True)
class CodebookConfig:
    """The ``codebook`` group: against collapse (see :class:`CodeUsage`, :class:`ClusteringVQ`)."""

    quantizer_warmup_steps: int = 0
    revive_every_n_steps: int = 100
    usage_decay: float = 0.99
    dead_ratio: float = 0.03
    latent_buffer_size: int = 4096
    clustering_vq: bool = False  # the official clustering VQ (VQ-8k recipes)
