"""Class-conditional masked-token generators over TiTok tokens (MaskGIT).

Built from the smallest part up: attention -> MLP -> blocks -> ImageBert / UViT -> sizes
(``generator.presets``). Both models map image tokens and a class label to logits over the
codebook; the key names are this project's own and :mod:`generator.official` converts the
official checkpoints and documents every quirk they depend on.

Token space (one embedding table of ``codebook_size + num_classes + 2`` rows):
    0 .. K-1          image tokens (TiTok codes)
    K                 mask_id
    K+1 .. K+C        class c -> K+1+c
    K+1+C             the "no class" token, i.e. class ``null_label == num_classes``
The label token is prepended to the N image tokens and dropped again before the head.

Shapes: B batch, N = num_tokens image tokens, L = N + 1, D = hidden_size, K = codebook_size.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from generator import official
from titok_core.attention import attention
from titok_core.errors import UsageError


class Attention(nn.Module):
    """Multi-head self-attention: qkv Linear -> attention (titok_core.attention) -> proj -> dropout."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise UsageError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (k h d) -> k b h l d", k=3, h=self.num_heads)
        x = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)  # (B, H, L, Dh)
        return self.proj_drop(self.proj(rearrange(x, "b h l d -> b l (h d)")))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 -> dropout (BERT's placement of the dropout)."""

    def __init__(self, dim: int, hidden_dim: int, *, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class PostNormBlock(nn.Module):
    """BERT layer: LayerNorm *after* each residual sum (post-LN)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, dropout: float, attn_drop: float, norm_eps: float):
        super().__init__()
        self.attn = Attention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=dropout)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, drop=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class PreNormBlock(nn.Module):
    """U-ViT block: pre-LN; with ``skip`` it first fuses a long skip connection, Linear([x, skip])."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, dropout: float, attn_drop: float, skip: bool = False):
        super().__init__()
        self.skip_proj = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=False, attn_drop=attn_drop, proj_drop=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, drop=dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_proj is not None:
            x = self.skip_proj(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MaskedTokenGenerator(nn.Module):
    """What both architectures share: the token space, the label token and the public attributes.

    Attributes: ``codebook_size`` (K), ``num_tokens`` (N), ``num_classes`` (C), ``mask_id`` (= K),
    ``null_label`` (= C, the label meaning "no class").
    """

    def __init__(self, *, hidden_size: int, codebook_size: int, num_tokens: int, num_classes: int):
        super().__init__()
        self.codebook_size = codebook_size
        self.num_tokens = num_tokens
        self.num_classes = num_classes
        self.mask_id = codebook_size
        self.null_label = num_classes
        self.token_embed = nn.Embedding(codebook_size + num_classes + 2, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens + 1, hidden_size))

    def embed(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """tokens int64 [B,N] in [0, K] (K = mask_id), labels int64 [B] in [0, C] -> float [B,L,D].

        The label token comes first; ``labels == null_label`` lands on the "no class" token.
        """
        label_ids = labels.view(-1, 1) + self.codebook_size + 1
        ids = torch.cat([label_ids, tokens], dim=1)  # (B, L)
        return self.token_embed(ids)

    def _check(self, tokens: torch.Tensor, labels: torch.Tensor) -> None:
        if tokens.ndim != 2 or tokens.shape[1] > self.num_tokens or labels.shape != tokens.shape[:1]:
            raise ValueError(
                f"expected tokens [B, <={self.num_tokens}] and labels [B], "
                f"got {tuple(tokens.shape)} and {tuple(labels.shape)}"
            )


class ImageBert(MaskedTokenGenerator):
    """The official MaskGIT transformer of TiTok-L-32 / B-64: a post-LN BERT encoder.

    forward: tokens int64 [B,N] (mask_id allowed), labels int64 [B] in [0, num_classes]
    (num_classes == null_label: unconditional) -> logits float [B,N,K].
    """

    def __init__(
        self, *, hidden_size: int, depth: int, num_heads: int, mlp_dim: int, codebook_size: int, num_tokens: int,
        num_classes: int, dropout: float = 0.1, attn_drop: float = 0.1,
    ):
        super().__init__(hidden_size=hidden_size, codebook_size=codebook_size, num_tokens=num_tokens,
                         num_classes=num_classes)
        eps = official.BERT_LAYER_NORM_EPS
        self.type_embed = nn.Parameter(torch.zeros(hidden_size))
        self.embed_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.embed_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            PostNormBlock(hidden_size, num_heads, mlp_dim, dropout=dropout, attn_drop=attn_drop, norm_eps=eps)
            for _ in range(depth)
        )
        self.head = nn.Linear(hidden_size, codebook_size)
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.type_embed, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # BERT's initialisation (initializer_range 0.02), as the official model's post_init().
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check(tokens, labels)
        x = self.embed(tokens, labels) + self.type_embed  # (B, L, D)
        x = x + self.pos_embed[:, : x.shape[1]]
        x = self.embed_drop(self.embed_norm(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, 1:])  # (B, N, K)


class UViT(MaskedTokenGenerator):
    """The official MaskGIT transformer of TiTok-S-128: U-ViT with long skip connections.

    ``depth`` is the total number of blocks and must be odd: depth // 2 in-blocks whose outputs
    are kept, one mid block, depth // 2 out-blocks that each fuse the matching in-block output
    (last in, first out).

    forward: tokens int64 [B,N] (mask_id allowed), labels int64 [B] in [0, num_classes]
    (num_classes == null_label: unconditional) -> logits float [B,N,K].
    """

    def __init__(
        self, *, hidden_size: int, depth: int, num_heads: int, mlp_dim: int, codebook_size: int, num_tokens: int,
        num_classes: int, dropout: float = 0.0, attn_drop: float = 0.0,
    ):
        super().__init__(hidden_size=hidden_size, codebook_size=codebook_size, num_tokens=num_tokens,
                         num_classes=num_classes)
        if depth % 2 != 1:
            raise UsageError(f"UViT depth counts all blocks (in + mid + out) and must be odd, got {depth}")
        kw = dict(dropout=dropout, attn_drop=attn_drop)
        self.in_blocks = nn.ModuleList(PreNormBlock(hidden_size, num_heads, mlp_dim, **kw) for _ in range(depth // 2))
        self.mid_block = PreNormBlock(hidden_size, num_heads, mlp_dim, **kw)
        self.out_blocks = nn.ModuleList(
            PreNormBlock(hidden_size, num_heads, mlp_dim, skip=True, **kw) for _ in range(depth // 2)
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.head = nn.Linear(hidden_size, codebook_size)
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # U-ViT's initialisation, as the official UViTBert.
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check(tokens, labels)
        x = self.embed(tokens, labels)  # (B, L, D)
        x = x + self.pos_embed[:, : x.shape[1]]
        skips = []
        for block in self.in_blocks:
            x = block(x)
            skips.append(x)
        x = self.mid_block(x)
        for block in self.out_blocks:
            x = block(x, skips.pop())
        return self.head(self.norm(x)[:, 1:])  # (B, N, K)


ARCHITECTURES: dict[str, type[MaskedTokenGenerator]] = {"imagebert": ImageBert, "uvit": UViT}
CONFIG_KEYS = (
    "arch", "hidden_size", "depth", "num_heads", "mlp_dim", "codebook_size", "num_tokens", "num_classes", "dropout",
    "attn_drop",
)
# Keys that files written before the rename spell differently: old -> new. Only files are
# translated (config_from_file); a config passed in with an old key fails with one line.
LEGACY_KEYS = {"seq_len": "num_tokens"}


def config_from_file(raw: dict) -> dict:
    """The generator config stored in a file (our ``titok_gen.config`` metadata or our own JSON
    config), whichever version wrote it -> today's keys. The one place where old spellings are read."""
    config = dict(raw)
    for old, new in LEGACY_KEYS.items():
        if old in config:
            config.setdefault(new, config[old])
            del config[old]
    return config


def build_generator(config: dict) -> MaskedTokenGenerator:
    """Our generator config -> a randomly initialised model with ``.config`` (a copy of it).

    config: the constructor kwargs plus ``"arch"``: "imagebert" (the default when absent) or
    "uvit". Old key names (``seq_len``), unknown keys or archs raise CheckpointError with one
    line (configs usually come from files; files with old names go through config_from_file).
    """
    from titok_core.checkpoints import CheckpointError

    config = dict(config)
    config.setdefault("arch", "imagebert")
    old = sorted(set(config) & set(LEGACY_KEYS))
    if old:
        raise CheckpointError("; ".join(f"{k} was renamed {LEGACY_KEYS[k]}" for k in old))
    unknown = set(config) - set(CONFIG_KEYS)
    if unknown:
        raise CheckpointError(f"unknown generator config key(s): {', '.join(sorted(unknown))}")
    if config["arch"] not in ARCHITECTURES:
        raise CheckpointError(f"unknown generator arch {config['arch']!r}; known: {', '.join(ARCHITECTURES)}")
    kwargs = {k: v for k, v in config.items() if k != "arch"}
    try:
        model = ARCHITECTURES[config["arch"]](**kwargs)
    except TypeError as exc:  # a missing constructor argument
        raise CheckpointError(f"incomplete generator config: {exc}") from exc
    model.config = config
    return model
