"""The paper's VAE: Stable Diffusion's KL-f8 autoencoder through diffusers' ``AutoencoderKL`` (REFERENCE.md [7]).

The authors encode every training image once with ``stabilityai/sd-vae-ft-ema`` and keep one
posterior sample (``posterior="sample"``, the default); ``posterior="mean"`` keeps the mean instead.
Latents are the raw posterior values: no 0.18215 factor here, scaling is the ``Normalizer``'s job.
"""

from __future__ import annotations

from typing import Any

import torch

from slct.codecs import Codec

HUB_IDS = {"sd-vae-ft-ema": "stabilityai/sd-vae-ft-ema", "sd-vae-ft-mse": "stabilityai/sd-vae-ft-mse"}
POSTERIORS = ("sample", "mean")


def _autoencoder_kl():
    from slct.compat import ensure_torchvision

    ensure_torchvision()  # diffusers imports torchvision lazily; a CUDA-only build of it must not break the import
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:  # optional dependency
        raise RuntimeError('the sd-vae codecs need diffusers: pip install "slct[sd-vae]"') from e
    return AutoencoderKL


class SDVAECodec(Codec):
    """``AutoencoderKL.from_pretrained(pretrained)``: a hub id (default: the variant's) or a local folder.

    Runs in fp16 on CUDA and fp32 elsewhere; the posterior noise is drawn in float32 from ``generator``
    on the generator's own device, so a CPU generator gives the same sample on any device.
    """

    deterministic = False

    def __init__(self, variant: str = "sd-vae-ft-ema", pretrained: str | None = None, posterior: str = "sample"):
        if variant not in HUB_IDS:
            raise ValueError(f"variant must be one of {sorted(HUB_IDS)}, got {variant!r}")
        if posterior not in POSTERIORS:
            raise ValueError(f"posterior must be one of {list(POSTERIORS)}, got {posterior!r}")
        self.name, self.posterior = variant, posterior
        self.pretrained = str(pretrained) if pretrained is not None else HUB_IDS[variant]
        self.deterministic = posterior == "mean"
        try:
            self.vae = _autoencoder_kl().from_pretrained(self.pretrained)
        except OSError as e:  # no network, wrong folder, missing files
            raise FileNotFoundError(
                f"could not load AutoencoderKL from {self.pretrained!r} ({e}). Pass a local folder holding "
                "config.json and the weights (pretrained=... / --vae DIR), or make the hub reachable.") from e
        self._adopt()

    @classmethod
    def from_vae(cls, vae, variant: str = "sd-vae-ft-ema", posterior: str = "sample",
                 pretrained: str | None = None) -> "SDVAECodec":
        """The codec around an ``AutoencoderKL`` already in memory (e.g. an exported diffusers pipeline's)."""
        codec = cls.__new__(cls)
        codec.name, codec.posterior, codec.deterministic = variant, posterior, posterior == "mean"
        codec.pretrained = pretrained or HUB_IDS[variant]
        codec.vae = vae
        codec._adopt()
        return codec

    def _adopt(self) -> None:
        self.vae.eval().requires_grad_(False)
        config = self.vae.config
        self.latent_channels = int(config.latent_channels)
        self.image_channels = int(config.in_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)

    @property
    def id(self) -> str:
        return self.name if self.posterior == "sample" else f"{self.name}:mean"

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(images.to(self.device, self._dtype)).latent_dist
        mean = dist.mean.float()
        if self.posterior == "mean":
            return mean
        noise_device = generator.device if generator is not None else self.device
        noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=torch.float32)
        return mean + dist.std.float() * noise.to(self.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latents.to(self.device, self._dtype)).sample
        return images.float().clamp(-1, 1)

    def to(self, device: torch.device | str) -> "SDVAECodec":
        device = torch.device(device)
        # fp16 halves the cost on GPUs; CPUs get no speed from it and lose precision
        self.vae.to(device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
        return self

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "pretrained": self.pretrained, "posterior": self.posterior}
