"""Proxy-code targets for TiTok's stage-1 recipe: a frozen MaskGIT-VQGAN encoder + quantiser.

Stage 1 trains TiTok to predict, per patch, the code that the pretrained MaskGIT-VQGAN
(``maskgit-vqgan-imagenet-f16-256.bin``) assigns to it; the VQGAN decoder and codebook then
render pixels (they become TiTok's ``pixel_decoder`` / ``proxy_codebook``, frozen).

The VQGAN file is read with the official key names (``encoder.*``, ``decoder.*``,
``quantize.embedding.weight``); sizes are read off the tensors, so any MaskGIT-VQGAN with
the (1, 1, 2, 2, 4) decoder that TiTok's pixel decoder has loads without a config.
"""
from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from titok_core.checkpoints import CheckpointError, load_strict, read_state_dict
from tokenizer import official
from tokenizer.model import ResBlock


class VQGANEncoder(nn.Module):
    """MaskGIT-VQGAN encoder: conv -> (res blocks, avg-pool 2) per level -> res blocks -> 1x1 conv.

    forward: images float [B,3,H,W] in [0,1] -> features float [B,z_channels,H/2^(L-1),W/2^(L-1)].
    """

    def __init__(self, *, hidden_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int, z_channels: int):
        super().__init__()
        chans = [hidden_channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(3, hidden_channels, 3, padding=1, bias=False)
        ins = [hidden_channels, *chans[:-1]]
        self.down = nn.ModuleList(
            nn.ModuleList(ResBlock(ins[i] if j == 0 else chans[i], chans[i]) for j in range(num_res_blocks))
            for i in range(len(chans))
        )
        self.mid = nn.ModuleList(ResBlock(chans[-1], chans[-1]) for _ in range(num_res_blocks))
        self.norm_out = nn.GroupNorm(32, chans[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chans[-1], z_channels, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(images)
        for level, blocks in enumerate(self.down):
            for block in blocks:
                x = block(x)
            if level != len(self.down) - 1:
                x = F.avg_pool2d(x, kernel_size=2, stride=2)
        for block in self.mid:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class ProxyCodes(nn.Module):
    """Frozen VQGAN encoder + codebook: images float [B,3,H,W] in [0,1] -> codes int64 [B,G,G]."""

    def __init__(self, encoder: VQGANEncoder, codebook: torch.Tensor):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("codebook", codebook.float().clone())
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "ProxyCodes":
        return super().train(False)  # always frozen

    @torch.no_grad()
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = self.encoder(images.float())  # (B, C, G, G)
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        # Expanded squared distance, as the official quantiser computes it.
        d = flat.pow(2).sum(1, keepdim=True) + self.codebook.pow(2).sum(1) - 2 * flat @ self.codebook.T
        return d.argmin(dim=1).view(b, h, w)


def _encoder_sizes(sd: dict[str, torch.Tensor]) -> dict:
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    hidden = sd["encoder.conv_in.weight"].shape[0]
    mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // hidden for i in levels)
    return {
        "hidden_channels": hidden, "channel_mult": mult, "num_res_blocks": len(blocks),
        "z_channels": sd["encoder.conv_out.weight"].shape[0],
    }


def load_maskgit_vqgan(path: str | os.PathLike) -> tuple[ProxyCodes, dict, dict[str, torch.Tensor]]:
    """Read an official MaskGIT-VQGAN state dict.

    Returns (frozen proxy-code target, the TiTok config keys it implies, TiTok state-dict
    entries for ``proxy_codebook`` and ``pixel_decoder``). Fails loudly on a file that is not
    a MaskGIT-VQGAN.
    """
    sd = read_state_dict(path)
    if "quantize.embedding.weight" not in sd or "encoder.conv_in.weight" not in sd:
        raise CheckpointError(f"{path} is not a MaskGIT-VQGAN state dict (no encoder.conv_in / quantize.embedding)")
    sizes = _encoder_sizes(sd)
    encoder = VQGANEncoder(**sizes)
    ours = {}
    for key, value in sd.items():
        if key.startswith("encoder."):
            new = re.sub(r"^down\.(\d+)\.block\.", r"down.\1.", key[len("encoder."):])
            ours[new.replace(".nin_shortcut.", ".shortcut.")] = value
    load_strict(encoder, ours, what=f"MaskGIT-VQGAN encoder {path}")
    codebook = sd["quantize.embedding.weight"]
    titok_config = {
        "proxy_codebook_size": codebook.shape[0], "proxy_code_dim": codebook.shape[1],
        "pixel_decoder_hidden_channels": sizes["hidden_channels"],
    }
    # The decoder and codebook go through the same renames as an official TiTok's copy of them.
    renamed = {f"pixel_{k}": v for k, v in sd.items() if k.startswith("decoder.")}
    renamed["pixel_quantize.embedding.weight"] = codebook
    pixel_state = official.state_dict_from_official(renamed, {"decoder_output": "proxy_codes"})
    return ProxyCodes(encoder, codebook), titok_config, pixel_state
