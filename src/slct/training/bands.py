"""The noise bands of the training diagnostics: one home below the monitor that fills them and the plots that draw
them."""

from __future__ import annotations

import math

import torch

# noise bands of the diagnostics (name, lowest sigma, highest sigma): where the 1-step samples are decided (> 1) and
# where the diffusion loss and most of the Cauchy loss's gradient go (< 0.1)
NOISE_BANDS = (("lt0.1", 0.0, 0.1), ("0.1-1", 0.1, 1.0), ("1-10", 1.0, 10.0), ("gt10", 10.0, math.inf))


def noise_band(sigma: torch.Tensor) -> torch.Tensor:
    """The NOISE_BANDS index of each sigma (int64, CPU)."""
    edges = torch.tensor([b[1] for b in NOISE_BANDS[1:]], dtype=torch.float64)
    return torch.bucketize(sigma.detach().double().cpu(), edges, right=True)
