"""The official TiTok discriminator (``NLayerDiscriminator`` of the official
``modeling/modules/discriminator.py``), with its architecture and state-dict key names, so that
official discriminator weights load into it (``load_state_dict(strict=True)``).

A patch discriminator without strided convolutions: a 5x5 convolution, then ``num_stages``
stages of (3x3 convolution -> 2x downsampling by a binomial blur filter (or 2x2 average
pooling) -> GroupNorm(32) -> LeakyReLU(0.1)), a max-pool to a 16 x 16 grid, and two
convolutions to one logit per cell. The quirks are named in :mod:`tokenizer.official`
(``same_padding``, ``BLUR_PAD_TAPS``, ``DISCRIMINATOR_GRID``).

Keys (hidden_channels C, three stages): ``block_in.0.{weight,bias}`` [C,3,5,5];
``blocks.{i}.0.{weight,bias}`` (3x3 conv), ``blocks.{i}.1.kernel`` (the blur filter, a buffer;
absent with average pooling), ``blocks.{i}.2.{weight,bias}`` (GroupNorm); ``to_logits.0.*``
(1x1 conv) and ``to_logits.2.*`` (5x5 conv to one channel).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer import official


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TensorFlow "SAME" padding computed from the input size (:func:`official.same_padding`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = official.same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = official.same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        if top or bottom or left or right:
            x = F.pad(x, [left, right, top, bottom])
        return super().forward(x)


class BlurBlock(nn.Module):
    """2x downsampling by a separable binomial filter, per channel: [B,C,H,W] -> [B,C,ceil(H/2),ceil(W/2)].

    ``taps`` (1, 3, 3, 1) is the official default; the filter is their outer product, summed to 1,
    kept as the buffer ``kernel`` [1,1,k,k]. The input is padded as for a 4-tap filter
    (``official.BLUR_PAD_TAPS``), which is what the official block does for every kernel size.
    """

    def __init__(self, taps: tuple[int, ...] = official.BLUR_KERNELS[4]):
        super().__init__()
        k = torch.tensor(taps, dtype=torch.float32)
        k = k[None, :] * k[:, None]
        self.register_buffer("kernel", (k / k.sum())[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = official.same_padding(x.shape[-2], official.BLUR_PAD_TAPS, 2)
        left, right = official.same_padding(x.shape[-1], official.BLUR_PAD_TAPS, 2)
        if top or bottom or left or right:
            x = F.pad(x, [left, right, top, bottom])
        weight = self.kernel.expand(x.shape[1], -1, -1, -1)
        return F.conv2d(x, weight, stride=2, groups=x.shape[1])


class NLayerDiscriminator(nn.Module):
    """The official discriminator: images float [B,C_in,H,W] in [0,1] -> logits float [B,1,16,16].

    hidden_channels: width of the first stage (a multiple of 32, for GroupNorm(32)); stage i
    (from 0) has ``hidden_channels * 2**i`` channels (128, 256, 512 for the official 128 and 3 stages).
    blur_resample: downsample with :class:`BlurBlock` (official) or with 2x2 average pooling;
    blur_kernel_size: 3, 4 or 5 taps.
    """

    def __init__(self, *, num_channels: int = 3, hidden_channels: int = 128, num_stages: int = 3,
                 blur_resample: bool = True, blur_kernel_size: int = 4):
        super().__init__()
        if num_stages < 1:
            raise ValueError(f"the discriminator needs at least one stage, got num_stages={num_stages}")
        if hidden_channels < 32 or hidden_channels % 32:
            raise ValueError(f"the discriminator's hidden_channels must be a multiple of 32 (GroupNorm(32)), "
                             f"got {hidden_channels}")
        if blur_resample and blur_kernel_size not in official.BLUR_KERNELS:
            raise ValueError(f"blur_kernel_size must be 3, 4 or 5, got {blur_kernel_size}")
        act = functools.partial(nn.LeakyReLU, negative_slope=0.1)
        mult = (1, *(2**i for i in range(num_stages)))
        self.block_in = nn.Sequential(Conv2dSame(num_channels, hidden_channels, kernel_size=5), act())
        blocks = []
        for i in range(num_stages):
            c_in, c_out = hidden_channels * mult[i], hidden_channels * mult[i + 1]
            down = BlurBlock(official.BLUR_KERNELS[blur_kernel_size]) if blur_resample else nn.AvgPool2d(2, 2)
            blocks.append(nn.Sequential(Conv2dSame(c_in, c_out, kernel_size=3), down, nn.GroupNorm(32, c_out), act()))
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveMaxPool2d((official.DISCRIMINATOR_GRID, official.DISCRIMINATOR_GRID))
        self.to_logits = nn.Sequential(Conv2dSame(c_out, c_out, kernel_size=1), act(),
                                       Conv2dSame(c_out, 1, kernel_size=5))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.block_in(images)
        for block in self.blocks:
            x = block(x)
        return self.to_logits(self.pool(x))
