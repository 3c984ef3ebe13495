"""TiTok: a 1D image tokenizer (ViT encoder -> latent tokens -> VQ or VAE -> ViT decoder -> pixels).

Built from the smallest part up: attention block -> ViT encoder/decoder -> quantiser ->
MaskGIT-VQGAN pixel decoder -> TiTok. Key names are this project's own; the official names
are converted in :mod:`tokenizer.official`, which also documents every quirk that the
released checkpoints need.

Shapes: B batch, N latent tokens, T token (code) size, D width, G = image_size // patch_size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from tokenizer import official


class Attention(nn.Module):
    """Multi-head self-attention: qkv Linear -> scaled_dot_product_attention -> proj."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (k h d) -> k b h l d", k=3, h=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, Dh)
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


def _embedding(*shape: int, width: int) -> nn.Parameter:
    return nn.Parameter(width**-0.5 * torch.randn(*shape, width))


class TiTokEncoder(nn.Module):
    """Patches + class token + learnable latent tokens -> ViT -> latent token features.

    forward: images float [B,3,H,W], latent_tokens [N,D] -> float [B,N,T] (before quantisation).
    """

    def __init__(
        self, *, image_size: int, patch_size: int, width: int, depth: int, num_heads: int,
        num_latent_tokens: int, token_size: int, legacy_layout: bool,
    ):
        super().__init__()
        self.grid_size = image_size // patch_size
        self.width = width
        self.legacy_layout = legacy_layout
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.class_embedding = _embedding(1, width=width)
        self.positional_embedding = _embedding(self.grid_size**2 + 1, width=width)
        self.latent_positional_embedding = _embedding(num_latent_tokens, width=width)
        self.norm_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(Block(width, num_heads) for _ in range(depth))
        self.norm_post = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, token_size)

    def forward(self, images: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        x = rearrange(self.patch_embed(images), "b d h w -> b (h w) d")  # (B, G*G, D)
        cls = self.class_embedding.to(x.dtype).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        latents = (latent_tokens + self.latent_positional_embedding).to(x.dtype).expand(b, -1, -1)
        x = self.norm_pre(torch.cat([x, latents], dim=1))  # (B, 1+G*G+N, D)
        for block in self.blocks:
            x = block(x)
        x = self.norm_post(x[:, 1 + self.grid_size**2 :])  # (B, N, D)
        if self.legacy_layout:
            x = official.legacy_latent_layout(x)
        return self.proj_out(x)  # (B, N, T)


class TiTokDecoder(nn.Module):
    """Latent tokens + mask tokens per patch -> ViT -> per-patch outputs.

    forward: z float [B,N,T] -> proxy-code logits [B,1024,G,G] (``output="proxy_codes"``) or
    RGB [B,3,H,W] (``output="rgb"``, the official non-legacy variant).
    """

    def __init__(
        self, *, image_size: int, patch_size: int, width: int, depth: int, num_heads: int,
        num_latent_tokens: int, token_size: int, output: str, proxy_codebook_size: int = 1024,
    ):
        super().__init__()
        if output not in ("proxy_codes", "rgb"):
            raise ValueError(f"decoder output must be 'proxy_codes' or 'rgb', got {output!r}")
        self.grid_size = image_size // patch_size
        self.patch_size = patch_size
        self.output = output
        self.embed = nn.Linear(token_size, width)
        self.class_embedding = _embedding(1, width=width)
        self.positional_embedding = _embedding(self.grid_size**2 + 1, width=width)
        self.mask_token = _embedding(1, 1, width=width)
        self.latent_positional_embedding = _embedding(num_latent_tokens, width=width)
        self.norm_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(Block(width, num_heads) for _ in range(depth))
        self.norm_post = nn.LayerNorm(width)
        if output == "proxy_codes":
            self.head = nn.Sequential(
                nn.Linear(width, 2 * width), nn.Tanh(), nn.Linear(2 * width, proxy_codebook_size)
            )
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
        x = self.norm_pre(torch.cat([queries.to(x.dtype), x], dim=1))  # (B, 1+G*G+N, D)
        for block in self.blocks:
            x = block(x)
        x = self.head(self.norm_post(x[:, 1 : 1 + g2]))  # (B, G*G, C)
        g, p = self.grid_size, self.patch_size
        if self.output == "proxy_codes":
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

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        z = z.float()
        flat = z.reshape(-1, z.shape[-1])  # (B*N, T)
        codes = self.codebook()
        if self.use_l2_norm:
            flat = F.normalize(flat, dim=-1)
            z = F.normalize(z, dim=-1)
        # The expanded squared distance, the same formula as the official code, so argmin
        # ties break identically.
        d = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.T
        tokens = d.argmin(dim=1).view(z.shape[:-1])  # (B, N)
        z_q = F.embedding(tokens, codes)
        commitment = self.commitment_cost * torch.mean((z_q.detach() - z) ** 2)
        codebook = torch.mean((z_q - z.detach()) ** 2)
        losses = {"quantizer_loss": commitment + codebook, "commitment_loss": commitment, "codebook_loss": codebook}
        return z + (z_q - z).detach(), tokens, losses


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
    """The MaskGIT-VQGAN convolutional decoder: [B,z_channels,G,G] -> RGB [B,3,G*2^(L-1),...]."""

    def __init__(
        self, *, hidden_channels: int = 128, channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2, z_channels: int = 256,
    ):
        super().__init__()
        chans = [hidden_channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(z_channels, chans[-1], 3, padding=1)
        self.mid = nn.ModuleList(ResBlock(chans[-1], chans[-1]) for _ in range(num_res_blocks))
        # Lowest resolution first, the order in which they run.
        levels = list(range(len(chans)))[::-1]
        self.up = nn.ModuleList(
            UpBlock(chans[min(i + 1, len(chans) - 1)], chans[i], num_res_blocks, upsample=i != 0) for i in levels
        )
        self.norm_out = nn.GroupNorm(32, chans[0], eps=1e-6)
        self.conv_out = nn.Conv2d(chans[0], 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.mid:
            x = block(x)
        for block in self.up:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class TiTok(nn.Module):
    """The TiTok tokenizer.

    Images are float [B,3,H,W] in [0,1] (no mean/std normalisation, as the official code);
    tokens are int64 [B,N] in [0, codebook_size).

    ``quantize_mode="vq"`` quantises each latent token to the nearest of ``codebook_size``
    codes. ``"vae"`` (the released continuous tokenizers) has no codebook: the encoder
    predicts a diagonal Gaussian posterior over ``token_size`` channels per token (mean and
    log-variance, :func:`tokenizer.official.diagonal_gaussian`), and the decoder takes
    latents float [B,N,T] instead of tokens; ``codebook_size`` is then None.

    ``decoder_output="proxy_codes"`` is the released two-stage design: the ViT decoder
    predicts logits over the 1024 MaskGIT-VQGAN codes, their softmax weights the VQGAN
    codebook and the VQGAN conv decoder renders pixels. ``"rgb"`` is the official
    non-legacy single-stage variant (the ViT decoder predicts pixels).
    """

    def __init__(
        self, *, image_size: int = 256, patch_size: int = 16, enc_width: int = 1024, enc_depth: int = 24,
        enc_heads: int = 16, dec_width: int = 1024, dec_depth: int = 24, dec_heads: int = 16,
        num_latent_tokens: int = 32, codebook_size: int | None = 4096, token_size: int = 12, use_l2_norm: bool = True,
        commitment_cost: float = 0.25, legacy_layout: bool = True, decoder_output: str = "proxy_codes",
        pixel_decoder_hidden_channels: int = 128, proxy_codebook_size: int = 1024, proxy_code_dim: int = 256,
        quantize_mode: str = "vq",
    ):
        super().__init__()
        if quantize_mode not in ("vq", "vae"):
            raise ValueError(f"quantize_mode must be 'vq' or 'vae', got {quantize_mode!r}")
        self.image_size = image_size
        self.num_tokens = num_latent_tokens
        self.token_size = token_size
        self.quantize_mode = quantize_mode
        self.codebook_size = codebook_size if quantize_mode == "vq" else None
        self.decoder_output = decoder_output
        self.latent_tokens = _embedding(num_latent_tokens, width=enc_width)
        self.encoder = TiTokEncoder(
            image_size=image_size, patch_size=patch_size, width=enc_width, depth=enc_depth, num_heads=enc_heads,
            num_latent_tokens=num_latent_tokens, legacy_layout=legacy_layout,
            token_size=2 * token_size if quantize_mode == "vae" else token_size,  # VAE: mean and log-variance
        )
        self.quantize = None
        if quantize_mode == "vq":
            self.quantize = VectorQuantizer(
                codebook_size=codebook_size, token_size=token_size, use_l2_norm=use_l2_norm,
                commitment_cost=commitment_cost,
            )
        self.decoder = TiTokDecoder(
            image_size=image_size, patch_size=patch_size, width=dec_width, depth=dec_depth, num_heads=dec_heads,
            num_latent_tokens=num_latent_tokens, token_size=token_size, output=decoder_output,
            proxy_codebook_size=proxy_codebook_size,
        )
        if decoder_output == "proxy_codes":
            self.proxy_codebook = nn.Embedding(proxy_codebook_size, proxy_code_dim)
            self.pixel_decoder = PixelDecoder(hidden_channels=pixel_decoder_hidden_channels, z_channels=proxy_code_dim)

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """float [B,3,H,W] in [0,1] -> pre-quantisation latents float [B,N,T] (VAE: [B,N,2T] posterior parameters)."""
        self._check_images(images)
        return self.encoder(images, self.latent_tokens)

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised latents float [B,N,T] -> images float [B,3,H,W], unclamped."""
        out = self.decoder(z_q)
        if self.decoder_output == "rgb":
            return out
        weights = out.softmax(dim=1)  # (B, 1024, G, G)
        z_pixel = torch.einsum("bkhw,kc->bchw", weights, self.proxy_codebook.weight.to(weights.dtype))
        return self.pixel_decoder(z_pixel)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """VQ: float [B,3,H,W] in [0,1] -> tokens int64 [B,N].

        VAE: -> latents float32 [B,N,T], the posterior mean, or with ``generator`` a sample
        ``mean + std * noise`` drawn from it (noise on the generator's device).
        """
        if self.quantize_mode == "vae":
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
        if self.quantize_mode != "vae":
            raise ValueError("posterior() is for VAE tokenizers; this one is VQ")
        return official.diagonal_gaussian(self.encode_latents(images))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """VQ: tokens int64 [B,N] in [0, codebook_size) -> images float [B,3,H,W] in [0,1].

        VAE: latents float [B,N,T] (from :meth:`encode`) -> images float [B,3,H,W] in [0,1].
        """
        if self.quantize_mode == "vae":
            if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (self.num_tokens, self.token_size) or not tokens.is_floating_point():
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
        if self.quantize_mode != "vq":
            raise ValueError("training is implemented for VQ tokenizers only; this one is a VAE")
        z_q, tokens, losses = self.quantize(self.encode_latents(images))
        return self.decode_latents(z_q), tokens, losses

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (self.image_size,) * 2:
            raise ValueError(
                f"images must be [B, 3, {self.image_size}, {self.image_size}], got {tuple(images.shape)}"
            )
