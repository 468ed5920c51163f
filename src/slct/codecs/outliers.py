"""A codec whose latents hold impulsive outliers that its decoder inverts exactly: the controlled test of the
paper's premise (section 4.1, Fig. 1: the SD VAE's latents hold sparse high-magnitude values that iCT's
Pseudo-Huber loss lets dominate training). It wraps any codec; ``strength`` 1 is the plain codec.

- ``spike`` (default): per image and channel, the largest-magnitude element is multiplied by ``strength``
  (k >= 1), so it stays the largest and decoding finds it again and divides it by k: sparse, high-magnitude spots,
  one per channel, as users report in the SD VAE's latents.
- ``tail``: every element through the monotone heavy-tail map ``y = sinh(a x) / a`` with ``a = ln k`` (the
  identity at k = 1), inverted by ``x = asinh(a y) / a``.

The round trip ``decode(encode(x))`` equals the wrapped codec's reconstruction up to float rounding
(tests/test_codecs.py); a model's generated latents are decoded through the same inverse. The spec
``{"name": "outliers", "base": {...}, "mode": ..., "strength": k}`` is recorded with the latents and snapshots.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from slct.codecs import Codec

OUTLIER_MODES = ("spike", "tail")


def spike(z: torch.Tensor, k: float, inverse: bool = False) -> torch.Tensor:
    """Multiply (or, ``inverse``, divide) each (image, channel)'s largest-magnitude element by ``k``."""
    flat = z.flatten(2).clone()
    idx = flat.abs().argmax(dim=2, keepdim=True)
    picked = flat.gather(2, idx)
    flat.scatter_(2, idx, picked / k if inverse else picked * k)
    return flat.view_as(z)


def tail(z: torch.Tensor, k: float, inverse: bool = False) -> torch.Tensor:
    """y = sinh(a x) / a, a = ln k (identity at k = 1); ``inverse``: x = asinh(a y) / a."""
    a = math.log(k)
    if a == 0:
        return z.clone()
    return torch.asinh(a * z) / a if inverse else torch.sinh(a * z) / a


MAPS = {"spike": spike, "tail": tail}


class OutlierCodec(Codec):
    """``base``'s latents made impulsive (see the module docstring); everything else is ``base``'s."""

    name = "outliers"

    def __init__(self, base: dict | Codec, mode: str = "spike", strength: float = 1.0):
        from slct.codecs import get_codec

        if mode not in OUTLIER_MODES:
            raise ValueError(f"outlier mode must be one of {', '.join(OUTLIER_MODES)}, got {mode!r}")
        if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength >= 1):
            raise ValueError(f"outlier strength must be a finite number >= 1 (1: the plain codec), got {strength!r}")
        self.base = base if isinstance(base, Codec) else get_codec(**base)
        if isinstance(self.base, OutlierCodec):
            raise ValueError("an outlier codec wraps a plain codec, not another outlier codec")
        self.mode, self.strength = mode, float(strength)
        for attr in ("latent_channels", "image_channels", "downsample", "deterministic"):
            setattr(self, attr, getattr(self.base, attr))

    @property
    def id(self) -> str:
        return f"{self.base.id}+{self.mode}{self.strength:g}"

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return MAPS[self.mode](self.base.encode(images, generator), self.strength)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.base.decode(MAPS[self.mode](latents, self.strength, inverse=True))

    def to(self, device) -> "OutlierCodec":
        self.base = self.base.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.base.device

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base.spec(), "mode": self.mode, "strength": self.strength}
