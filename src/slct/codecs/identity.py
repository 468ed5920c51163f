"""The identity codec: train in pixel space (the demo, iCT's CIFAR-10 setting)."""

from __future__ import annotations

from typing import Any

import torch

from slct.codecs import Codec


class IdentityCodec(Codec):
    """Latents are the images themselves, float32 in [-1, 1]; ``channels`` is 3 (RGB) or 1 (grey)."""

    name = "identity"
    downsample = 1

    def __init__(self, channels: int = 3):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3 for codec 'identity', got {channels!r}")
        self.latent_channels = self.image_channels = int(channels)

    @property
    def id(self) -> str:
        return "identity" if self.latent_channels == 3 else f"identity-{self.latent_channels}ch"

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return images.float().clone()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float().clamp(-1, 1)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "channels": self.latent_channels}
