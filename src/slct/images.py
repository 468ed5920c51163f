"""Image helpers: [-1, 1] float tensors <-> uint8 arrays, PNG grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """NCHW floats in [-1, 1] -> NHWC uint8 (C = 1 or 3)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, upscale: int = 1) -> np.ndarray:
    """Tile N images into one HWC uint8 array (``nrow`` per row; default a near-square grid)."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = arr[i]
    if upscale > 1:
        grid = grid.repeat(upscale, 0).repeat(upscale, 1)
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, min_size: int = 256) -> Path:
    """Write a PNG grid; tiny images (digits, 8x8 latents) are upscaled by pixel repetition to stay visible."""
    h = images.shape[-1]
    n = images.shape[0]
    side = (nrow or math.ceil(math.sqrt(n))) * h
    upscale = max(1, math.ceil(min_size / max(side, 1)))
    grid = make_grid(images, nrow=nrow, upscale=upscale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


def save_pngs(images: torch.Tensor, out_dir: str | Path, names: list[str]) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for arr, name in zip(to_uint8(images), names):
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(out_dir / name)
