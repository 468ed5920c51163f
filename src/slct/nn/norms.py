"""Normalisation layers chosen by name (REFERENCE.md [6]; paper Sec. 4.6, eq. 12, Table 2d).

Every norm takes a channels-first tensor ``(B, C, *spatial)``: ``(B, C, H, W)`` feature maps in
the UNet, ``(B*N, C)`` single tokens or ``(B, C, N)`` token sequences in the DiT (see
``slct.nn.dit.TokenNorm``). Statistics are computed per sample, in float32 whatever the input
dtype, and the result is returned in the input dtype, so the norms are safe under bf16 autocast.

What each name normalises over, and what it learns (C = channels, G = groups):

=====================  ===============================  =====================================
name                   statistics over                  trainable
=====================  ===============================  =====================================
``group``              C/G channels x spatial, G <= 32  per-channel scale and shift
``instance``           spatial only, each channel       per-channel scale and shift
``layer``              all of C x spatial               per-channel scale and shift
``rms``                all of C x spatial (no centring) per-channel scale
``nonscaling-layer``   all of C x spatial               per-channel shift only (eq. 12)
``nonscaling-group``   as ``group``                     per-channel shift only
``layer-elementwise``  all of C x H x W                 per-element scale and shift (C, H, W)
``nonscaling-layer-    all of C x H x W                 per-element shift only: the authors'
elementwise``                                           code, nn.LayerNorm([C, H, W]) with the
                                                        weight frozen at 1
=====================  ===============================  =====================================

The ``-elementwise`` norms need the feature-map size when they are built (``norm_layer(name, C,
resolution=R)``); the UNet passes it, the DiT cannot (its tokens have no per-element layout) and
says so. They cost C x H x W parameters per norm (about 10M more in the paper's UNet).

The non-scaling norms have *no* scale at all: the paper fixes it at 1 and excludes it from
training, which is the same function as leaving the multiplication out, and it keeps the scale
out of the state dict and out of every optimizer param group by construction.

A new norm is one class here plus one line in ``NORMS``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _acc(x: torch.Tensor) -> torch.dtype:
    """The dtype statistics are computed in: float32 for float32 / bf16 / fp16 input, float64 for float64 (tests)."""
    return torch.promote_types(x.dtype, torch.float32)

__all__ = [
    "NORMS",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "NonScalingLayerNorm",
    "NonScalingGroupNorm",
    "ElementwiseLayerNorm",
    "NonScalingElementwiseLayerNorm",
    "group_count",
    "norm_layer",
]


def group_count(channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """Number of GroupNorm groups for ``channels``: ADM's 32 where possible.

    The largest G <= ``max_groups`` that divides ``channels`` and leaves at least
    ``min_channels_per_group`` channels per group (EDM's rule, so a 32-channel layer gets 8
    groups rather than degenerating into an instance norm); 1 when no such G exists.
    """
    upper = min(max_groups, channels // min_channels_per_group)
    return next((g for g in range(upper, 0, -1) if channels % g == 0), 1)


class _GroupwiseNorm(nn.Module):
    """Shared core of the group-statistics norms: ``(x - mean) / sqrt(var + eps) [* scale] + shift``.

    ``num_groups`` splits the channels into equal groups; each (sample, group) slice of
    ``(B, C, *spatial)`` is standardised over its channels and all spatial positions.
    ``learn_scale=False`` leaves the scale out entirely (the non-scaling norms).
    """

    mixes_channels = True  # statistics span several channels (False: per-channel statistics)

    def __init__(self, channels: int, num_groups: int, eps: float, learn_scale: bool):
        super().__init__()
        self.num_channels = channels
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels)) if learn_scale else None
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            y = F.group_norm(x.to(_acc(x)), self.num_groups, self.weight.to(_acc(x)), self.bias.to(_acc(x)), self.eps)
        else:  # shift added separately: group_norm(weight=None, bias=b) fails in backward (torch 2.13 CPU)
            y = F.group_norm(x.to(_acc(x)), self.num_groups, None, None, self.eps)
            y = y + self.bias.to(_acc(x)).reshape(-1, *([1] * (y.ndim - 2)))
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, groups={self.num_groups}, eps={self.eps}, "
                f"scale={'learned' if self.weight is not None else 'fixed at 1'}")


class GroupNorm(_GroupwiseNorm):
    """ADM's GroupNorm: 32 groups (fewer when ``channels`` does not allow it, see ``group_count``)."""

    def __init__(self, channels: int, eps: float = 1e-5, num_groups: int = 32):
        super().__init__(channels, group_count(channels, num_groups), eps, learn_scale=True)


class InstanceNorm(_GroupwiseNorm):
    """InstanceNorm: each channel of each sample standardised over its spatial positions."""

    mixes_channels = False

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(channels, channels, eps, learn_scale=True)


class LayerNorm(_GroupwiseNorm):
    """LayerNorm over (C, H, W) of each sample with a learnable per-channel scale and shift (eq. 12, LN)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(channels, 1, eps, learn_scale=True)


class NonScalingLayerNorm(_GroupwiseNorm):
    """Non-scaling LayerNorm, NsLN_beta(x) = (x - u(x)) / sqrt(var(x) + eps) + beta (paper eq. 12).

    Statistics over (C, H, W) of each sample; the scale is fixed at 1 and is not a parameter;
    the shift beta is a learnable per-channel parameter.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(channels, 1, eps, learn_scale=False)


class NonScalingGroupNorm(_GroupwiseNorm):
    """GroupNorm without a scale (the paper's suggested future work, Sec. 6): groups as ``GroupNorm``."""

    def __init__(self, channels: int, eps: float = 1e-5, num_groups: int = 32):
        super().__init__(channels, group_count(channels, num_groups), eps, learn_scale=False)


class ElementwiseLayerNorm(nn.Module):
    """LayerNorm over (C, H, W) of each sample with a per-element (C, H, W) scale and shift (``nn.LayerNorm([C, H,
    W])``); ``learn_scale=False`` is the authors' Non-scaling LayerNorm (their weight frozen at 1, here absent)."""

    mixes_channels = True
    needs_resolution = True

    def __init__(self, channels: int, resolution: int, eps: float = 1e-5, learn_scale: bool = True):
        super().__init__()
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        self.shape = (channels, resolution, resolution)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(self.shape)) if learn_scale else None
        self.bias = nn.Parameter(torch.zeros(self.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"{type(self).__name__} was built for (B, {', '.join(map(str, self.shape))}), got "
                             f"{tuple(x.shape)}")
        weight = None if self.weight is None else self.weight.to(_acc(x))
        y = F.layer_norm(x.to(_acc(x)), self.shape, weight, None, self.eps) + self.bias.to(_acc(x))
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.shape}, eps={self.eps}, scale={'learned' if self.weight is not None else 'fixed at 1'}"


class NonScalingElementwiseLayerNorm(ElementwiseLayerNorm):
    """Non-scaling LayerNorm as in the authors' code (eq. 12 with a per-element shift beta of shape (C, H, W))."""

    def __init__(self, channels: int, resolution: int, eps: float = 1e-5):
        super().__init__(channels, resolution, eps, learn_scale=False)


class RMSNorm(nn.Module):
    """RMSNorm over (C, *spatial) of each sample, x / sqrt(mean(x^2) + eps) * scale; no shift, no centring."""

    mixes_channels = True

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.num_channels = channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(_acc(x))
        y = y * torch.rsqrt(y.square().mean(dim=tuple(range(1, y.ndim)), keepdim=True) + self.eps)
        y = y * self.weight.to(_acc(x)).reshape(-1, *([1] * (y.ndim - 2)))
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


# name -> class; each class is constructed as cls(channels, eps=..., **kwargs)
NORMS: dict[str, type[nn.Module]] = {
    "group": GroupNorm,
    "instance": InstanceNorm,
    "layer": LayerNorm,
    "rms": RMSNorm,
    "nonscaling-layer": NonScalingLayerNorm,
    "nonscaling-group": NonScalingGroupNorm,
    "layer-elementwise": ElementwiseLayerNorm,
    "nonscaling-layer-elementwise": NonScalingElementwiseLayerNorm,
}


def norm_layer(name: str, channels: int, resolution: int | None = None, **kwargs) -> nn.Module:
    """Build the norm registered as ``name`` for ``channels`` channels (``NORMS``; REFERENCE.md [6]).

    ``resolution``: the feature maps' H = W, used by the per-element norms only (others ignore it).
    ``kwargs`` go to the class, e.g. ``eps`` (all norms) or ``num_groups`` (group norms).
    Raises ValueError for an unknown name or a non-positive channel count.
    """
    if name not in NORMS:
        raise ValueError(f"norm {name!r} is unknown; allowed: {', '.join(NORMS)}")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    cls = NORMS[name]
    if getattr(cls, "needs_resolution", False):
        if resolution is None:
            raise ValueError(f"norm {name!r} has per-element parameters and needs the feature-map size; only the "
                             "UNet provides it (use 'nonscaling-layer' elsewhere)")
        return cls(channels, resolution, **kwargs)
    return cls(channels, **kwargs)
