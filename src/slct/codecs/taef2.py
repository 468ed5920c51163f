"""TAEF2: the tiny autoencoder distilled from the FLUX.2 VAE (madebyollin/taesd, MIT).

Written from the architecture description in ``../shared/README.md``; the module layout (indices of
``nn.Sequential``) is what the released state dicts ``taef2_encoder.pth`` / ``taef2_decoder.pth``
expect. 8x spatial downsampling, 32 latent channels, about 1.3M parameters per half. The network
itself works on images in [0, 1]; the codec maps from and to the project's [-1, 1].
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slct.codecs import Codec

WEIGHT_FILES = ("taef2_encoder.pth", "taef2_decoder.pth")
WIDTH = 64          # channels of every hidden conv
LATENT_CHANNELS = 32


def _conv(c_in: int, c_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, **kwargs)


class Block(nn.Module):
    """Residual block ReLU(conv(x) + x); the FLUX.2 variant first mixes channels with x + pool(x)."""

    def __init__(self, pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(_conv(WIDTH, WIDTH), nn.ReLU(), _conv(WIDTH, WIDTH), nn.ReLU(),
                                  _conv(WIDTH, WIDTH))
        # per-pixel channel MLP with GroupNorm (keys pool.0/1/3); absent in the SD-era TAESD blocks
        self.pool = nn.Sequential(nn.Conv2d(WIDTH, 4 * WIDTH, 1, bias=False), nn.GroupNorm(4, 4 * WIDTH),
                                  nn.ReLU(), nn.Conv2d(4 * WIDTH, WIDTH, 1, bias=False)) if pool else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return torch.relu(self.conv(x) + x)


class SoftClamp(nn.Module):
    """tanh(z / 3) * 3: keeps decoder inputs in (-3, 3) without a hard cut."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z / 3) * 3


def make_encoder() -> nn.Sequential:
    """(N, 3, R, R) in [0, 1] -> (N, 32, R/8, R/8)."""
    down = lambda: _conv(WIDTH, WIDTH, stride=2, bias=False)  # noqa: E731
    return nn.Sequential(
        _conv(3, WIDTH), Block(),
        down(), Block(), Block(), Block(),
        down(), Block(), Block(), Block(),
        down(), Block(pool=True), Block(pool=True), Block(pool=True),
        _conv(WIDTH, LATENT_CHANNELS),
    )


def make_decoder() -> nn.Sequential:
    """(N, 32, H, W) -> (N, 3, 8H, 8W), approximately in [0, 1] (not clamped)."""
    up = lambda: nn.Upsample(scale_factor=2, mode="nearest")  # noqa: E731
    return nn.Sequential(
        SoftClamp(), _conv(LATENT_CHANNELS, WIDTH), nn.ReLU(),
        Block(pool=True), Block(pool=True), Block(pool=True),
        up(), _conv(WIDTH, WIDTH, bias=False), Block(), Block(), Block(),
        up(), _conv(WIDTH, WIDTH, bias=False), Block(), Block(), Block(),
        up(), _conv(WIDTH, WIDTH, bias=False), Block(),
        _conv(WIDTH, 3),
    )


def default_weights_dir() -> Path:
    """``$SLCT_WEIGHTS``, else ``../shared/weights`` from the current directory, else beside the checkout."""
    if os.environ.get("SLCT_WEIGHTS"):
        return Path(os.environ["SLCT_WEIGHTS"])
    candidates = [Path.cwd().parent / "shared" / "weights",
                  Path(__file__).resolve().parents[3].parent / "shared" / "weights"]
    for path in candidates:
        if all((path / f).is_file() for f in WEIGHT_FILES):
            return path
    return candidates[0]


def _check_weights(weights_dir: Path) -> None:
    missing = [f for f in WEIGHT_FILES if not (weights_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"TAEF2 weights not found: {', '.join(missing)} missing in {weights_dir}. Put taef2_encoder.pth and "
            "taef2_decoder.pth (madebyollin/taesd) in that folder, or pass weights_dir= / --weights DIR, "
            "or set SLCT_WEIGHTS.")


class TAEF2Codec(Codec):
    """TAEF2 as a codec: deterministic encoder, 32 x R/8 x R/8 latents, computed in float32."""

    name = "taef2"
    latent_channels = LATENT_CHANNELS
    image_channels = 3
    downsample = 8

    def __init__(self, weights_dir: str | os.PathLike | None = None):
        self._explicit_dir = weights_dir is not None
        self.weights_dir = Path(weights_dir) if weights_dir is not None else default_weights_dir()
        _check_weights(self.weights_dir)
        self.encoder, self.decoder = make_encoder(), make_decoder()
        for module, file in zip((self.encoder, self.decoder), WEIGHT_FILES):
            state = torch.load(self.weights_dir / file, map_location="cpu", weights_only=True)
            module.load_state_dict({k: v.float() for k, v in state.items()})  # fp16 on disk, fp32 here
        self._prepare()

    def _prepare(self) -> None:
        for module in (self.encoder, self.decoder):
            # channels-last convolutions: ~1.4x faster on a CPU (oneDNN) and the layout GPUs prefer
            module.eval().requires_grad_(False).to(memory_format=torch.channels_last)

    @classmethod
    def from_modules(cls, encoder: nn.Module, decoder: nn.Module) -> "TAEF2Codec":
        """The codec around already-loaded networks (e.g. an exported diffusers pipeline's), no files read."""
        codec = cls.__new__(cls)
        codec._explicit_dir, codec.weights_dir = False, None
        codec.encoder, codec.decoder = encoder, decoder
        codec._prepare()
        return codec

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.to(self.device, torch.float32).contiguous(memory_format=torch.channels_last)
        return self.encoder(x * 0.5 + 0.5).contiguous()  # the network was trained on [0, 1]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, torch.float32).contiguous(memory_format=torch.channels_last)
        return (self.decoder(z) * 2 - 1).clamp(-1, 1).contiguous()

    def to(self, device: torch.device | str) -> "TAEF2Codec":
        self.encoder.to(device)
        self.decoder.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def spec(self) -> dict[str, Any]:
        # the default location is resolved again on rebuild, so snapshots stay portable across machines
        spec: dict[str, Any] = {"name": self.name}
        if self._explicit_dir:
            spec["weights_dir"] = str(self.weights_dir)
        return spec
