"""Latent normalisation, read from a dataset's statistics (REFERENCE.md [7]).

Every mode is an affine map applied elementwise, x = (z - shift) * gain, so ``denormalize`` is its
exact inverse z = x / gain + shift; both are evaluated in float64 and cast back to the input dtype.

===============  =====================================  =========================================
mode             x =                                    use
===============  =====================================  =========================================
``per-element``  (z - mean) / std * sigma_data          authors' default; mean, std of each element
``per-channel``  (z - mean_c) / std_c * sigma_data      one mean and std per latent channel
``scale``        z * scale                              a fixed factor, e.g. 0.18215 for SD's VAE
``none``         z                                      pixels already in [-1, 1]
===============  =====================================  =========================================
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

STD_FLOOR = 1e-6  # elements that never vary (e.g. the blank border of digits) normalise to 0, not to inf


def _per_element(stats: dict | None) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(stats["per_element"]["mean"]), np.asarray(stats["per_element"]["std"])


def _per_channel(stats: dict | None) -> tuple[np.ndarray, np.ndarray]:
    mean, std = np.asarray(stats["per_channel"]["mean"]), np.asarray(stats["per_channel"]["std"])
    return mean[:, None, None], std[:, None, None]


# mode -> (mean, std) of z that x standardises by (None: no statistics needed)
MODES: dict[str, Callable[[dict], tuple[np.ndarray, np.ndarray]] | None] = {
    "per-element": _per_element,
    "per-channel": _per_channel,
    "scale": None,
    "none": None,
}


class Normalizer:
    """The affine map between stored latents z and the model's data x (both NCHW or CHW tensors).

    Build it with ``Normalizer.from_manifest(manifest, mode, sigma_data, scale)``; ``mean`` / ``std``
    are float64 arrays broadcastable to (C, H, W) for the standardising modes, None otherwise.
    """

    def __init__(self, mode: str = "per-element", sigma_data: float = 0.5, scale: float | None = None,
                 mean: Any = None, std: Any = None):
        if mode not in MODES:
            raise ValueError(f"normalization mode must be one of {list(MODES)}, got {mode!r}")
        if mode == "scale" and scale is None:
            raise ValueError("normalization mode 'scale' needs scale= (e.g. 0.18215 for the SD VAE)")
        if MODES[mode] is not None and (mean is None or std is None):
            raise ValueError(f"normalization mode {mode!r} needs the dataset's mean and std")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data!r}")
        self.mode, self.sigma_data = mode, float(sigma_data)
        self.scale = float(scale) if scale is not None else None
        self.mean = np.asarray(mean, np.float64) if MODES[mode] is not None else None
        self.std = np.asarray(std, np.float64) if MODES[mode] is not None else None
        if mode in ("per-element", "per-channel"):
            shift, gain = self.mean, self.sigma_data / np.maximum(self.std, STD_FLOOR)
        elif mode == "scale":
            shift, gain = np.zeros(()), np.asarray(self.scale)
        else:
            shift, gain = np.zeros(()), np.ones(())
        self._shift = torch.as_tensor(shift, dtype=torch.float64)
        self._gain = torch.as_tensor(gain, dtype=torch.float64)

    @classmethod
    def from_manifest(cls, manifest: dict, mode: str = "per-element", sigma_data: float = 0.5,
                      scale: float | None = None) -> "Normalizer":
        """Statistics from a latent dataset's ``manifest.json`` (its ``"stats"`` entry)."""
        if mode not in MODES:
            raise ValueError(f"normalization mode must be one of {list(MODES)}, got {mode!r}")
        mean = std = None
        if MODES[mode] is not None:
            if "stats" not in manifest:
                raise ValueError(f"normalization mode {mode!r} needs statistics, but the manifest has none")
            mean, std = MODES[mode](manifest["stats"])
        return cls(mode, sigma_data, scale, mean, std)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Stored latent z -> model data x, same shape and dtype."""
        return ((z.to(torch.float64) - self._shift.to(z.device)) * self._gain.to(z.device)).to(z.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model data x -> latent z for the codec's decoder; the exact inverse of ``normalize``."""
        return (x.to(torch.float64) / self._gain.to(x.device) + self._shift.to(x.device)).to(x.dtype)

    def to(self, device: torch.device | str) -> "Normalizer":
        self._shift, self._gain = self._shift.to(device), self._gain.to(device)
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; ``Normalizer.from_dict(n.to_dict())`` rebuilds it (snapshots carry this)."""
        return {
            "mode": self.mode, "sigma_data": self.sigma_data, "scale": self.scale,
            "mean": self.mean.tolist() if self.mean is not None else None,
            "std": self.std.tolist() if self.std is not None else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Normalizer":
        return cls(d["mode"], d["sigma_data"], d.get("scale"), d.get("mean"), d.get("std"))

    def __repr__(self) -> str:
        extra = f", scale={self.scale}" if self.mode == "scale" else ""
        return f"Normalizer(mode={self.mode!r}, sigma_data={self.sigma_data}{extra})"
