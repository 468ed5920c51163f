"""Codecs: the map between images and the space a model is trained in (REFERENCE.md [7]).

A codec is chosen by name and recorded, as ``codec.spec()``, with every latent dataset and
snapshot, so ``get_codec(**spec)`` rebuilds the same latent space later:

- ``identity``: pixel space (the demo, iCT's CIFAR-10); ``channels`` 3 or 1, no downsampling.
- ``taef2``: TAEF2, the tiny autoencoder of the FLUX.2 VAE; 32 channels, 8x downsampling.
- ``sd-vae-ft-ema`` / ``sd-vae-ft-mse``: the paper's VAE through diffusers' ``AutoencoderKL``;
  4 channels, 8x downsampling, posterior sample (default) or mean.
- ``outliers``: any of them with impulsive outliers that its decoder inverts (the paper's premise, controlled);
  ``slct encode --outliers spike:K``.

Conventions shared by every codec: images are float NCHW tensors in [-1, 1]; latents are float32
NCHW tensors of shape ``(N, *codec.latent_shape(resolution))``; ``decode`` returns float32 images
clamped to [-1, 1].
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class Codec:
    """Base class: an image <-> latent map (subclasses set the attributes and implement encode and decode).

    Attributes:
        name: registry name (``get_codec(name)``).
        latent_channels: C of a latent.
        image_channels: channels of the images it takes (3 for RGB, 1 for grey).
        downsample: spatial factor between image and latent (8 for the VAEs, 1 for pixels).
        deterministic: False when ``encode`` draws a posterior sample.
    """

    name: str = ""
    latent_channels: int = 0
    image_channels: int = 3
    downsample: int = 1
    deterministic: bool = True

    @property
    def id(self) -> str:
        """Identifies the latent space: two datasets with the same id (and shape) can be mixed."""
        return self.name

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, H, W) of the latent of a ``resolution`` x ``resolution`` image."""
        if int(resolution) != resolution or resolution <= 0 or resolution % self.downsample:
            raise ValueError(f"resolution must be a positive multiple of {self.downsample} for codec "
                             f"{self.name!r}, got {resolution}")
        side = int(resolution) // self.downsample
        return (self.latent_channels, side, side)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images (N, image_channels, R, R) in [-1, 1] -> latents (N, *latent_shape(R)), float32."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (N, C, H, W) -> images (N, image_channels, H*downsample, W*downsample), float32 in [-1, 1]."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> "Codec":
        return self

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable ``{"name": ..., **kwargs}`` such that ``get_codec(**spec)`` rebuilds it."""
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.spec().items() if k != "name")
        return f"{type(self).__name__}({args})"


def _identity(**kwargs) -> Codec:
    from slct.codecs.identity import IdentityCodec
    return IdentityCodec(**kwargs)


def _taef2(**kwargs) -> Codec:
    from slct.codecs.taef2 import TAEF2Codec
    return TAEF2Codec(**kwargs)


def _sd_vae(variant: str) -> Callable[..., Codec]:
    def build(**kwargs) -> Codec:
        from slct.codecs.sdvae import SDVAECodec
        return SDVAECodec(variant=variant, **kwargs)
    return build


def _outliers(**kwargs) -> Codec:
    from slct.codecs.outliers import OutlierCodec
    return OutlierCodec(**kwargs)


# codec name -> factory(**kwargs); factories import lazily so e.g. diffusers is only needed for sd-vae-*
CODECS: dict[str, Callable[..., Codec]] = {
    "identity": _identity,
    "taef2": _taef2,
    "sd-vae-ft-ema": _sd_vae("sd-vae-ft-ema"),
    "sd-vae-ft-mse": _sd_vae("sd-vae-ft-mse"),
    "outliers": _outliers,  # wraps another codec: impulsive latents its decoder inverts (slct.codecs.outliers)
}


def get_codec(name: str, **kwargs) -> Codec:
    """Build the codec registered as ``name`` (see ``CODECS``); ``get_codec(**codec.spec())`` round-trips."""
    if name not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {name!r}")
    return CODECS[name](**kwargs)


__all__ = ["Codec", "CODECS", "get_codec"]
