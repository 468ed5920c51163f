"""Building blocks shared by the UNet and the DiT (REFERENCE.md [1] noise conditioning, [6]).

Layers are plain ``torch.nn`` modules so that ``channels_last``, autocast and ``torch.compile``
apply without special cases. PyTorch's default initialisation of ``nn.Conv2d``/``nn.Linear``
(weights and biases uniform in +-1/sqrt(fan_in)) is exactly ADM's, i.e. EDM's DhariwalUNet
``kaiming_uniform`` with ``init_weight = init_bias = sqrt(1/3)``, so only the zero-initialised
layers need explicit care.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from slct.nn.norms import norm_layer

__all__ = [
    "NOISE_EMBEDDINGS",
    "RESAMPLE",
    "Attention2d",
    "FourierEmbedding",
    "PositionalEmbedding",
    "TokenAttention",
    "conv2d",
    "downsample_2x",
    "label_features",
    "linear",
    "build_noise_embedding",
    "check_backbone_input",
    "upsample_2x",
]


def conv2d(in_channels: int, out_channels: int, kernel: int, zero_init: bool = False) -> nn.Conv2d:
    """Same-padded ``kernel`` x ``kernel`` convolution; ``zero_init`` zeroes weight and bias (ADM's output layers)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
    if zero_init:
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    return conv


def linear(in_features: int, out_features: int, bias: bool = True, zero_init: bool = False) -> nn.Linear:
    """Fully connected layer; ``zero_init`` zeroes weight and bias (adaLN-Zero, zero-initialised heads)."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    if zero_init:
        nn.init.zeros_(layer.weight)
        if bias:
            nn.init.zeros_(layer.bias)
    return layer


def downsample_2x(x: torch.Tensor) -> torch.Tensor:
    """2x2 box-filter downsampling of (B, C, H, W): EDM's ``resample_filter=[1,1]``, i.e. ADM's average pool."""
    return F.avg_pool2d(x, 2)


def upsample_2x(x: torch.Tensor) -> torch.Tensor:
    """2x nearest-neighbour upsampling of (B, C, H, W): the transpose of the [1,1] filter, as in ADM."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


# resampling applied by a UNet block before its first conv and on its skip path
RESAMPLE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda x: x,
    "down": downsample_2x,
    "up": upsample_2x,
}


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample (Transformer / ADM / DiT timestep embedding).

    (B,) -> (B, num_channels) = [cos(x w_0), .., cos(x w_{n-1}), sin(x w_0), .., sin(x w_{n-1})]
    with w_j = max_positions^(-j/n), n = num_channels / 2. Applied to c_noise = 250 ln(sigma)
    as in the authors' code (REFERENCE.md [1]).
    """

    def __init__(self, num_channels: int, max_positions: float = 10_000.0):
        super().__init__()
        if num_channels % 2:
            raise ValueError(f"num_channels must be even for a sin/cos embedding, got {num_channels}")
        self.num_channels = num_channels
        self.max_positions = max_positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # frequencies built here in float32 (float64 for float64 input), not stored: casting the module to bf16
        # cannot coarsen them
        half = self.num_channels // 2
        dtype = torch.promote_types(x.dtype, torch.float32)
        freqs = self.max_positions ** (-torch.arange(half, dtype=dtype, device=x.device) / half)
        angles = x.to(dtype)[:, None] * freqs[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, max_positions={self.max_positions:g}"


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (NCSN++ / iCT): [cos(2 pi x f), sin(2 pi x f)], f ~ N(0, scale^2).

    (B,) -> (B, num_channels). iCT uses scale 0.02 (REFERENCE.md [1]); the frequencies are a
    fixed buffer, saved in the state dict so a reloaded network is the same function.
    """

    def __init__(self, num_channels: int, scale: float = 0.02):
        super().__init__()
        if num_channels % 2:
            raise ValueError(f"num_channels must be even for a sin/cos embedding, got {num_channels}")
        self.scale = scale
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        angles = x.to(dtype)[:, None] * (2 * math.pi * self.freqs.to(dtype))[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)

    def extra_repr(self) -> str:
        return f"{2 * self.freqs.numel()}, scale={self.scale}"


# noise-embedding name -> factory(num_channels, fourier_scale)
NOISE_EMBEDDINGS: dict[str, Callable[[int, float], nn.Module]] = {
    "positional": lambda channels, fourier_scale: PositionalEmbedding(channels),
    "fourier": lambda channels, fourier_scale: FourierEmbedding(channels, scale=fourier_scale),
}


def build_noise_embedding(name: str, num_channels: int, fourier_scale: float = 0.02) -> nn.Module:
    """The noise-label embedding registered as ``name`` ("positional" default, or "fourier")."""
    if name not in NOISE_EMBEDDINGS:
        raise ValueError(f"noise_embedding {name!r} is unknown; allowed: {', '.join(NOISE_EMBEDDINGS)}")
    return NOISE_EMBEDDINGS[name](num_channels, fourier_scale)


def label_features(class_labels: torch.Tensor | None, label_dim: int, batch_size: int,
                   dropout: float = 0.0, training: bool = False,
                   device: torch.device | None = None) -> torch.Tensor | None:
    """Class conditioning as float32 (B, label_dim) one-hot rows, with classifier-free-guidance dropout.

    ``class_labels``: None (the all-zero "null" label: unconditional output of a conditional
    network), int64 class ids (B,), or float one-hot/soft labels (B, label_dim). In training,
    each row is zeroed with probability ``dropout`` (EDM's label dropout). Returns None for an
    unconditional network (``label_dim == 0``), which must not be given labels.
    """
    if label_dim == 0:
        if class_labels is not None:
            raise ValueError("class_labels given to an unconditional network (label_dim=0)")
        return None
    if class_labels is None:
        return torch.zeros(batch_size, label_dim, device=device)
    if class_labels.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        if class_labels.shape != (batch_size,):
            raise ValueError(f"integer class_labels must have shape ({batch_size},), got {tuple(class_labels.shape)}")
        labels = F.one_hot(class_labels.long(), label_dim).float()
    else:
        if class_labels.shape != (batch_size, label_dim):
            raise ValueError(f"float class_labels must have shape ({batch_size}, {label_dim}), "
                             f"got {tuple(class_labels.shape)}")
        labels = class_labels.float()
    if training and dropout > 0:
        keep = torch.rand(batch_size, 1, device=labels.device) >= dropout
        labels = labels * keep
    return labels


class Attention2d(nn.Module):
    """Pre-norm multi-head self-attention over the H*W positions of (B, C, H, W), with residual (ADM).

    x + proj(SDPA(q, k, v)); qkv is a 1x1 conv whose 3C outputs are laid out (heads, C/heads, 3)
    as in EDM's DhariwalUNet; the output projection is zero-initialised, so a fresh block is the
    identity. Softmax scale 1/sqrt(C/heads).
    """

    def __init__(self, channels: int, num_heads: int, norm: str = "group", resolution: int | None = None):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.norm = norm_layer(norm, channels, resolution=resolution)
        self.qkv = conv2d(channels, 3 * channels, 1)
        self.proj = conv2d(channels, channels, 1, zero_init=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, self.num_heads, c // self.num_heads, 3, h * w)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(3))  # (B, heads, HW, C/heads)
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(a.transpose(-1, -2).reshape(b, c, h, w))


class TokenAttention(nn.Module):
    """Multi-head self-attention over tokens (B, N, D) -> (B, N, D) (ViT/DiT); no norm, no residual."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = linear(hidden_size, 3 * hidden_size)
        self.proj = linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, D/heads)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.proj(a.transpose(1, 2).reshape(b, n, d))


def check_backbone_input(x: torch.Tensor, channels: int, resolution: int, noise_labels: torch.Tensor,
                         noise_labels2: torch.Tensor | None = None, second_time: bool = False) -> None:
    """Shape check shared by the backbones: x (B, channels, resolution, resolution), noise_labels with B entries,
    and a second time input exactly when the network was built with one."""
    if x.ndim != 4 or tuple(x.shape[1:]) != (channels, resolution, resolution):
        raise ValueError(f"x must have shape (B, {channels}, {resolution}, {resolution}), got {tuple(x.shape)}")
    if noise_labels.numel() != x.shape[0]:
        raise ValueError(f"noise_labels must have shape ({x.shape[0]},), got {tuple(noise_labels.shape)}")
    if second_time and noise_labels2 is None:
        raise ValueError("this network takes a second time input (second_time=True): pass noise_labels2")
    if not second_time and noise_labels2 is not None:
        raise ValueError("noise_labels2 given to a network built without a second time input (second_time=False)")
    if noise_labels2 is not None and noise_labels2.numel() != x.shape[0]:
        raise ValueError(f"noise_labels2 must have shape ({x.shape[0]},), got {tuple(noise_labels2.shape)}")
