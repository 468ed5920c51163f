"""Diffusion Transformer backbone with adaLN-Zero conditioning (Peebles & Xie 2023), swappable pre-norms.

The authors of sLCT later report DiT-B/2 reaching FID 5.7 on CelebA-HQ latents; this is the same
architecture behind the UNet's interface: ``net(x, noise_labels, class_labels=None)``.

x (B, C, H, W) -> non-overlapping p x p patches -> tokens (B, N, D), N = (H/p)(W/p), plus a
fixed 2-D sin-cos position embedding -> ``depth`` blocks, each
    x = x + gate_msa * Attn(norm1(x) * (1 + scale_msa) + shift_msa)
    x = x + gate_mlp * MLP(norm2(x) * (1 + scale_mlp) + shift_mlp)
with the six modulation vectors a zero-initialised linear map of SiLU(c), c = noise embedding MLP
+ label embedding -> final norm, modulation, zero-initialised linear -> patches -> (B, C, H, W).

Norms on tokens (``TokenNorm``): a named norm from ``slct.nn.NORMS`` is applied to each token
over its D channels, as the standard DiT LayerNorm is ("layer" per token, "rms" per token,
"group" over channel groups of each token, "nonscaling-*" likewise without a scale), except
"instance", whose statistics are per channel, which is taken over the N tokens of each sample
(the tokens being the spatial positions). The registry norms carry a per-channel affine (shift
only for the non-scaling ones); at initialisation (scale 1, shift 0) "layer" equals the
affine-free LayerNorm of the original DiT, which it extends by 2D parameters per norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slct.nn.layers import TokenAttention, build_noise_embedding, check_backbone_input, label_features, linear
from slct.nn.norms import norm_layer

__all__ = ["DIT_SIZES", "DiT", "DiTBlock", "TokenNorm", "sincos_position_embedding"]

# DiT size -> (hidden_size, depth, num_heads) (Peebles & Xie 2023, Table 1)
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "s": (384, 12, 6),
    "b": (768, 12, 12),
    "l": (1024, 24, 16),
    "xl": (1152, 28, 16),
}

NOISE_CHANNELS = 256  # DiT's frequency-embedding width before the noise MLP
NORM_EPS = 1e-6  # DiT's LayerNorm epsilon


class TokenNorm(nn.Module):
    """A named norm applied to tokens (B, N, D) -> (B, N, D): per token over D, or over the N tokens for "instance"."""

    def __init__(self, name: str, hidden_size: int, eps: float = NORM_EPS):
        super().__init__()
        self.norm = norm_layer(name, hidden_size, eps=eps)
        self.per_token = getattr(self.norm, "mixes_channels", True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_token:
            return self.norm(x.reshape(-1, x.shape[-1])).reshape(x.shape)  # each token a (1, D) "sample"
        return self.norm(x.transpose(1, 2)).transpose(1, 2)  # (B, D, N): tokens as spatial positions


def sincos_position_embedding(hidden_size: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE/DiT), (grid_size^2, hidden_size), row-major tokens.

    The first half of the channels encodes the column, the second half the row, each as
    [sin(p w_j), cos(p w_j)] with w_j = 10000^(-j / (D/4)), j < D/4.
    """
    if hidden_size % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for a 2-D sin-cos embedding, got {hidden_size}")
    quarter = hidden_size // 4
    omega = 10_000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(pos, pos, indexing="ij")

    def encode(p: torch.Tensor) -> torch.Tensor:
        angles = p.reshape(-1, 1) * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(col), encode(row)], dim=1).float()


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with (B, D) modulation broadcast over the N tokens of (B, N, D)."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: (B, N, D), SiLU(c) (B, D) -> (B, N, D); identity at initialisation."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 norm: str = "layer"):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.norm1 = TokenNorm(norm, hidden_size)
        self.attn = TokenAttention(hidden_size, num_heads)
        self.norm2 = TokenNorm(norm, hidden_size)
        self.mlp = nn.Sequential(linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Dropout(dropout), linear(mlp_hidden, hidden_size))
        self.modulation = linear(hidden_size, 6 * hidden_size, zero_init=True)  # adaLN-Zero

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).to(x.dtype).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """DiT backbone: ``net(x, noise_labels, class_labels=None) -> Tensor`` shaped like x.

    Args (all keyword; the override keys of ``build_network``):
        in_channels, resolution: x is (B, in_channels, resolution, resolution); output likewise.
        label_dim, label_dropout: classes (0 = unconditional) and their dropout in training.
        patch_size: p; resolution must be divisible by p. Tokens: (resolution / p)^2.
        hidden_size, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP expansion.
        dropout: dropout on the MLP hidden activations (0 in DiT).
        block_norm: norm name for the two pre-norms of every block (see ``TokenNorm``).
        out_norm: norm name for the final pre-norm.
        noise_embedding, fourier_scale: as for the UNet; the embedding is 256 wide, as in DiT.
        second_time: a second time input (MeanFlow's t - r, Shortcut's d), as for the UNet; off by default.
    """

    def __init__(self, *, in_channels: int = 4, resolution: int = 32, label_dim: int = 0,
                 label_dropout: float = 0.0, patch_size: int = 2, hidden_size: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 block_norm: str = "layer", out_norm: str = "layer", noise_embedding: str = "positional",
                 fourier_scale: float = 0.02, second_time: bool = False):
        super().__init__()
        if resolution % patch_size:
            raise ValueError(f"resolution ({resolution}) must be divisible by patch_size ({patch_size})")
        for name, p in (("dropout", dropout), ("label_dropout", label_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        self.in_channels = in_channels
        self.resolution = resolution
        self.patch_size = patch_size
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        grid = resolution // patch_size

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_position_embedding(hidden_size, grid)[None], persistent=False)
        self.map_noise = build_noise_embedding(noise_embedding, NOISE_CHANNELS, fourier_scale)
        self.map_layer0 = linear(NOISE_CHANNELS, hidden_size)
        self.second_time = bool(second_time)
        if self.second_time:
            self.map_noise2 = build_noise_embedding(noise_embedding, NOISE_CHANNELS, fourier_scale)
            self.map_layer0_2 = linear(NOISE_CHANNELS, hidden_size, bias=False)
        self.map_layer1 = linear(hidden_size, hidden_size)
        # a one-hot -> D linear map is DiT's embedding table; the dropped ("null") label embeds to 0, as in EDM
        self.map_label = linear(label_dim, hidden_size, bias=False) if label_dim else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, dropout, block_norm)
                                    for _ in range(depth))
        self.out_norm = TokenNorm(out_norm, hidden_size)
        self.out_modulation = linear(hidden_size, 2 * hidden_size, zero_init=True)
        self.out_proj = linear(hidden_size, patch_size * patch_size * in_channels, zero_init=True)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears with zero bias, N(0, 0.02) embeddings, zero adaLN and head."""
        for block in self.blocks:
            for layer in (block.attn.qkv, block.attn.proj, block.mlp[0], block.mlp[3]):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.out_channels, -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.map_layer0, self.map_layer1):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        if self.second_time:
            nn.init.normal_(self.map_layer0_2.weight, std=0.02)
        if self.map_label is not None:
            nn.init.normal_(self.map_label.weight, std=0.02)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                noise_labels2: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), noise_labels (B,) (c_noise), class_labels None | (B,) int | (B, label_dim),
        noise_labels2 (B,) (only with ``second_time``) -> (B, C, H, W).

        The result has x's dtype (float32 under autocast, whatever the compute dtype).
        """
        check_backbone_input(x, self.in_channels, self.resolution, noise_labels, noise_labels2, self.second_time)
        c = self.map_layer0(self.map_noise(noise_labels.reshape(-1)))
        if self.second_time:
            c = c + self.map_layer0_2(self.map_noise2(noise_labels2.reshape(-1)))
        c = self.map_layer1(F.silu(c))
        labels = label_features(class_labels, self.label_dim, x.shape[0], self.label_dropout,
                                self.training, x.device)
        if labels is not None:
            c = c + self.map_label(labels)
        c = F.silu(c)  # every modulation starts with SiLU(c): computed once

        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.out_modulation(c).to(h.dtype).chunk(2, dim=1)
        h = self.out_proj(_modulate(self.out_norm(h), shift, scale))  # (B, N, p*p*C)
        return self._unpatchify(h).to(x.dtype)

    def _unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) tokens -> (B, C, H, W); channel-last within a patch, row-major patches."""
        b, p, c = h.shape[0], self.patch_size, self.in_channels
        g = self.resolution // p
        h = h.reshape(b, g, g, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", h).reshape(b, c, g * p, g * p)

