"""TiTok: a 1D image tokenizer (ViT encoder -> latent tokens -> VQ, FSQ or VAE -> ViT decoder -> pixels).

Built from the smallest part up: attention block -> ViT encoder/decoder -> quantiser ->
MaskGIT-VQGAN pixel decoder -> TiTok, which one :class:`tokenizer.config.TiTokConfig` sizes.
Key names are this project's own; the official names are converted in :mod:`tokenizer.official`,
which also documents every quirk that the released checkpoints need.

Shapes: B batch, N latent tokens, T token (code) size, D width, G = image_size // patch_size.

One file (over 600 lines) on purpose: every part here exists only to be a part of TiTok, and the
official checkpoints' key names map onto this one file's modules, so reading it top to bottom
follows the forward pass that :mod:`tokenizer.official` converts into.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from titok_core.attention import attention
from titok_core.errors import UsageError
from tokenizer import official
from tokenizer.config import TiTokConfig


class Attention(nn.Module):
    """Multi-head self-attention: qkv Linear -> attention (titok_core.attention) -> proj."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise UsageError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (k h d) -> k b h l d", k=3, h=self.num_heads)
        x = attention(q, k, v)  # (B, H, L, Dh)
        return self.proj(rearrange(x, "b h l d -> b l (h d)"))


class Block(nn.Module):
    """Pre-LN transformer block (CLIP-style, as TiTok's ResidualAttentionBlock)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ConvStem(nn.Sequential):
    """Patch embedding by stride-2 3x3 convs (Xiao et al. 2021, "Early convolutions help
    transformers see better"): [B,3,H,W] -> [B,width,H/p,W/p] for a power-of-two patch size p.

    Cheap (a few MFLOP at 64x64) and it makes a small ViT tokenizer learn edges much sooner
    than one linear projection per patch does.
    """

    def __init__(self, *, patch_size: int, width: int):
        n = patch_size.bit_length() - 1
        if 2**n != patch_size or n < 1:
            raise UsageError(f"a conv stem needs a power-of-two patch size >= 2, got {patch_size}")
        chans = [3] + [max(16, width >> (n - 1 - i)) for i in range(n)]  # ..., width/4, width/2, width
        layers: list[nn.Module] = []
        for i in range(n):
            layers.append(nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1))
            if i < n - 1:
                layers.append(nn.GELU())
        super().__init__(*layers)


class DenseMixing(nn.Module):
    """A dense path between two token sets: [B,L_in,D] -> narrow to ``rank`` per token -> flatten ->
    Linear -> [B,L_out,D], zero-initialised so it starts as a no-op.

    Attention has to learn where to look before a ViT autoencoder can route an image through
    its 1D latent tokens, which takes a small model thousands of steps; this linear map gives
    gradients a direct route from the first step, and attention refines what it carries.
    """

    def __init__(self, tokens_in: int, tokens_out: int, width: int, rank: int):
        super().__init__()
        self.tokens_out, self.width = tokens_out, width
        self.narrow = nn.Linear(width, rank)
        self.mix = nn.Linear(tokens_in * rank, tokens_out * width)
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.narrow(x).flatten(1)).view(x.shape[0], self.tokens_out, self.width)


def _embedding(*shape: int, width: int) -> nn.Parameter:
    return nn.Parameter(width**-0.5 * torch.randn(*shape, width))


def sincos_grid(grid_size: int, width: int) -> torch.Tensor:
    """2D sine-cosine position codes (as MAE's) for a ``grid_size`` x ``grid_size`` patch grid:
    float [G*G, width], row-major; half the channels code the row, half the column."""
    if width % 4:
        raise UsageError(f"sin-cos position codes need a width divisible by 4, got {width}")
    freqs = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    pos = torch.arange(grid_size, dtype=torch.float64)[:, None] * freqs  # (G, D/4)
    axis = torch.cat([pos.sin(), pos.cos()], dim=1)  # (G, D/2)
    rows = axis[:, None].expand(grid_size, grid_size, -1)
    cols = axis[None, :].expand(grid_size, grid_size, -1)
    return torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, width).float()


def _init_patch_positions(embedding: nn.Parameter, grid_size: int, scale: float) -> None:
    """Patch rows of a [1+G*G, D] positional embedding (row 0: the class token) <- scaled sin-cos codes.

    They stay learnable. A small tokenizer trained from scratch must otherwise learn where each
    patch is from random vectors before it can place an edge; with these it can read the
    position linearly from the first step.
    """
    with torch.no_grad():
        embedding[1:] = scale * sincos_grid(grid_size, embedding.shape[-1])


class TiTokEncoder(nn.Module):
    """Patches + class token + learnable latent tokens -> ViT -> latent token features.

    forward: images float [B,3,H,W], latent_tokens [N,D] -> float [B,N,T] (before quantisation).
    """

    def __init__(
        self, *, image_size: int, patch_size: int, width: int, depth: int, num_heads: int,
        num_tokens: int, token_size: int, legacy_layout: bool, conv_stem: bool = False,
        dense_mixing: int = 0, sincos_positions: bool = False,
    ):
        super().__init__()
        self.grid_size = image_size // patch_size
        self.width = width
        self.legacy_layout = legacy_layout
        if conv_stem:
            self.patch_embed = ConvStem(patch_size=patch_size, width=width)
        else:
            self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.class_embedding = _embedding(1, width=width)
        self.positional_embedding = _embedding(self.grid_size**2 + 1, width=width)
        if sincos_positions:
            _init_patch_positions(self.positional_embedding, self.grid_size, scale=0.2)
        self.latent_positional_embedding = _embedding(num_tokens, width=width)
        self.norm_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(Block(width, num_heads) for _ in range(depth))
        self.norm_post = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, token_size)
        # Optional dense path patches -> latent tokens (see TiTok's ``dense_mixing``).
        self.mix = DenseMixing(self.grid_size**2, num_tokens, width, dense_mixing) if dense_mixing else None

    def forward(self, images: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        x = rearrange(self.patch_embed(images), "b d h w -> b (h w) d")  # (B, G*G, D)
        cls = self.class_embedding.to(x.dtype).expand(b, -1, -1)
        latents = (latent_tokens + self.latent_positional_embedding).to(x.dtype).expand(b, -1, -1)
        if self.mix is not None:
            latents = latents + self.mix(x)  # (B, N, D)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.norm_pre(torch.cat([x, latents], dim=1))  # (B, 1+G*G+N, D)
        for block in self.blocks:
            x = block(x)
        x = self.norm_post(x[:, 1 + self.grid_size**2 :])  # (B, N, D)
        if self.legacy_layout:
            x = official.legacy_latent_layout(x)
        return self.proj_out(x)  # (B, N, T)


class TiTokDecoder(nn.Module):
    """Latent tokens + mask tokens per patch -> ViT -> per-patch outputs.

    forward: z float [B,N,T] -> proxy-code logits [B,1024,G,G] (``output="proxy_codes"``),
    RGB [B,3,H,W] (``output="rgb"``, the official non-legacy variant) or a feature grid
    [B,feature_channels,G,G] for a conv pixel decoder (``output="features"``).
    """

    def __init__(
        self, *, image_size: int, patch_size: int, width: int, depth: int, num_heads: int,
        num_tokens: int, token_size: int, output: str, proxy_codebook_size: int = 1024,
        feature_channels: int = 0, dense_mixing: int = 0, sincos_positions: bool = False,
    ):
        super().__init__()
        if output not in ("proxy_codes", "rgb", "features"):
            raise ValueError(f"decoder output must be 'proxy_codes', 'rgb' or 'features', got {output!r}")
        self.grid_size = image_size // patch_size
        self.patch_size = patch_size
        self.output = output
        self.embed = nn.Linear(token_size, width)
        self.class_embedding = _embedding(1, width=width)
        self.positional_embedding = _embedding(self.grid_size**2 + 1, width=width)
        if sincos_positions:
            _init_patch_positions(self.positional_embedding, self.grid_size, scale=1.0)
        self.mask_token = _embedding(1, 1, width=width)
        self.latent_positional_embedding = _embedding(num_tokens, width=width)
        self.norm_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(Block(width, num_heads) for _ in range(depth))
        self.norm_post = nn.LayerNorm(width)
        # Optional dense path latent tokens -> patch queries (see TiTok's ``dense_mixing``).
        self.mix = DenseMixing(num_tokens, self.grid_size**2, width, dense_mixing) if dense_mixing else None
        if output == "proxy_codes":
            self.head = nn.Sequential(
                nn.Linear(width, 2 * width), nn.Tanh(), nn.Linear(2 * width, proxy_codebook_size)
            )
        elif output == "features":
            self.head = nn.Linear(width, feature_channels)
        else:
            self.head = nn.Linear(width, patch_size * patch_size * 3)
            self.conv_out = nn.Conv2d(3, 3, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, n, _ = z.shape
        x = self.embed(z) + self.latent_positional_embedding[:n]  # (B, N, D)
        g2 = self.grid_size**2
        queries = torch.cat(
            [self.class_embedding.expand(b, -1, -1), self.mask_token.expand(b, g2, -1)], dim=1
        ) + self.positional_embedding
        if self.mix is not None:
            queries = queries + F.pad(self.mix(x), (0, 0, 1, 0))  # (B, 1+G*G, D); not the class token
        x = self.norm_pre(torch.cat([queries.to(x.dtype), x], dim=1))  # (B, 1+G*G+N, D)
        for block in self.blocks:
            x = block(x)
        x = self.head(self.norm_post(x[:, 1 : 1 + g2]))  # (B, G*G, C)
        g, p = self.grid_size, self.patch_size
        if self.output != "rgb":
            return rearrange(x, "b (h w) c -> b c h w", h=g)
        x = rearrange(x, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=g, p1=p, p2=p)
        return self.conv_out(x)


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser, l2-normalised codes optional; always computed in float32.

    forward: z float [B,N,T] -> (z_q [B,N,T] straight-through, tokens int64 [B,N], losses dict).
    """

    def __init__(self, *, codebook_size: int, token_size: int, use_l2_norm: bool, commitment_cost: float = 0.25):
        super().__init__()
        self.use_l2_norm = use_l2_norm
        self.commitment_cost = commitment_cost
        self.embedding = nn.Embedding(codebook_size, token_size)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight.float()
        return F.normalize(w, dim=-1) if self.use_l2_norm else w

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 [...] -> float32 [..., T] code vectors."""
        return F.embedding(tokens, self.codebook())

    def distances(self, flat: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """Squared distances of latents float [M,T] to every code: float32 [M,K] (normalised
        latents and codes when ``use_l2_norm``; ``codes`` = :meth:`codebook` when not given).

        The expanded form ``|z|^2 + |e|^2 - 2 z.e``, the official formula, so argmin ties break
        identically."""
        flat = flat.float()
        if self.use_l2_norm:
            flat = F.normalize(flat, dim=-1)
        codes = self.codebook() if codes is None else codes
        return flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.T

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        z = z.float()
        codes = self.codebook()
        d = self.distances(z.reshape(-1, z.shape[-1]), codes)  # (B*N, K)
        tokens = d.argmin(dim=1).view(z.shape[:-1])  # (B, N)
        if self.use_l2_norm:
            z = F.normalize(z, dim=-1)
        z_q = F.embedding(tokens, codes)
        commitment = self.commitment_cost * torch.mean((z_q.detach() - z) ** 2)
        codebook = torch.mean((z_q - z.detach()) ** 2)
        losses = {"quantizer_loss": commitment + codebook, "commitment_loss": commitment, "codebook_loss": codebook}
        return z + (z_q - z).detach(), tokens, losses


class ClusteringVQ(nn.Module):
    """The official clustering VQ (``clustering_vq``, the VQ-8k single-stage recipe): a training-time
    codebook update that pulls every rarely used code onto the latent nearest to it.

    Keeps ``embed_prob`` [K], an EMA (decay ``official.CLUSTERING_DECAY``) of each code's share of
    the tokens. :meth:`update` then moves each code e_k towards the unnormalised latent z* that is
    nearest to it in the quantiser's distance: ``e_k <- e_k (1 - w_k) + z* w_k`` with
    ``w_k = official.clustering_replace_weight`` (~1 for an unused code, ~0 for a used one).
    The buffer is the training state (it travels in a training checkpoint), never part of the
    tokenizer's weights.

    Order: the official quantiser updates the codebook inside every training forward, after the
    forward's codes were picked; gradients do not depend on the codebook's new values. Call
    :meth:`update` once per forward (per micro-batch with accumulation), after its backward and
    before the optimiser step: that gives the official numbers. With several processes give it
    every process's latents (gathered, in rank order), as the official code gathers them.
    """

    def __init__(self, codebook_size: int, *, decay: float = official.CLUSTERING_DECAY):
        super().__init__()
        self.codebook_size, self.decay = codebook_size, decay
        self.register_buffer("embed_prob", torch.zeros(codebook_size))

    @torch.no_grad()
    def update(self, quantizer: "VectorQuantizer", latents: torch.Tensor) -> torch.Tensor:
        """latents: the encoder's outputs float [..., T] before quantisation (all processes').
        Updates ``embed_prob`` and ``quantizer.embedding.weight`` in place; returns the replacement
        weights float32 [K]."""
        flat = latents.detach().reshape(-1, latents.shape[-1]).float()  # (M, T)
        d = quantizer.distances(flat)  # (M, K)
        tokens = d.argmin(dim=1)
        # The official mean of one-hot rows; as counts / M it needs no [M, K] matrix (same values on CPU).
        share = torch.bincount(tokens, minlength=self.codebook_size).float() / flat.shape[0]
        self.embed_prob.mul_(self.decay).add_(share, alpha=1 - self.decay)
        nearest = flat[d.argmin(dim=0)]  # (K, T): for each code, the latent nearest to it
        w = official.clustering_replace_weight(self.embed_prob, self.codebook_size)[:, None]
        weight = quantizer.embedding.weight
        weight.copy_(weight * (1 - w) + nearest.to(weight.dtype) * w)
        return w[:, 0]


class FSQ(nn.Module):
    """Finite scalar quantisation (Mentzer et al. 2023, arXiv 2309.15505); always float32.

    Each of the T = len(levels) channels is bounded with tanh to ``levels[i]`` values and rounded
    (straight-through), so the implicit codebook is the grid of prod(levels) points in [-1, 1]^T.
    There is no learned codebook, hence nothing to collapse and no auxiliary loss.

    forward: z float [B,N,T] -> (z_q float32 [B,N,T] straight-through, tokens int64 [B,N], losses
    dict of zeros, for the same interface as :class:`VectorQuantizer`).
    """

    def __init__(self, *, levels: tuple[int, ...] | list[int]):
        super().__init__()
        if not levels or any(int(n) < 2 for n in levels):
            raise UsageError(f"FSQ levels must be integers >= 2, got {list(levels)}")
        lv = torch.tensor([int(n) for n in levels], dtype=torch.long)
        self.register_buffer("levels", lv, persistent=False)
        self.register_buffer("basis", torch.cumprod(torch.cat([lv.new_ones(1), lv[:-1]]), 0), persistent=False)
        self.codebook_size = math.prod(int(n) for n in levels)  # from Python ints: also builds on the meta device

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        """float [...,T] -> values in (-L/2, L/2) that round to the L integer levels of each channel."""
        lv = self.levels.float()
        half = (lv - 1) * (1 - 1e-3) / 2
        offset = torch.where(self.levels % 2 == 1, 0.0, 0.5)  # even L: levels sit at half-integers
        return torch.tanh(z + torch.atanh(offset / half)) * half - offset

    def _digits_to_codes(self, digits: torch.Tensor) -> torch.Tensor:
        half_width = (self.levels // 2).float()
        return (digits.float() - half_width) / half_width

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 [...] -> float32 [..., T] grid points in [-1, 1]."""
        digits = (tokens[..., None] // self.basis) % self.levels
        return self._digits_to_codes(digits)

    def digit_positions(self, z: torch.Tensor) -> torch.Tensor:
        """Where the latents sit between the integer levels: float [B,N,T] -> float32 [B,N,T], channel i
        in [0, levels[i] - 1]; it rounds to the channel's digit of the token."""
        return self._bound(z.float()) + (self.levels // 2).float()

    def continuous(self, z: torch.Tensor) -> torch.Tensor:
        """The latents before rounding, on the codes' scale: float [B,N,T] -> float32 [B,N,T] in (-1, 1).
        A quantiser warm-up feeds these to the decoder, so an informative latent forms first."""
        return self._bound(z.float()) / (self.levels // 2).float()

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        bounded = self._bound(z.float())
        rounded = bounded + (bounded.round() - bounded).detach()
        half_width = (self.levels // 2).float()
        z_q = rounded / half_width  # (B, N, T) in [-1, 1]
        digits = (rounded.detach() + half_width).round().long()
        tokens = (digits * self.basis).sum(-1)  # (B, N)
        zero = z.new_zeros((), dtype=torch.float32)
        return z_q, tokens, {"quantizer_loss": zero, "commitment_loss": zero, "codebook_loss": zero}


class ResBlock(nn.Module):
    """MaskGIT-VQGAN residual block (GroupNorm(32) -> SiLU -> conv, twice).

    When the channel count changes, the official block feeds its *output* through the 1x1
    shortcut instead of its input (see ``official.SHORTCUT_ON_OUTPUT``); checkpoints need it.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(32, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(out_channels, out_channels, 1, bias=False) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.shortcut is not None:
            return official.resblock_shortcut_on_output(h, self.shortcut)
        return h + x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, upsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_res_blocks)
        )
        self.upsample_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.upsample_conv is not None:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class PixelDecoder(nn.Module):
    """The MaskGIT-VQGAN convolutional decoder: [B,z_channels,G,G] -> RGB [B,3,G*2^(L-1)*s,...].

    ``out_upscale`` s > 1 ends in a sub-pixel convolution (conv to 3*s*s channels, then
    pixel shuffle), which renders the last s-fold upsampling without any full-resolution conv.
    """

    def __init__(
        self, *, hidden_channels: int = 128, channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2, z_channels: int = 256, out_upscale: int = 1,
    ):
        super().__init__()
        self.out_upscale = out_upscale
        chans = [hidden_channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(z_channels, chans[-1], 3, padding=1)
        self.mid = nn.ModuleList(ResBlock(chans[-1], chans[-1]) for _ in range(num_res_blocks))
        # Lowest resolution first, the order in which they run.
        levels = list(range(len(chans)))[::-1]
        self.up = nn.ModuleList(
            UpBlock(chans[min(i + 1, len(chans) - 1)], chans[i], num_res_blocks, upsample=i != 0) for i in levels
        )
        self.norm_out = nn.GroupNorm(32, chans[0], eps=1e-6)
        self.conv_out = nn.Conv2d(chans[0], 3 * out_upscale**2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.mid:
            x = block(x)
        for block in self.up:
            x = block(x)
        x = self.conv_out(F.silu(self.norm_out(x)))
        return F.pixel_shuffle(x, self.out_upscale) if self.out_upscale > 1 else x


class TiTok(nn.Module):
    """The TiTok tokenizer, built from a :class:`tokenizer.config.TiTokConfig` (kept as ``.config``).

    Images are float [B,3,H,W] in [0,1] (no mean/std normalisation, as the official code);
    tokens are int64 [B,N] in [0, codebook_size).

    ``quantizer`` is the one switch between token kinds. ``"vq"`` quantises each latent token
    to the nearest of ``codebook_size`` codes; ``"fsq"`` is finite scalar quantisation with
    ``fsq_levels`` (codebook_size = prod(levels), token_size = len(levels)). ``"vae"`` (the
    released continuous tokenizers) has no codebook: the encoder predicts a diagonal Gaussian
    posterior over ``token_size`` channels per token (mean and log-variance,
    :func:`tokenizer.official.diagonal_gaussian`), and the decoder takes latents float [B,N,T]
    instead of tokens; ``codebook_size`` is then None and ``is_discrete`` False.

    ``decoder_output="proxy_codes"`` is the released two-stage design: the ViT decoder
    predicts logits over the 1024 MaskGIT-VQGAN codes, their softmax weights the VQGAN
    codebook and the VQGAN conv decoder renders pixels. ``"rgb"`` is the official
    non-legacy single-stage variant (the ViT decoder predicts pixels). ``"conv"`` is this project's
    small-scale design: the ViT decoder predicts a feature grid that a MaskGIT-VQGAN-style conv
    decoder (``pixel_decoder_*``) upsamples to pixels, which keeps edges sharp at little cost.
    """

    def __init__(self, config: TiTokConfig | None = None):
        super().__init__()
        c = TiTokConfig() if config is None else config
        self.config = c
        self.image_size = c.image_size
        self.num_tokens = c.num_tokens
        self.token_size = c.token_size
        self.quantizer = c.quantizer
        self.codebook_size = c.codebook_size
        self.decoder_output = c.decoder_output
        self.latent_tokens = _embedding(c.num_tokens, width=c.enc_width)
        self.encoder = TiTokEncoder(
            image_size=c.image_size, patch_size=c.patch_size, width=c.enc_width, depth=c.enc_depth,
            num_heads=c.enc_heads, num_tokens=c.num_tokens, legacy_layout=c.legacy_layout,
            token_size=2 * c.token_size if c.quantizer == "vae" else c.token_size,  # VAE: mean and log-variance
            conv_stem=c.conv_stem, dense_mixing=c.dense_mixing, sincos_positions=c.sincos_positions,
        )
        self.quantize = None
        if c.quantizer == "fsq":
            self.quantize = FSQ(levels=c.fsq_levels)
        elif c.quantizer == "vq":
            self.quantize = VectorQuantizer(
                codebook_size=c.codebook_size, token_size=c.token_size, use_l2_norm=c.use_l2_norm,
                commitment_cost=c.commitment_cost,
            )
        conv_channels = c.pixel_decoder_hidden_channels * c.pixel_decoder_channel_mult[-1]
        self.decoder = TiTokDecoder(
            image_size=c.image_size, patch_size=c.patch_size, width=c.dec_width, depth=c.dec_depth,
            num_heads=c.dec_heads, num_tokens=c.num_tokens, token_size=c.token_size,
            output={"conv": "features"}.get(c.decoder_output, c.decoder_output),
            proxy_codebook_size=c.proxy_codebook_size, feature_channels=conv_channels, dense_mixing=c.dense_mixing,
            sincos_positions=c.sincos_positions,
        )
        if c.decoder_output == "proxy_codes":
            self.proxy_codebook = nn.Embedding(c.proxy_codebook_size, c.proxy_code_dim)
            self.pixel_decoder = PixelDecoder(hidden_channels=c.pixel_decoder_hidden_channels, z_channels=c.proxy_code_dim)
        elif c.decoder_output == "conv":
            factor = 2 ** (len(c.pixel_decoder_channel_mult) - 1) * c.pixel_decoder_out_upscale
            if factor != c.patch_size:
                raise UsageError(f"the conv pixel decoder upsamples by {factor} (2^(levels-1) x out_upscale), "
                                 f"but patch_size is {c.patch_size}")
            self.pixel_decoder = PixelDecoder(
                hidden_channels=c.pixel_decoder_hidden_channels, channel_mult=c.pixel_decoder_channel_mult,
                num_res_blocks=c.pixel_decoder_res_blocks, z_channels=conv_channels,
                out_upscale=c.pixel_decoder_out_upscale,
            )

    @property
    def is_discrete(self) -> bool:
        """True when :meth:`encode` gives token ids (vq, fsq); False for continuous latents (vae)."""
        return self.config.is_discrete

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """float [B,3,H,W] in [0,1] -> pre-quantisation latents float [B,N,T] (VAE: [B,N,2T] posterior parameters)."""
        self._check_images(images)
        return self.encoder(images, self.latent_tokens)

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised latents float [B,N,T] -> images float [B,3,H,W], unclamped."""
        return self.render(self.decoder(z_q))

    def render(self, out: torch.Tensor) -> torch.Tensor:
        """The ViT decoder's output -> images float [B,3,H,W], unclamped (see ``decoder_output``)."""
        if self.decoder_output == "rgb":
            return out
        if self.decoder_output == "conv":
            return self.pixel_decoder(out)
        weights = out.softmax(dim=1)  # (B, 1024, G, G)
        z_pixel = torch.einsum("bkhw,kc->bchw", weights, self.proxy_codebook.weight.to(weights.dtype))
        return self.pixel_decoder(z_pixel)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """VQ: float [B,3,H,W] in [0,1] -> tokens int64 [B,N].

        VAE: -> latents float32 [B,N,T], the posterior mean, or with ``generator`` a sample
        ``mean + std * noise`` drawn from it (noise on the generator's device).
        """
        if not self.is_discrete:
            mean, std = self.posterior(images)
            if generator is None:
                return mean
            b, n, t = mean.shape
            # Drawn in the official [B,T,N] order: a generator seeded s gives the official
            # sample after torch.manual_seed(s).
            noise = torch.randn(b, t, n, generator=generator, device=generator.device).transpose(1, 2)
            return mean + std * noise.to(mean.device)
        if generator is not None:
            raise ValueError("a VQ tokenizer encodes deterministically; generator= is for VAE tokenizers")
        return self.quantize(self.encode_latents(images))[1]

    @torch.no_grad()
    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE only: float [B,3,H,W] in [0,1] -> (mean, std), each float32 [B,N,T], std > 0."""
        if self.is_discrete:
            raise ValueError(f"posterior() is for VAE tokenizers; this one is {self.quantizer}")
        return official.diagonal_gaussian(self.encode_latents(images))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """VQ: tokens int64 [B,N] in [0, codebook_size) -> images float [B,3,H,W] in [0,1].

        VAE: latents float [B,N,T] (from :meth:`encode`) -> images float [B,3,H,W] in [0,1].
        """
        if not self.is_discrete:
            shape_ok = tokens.dim() == 3 and tuple(tokens.shape[1:]) == (self.num_tokens, self.token_size)
            if not shape_ok or not tokens.is_floating_point():
                raise ValueError(
                    f"a VAE tokenizer decodes float latents [B, {self.num_tokens}, {self.token_size}], "
                    f"got {tokens.dtype} {tuple(tokens.shape)}"
                )
            return self.decode_latents(tokens).clamp(0.0, 1.0)
        if tokens.dim() != 2 or tokens.shape[1] != self.num_tokens:
            raise ValueError(f"tokens must be [B, {self.num_tokens}], got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.codebook_size):
            raise ValueError(f"token ids must lie in [0, {self.codebook_size}), got [{int(tokens.min())}, {int(tokens.max())}]")
        return self.decode_latents(self.quantize.lookup(tokens)).clamp(0.0, 1.0)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Training path: images [B,3,H,W] -> (reconstruction unclamped, tokens [B,N], quantiser losses)."""
        if not self.is_discrete:
            raise ValueError("training is implemented for VQ tokenizers only (quantizer vq or fsq); this one is a VAE")
        z_q, tokens, losses = self.quantize(self.encode_latents(images))
        return self.decode_latents(z_q), tokens, losses

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (self.image_size,) * 2:
            raise ValueError(
                f"images must be [B, 3, {self.image_size}, {self.image_size}], got {tuple(images.shape)}"
            )
