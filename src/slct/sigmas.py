"""Noise-level grids and the consistency-training weight (REFERENCE.md [1], [2]).

Convention used throughout slct: grids are ASCENDING, ``sigmas[0] == sigma_min`` and
``sigmas[-1] == sigma_max``, and a training pair is ``(sigmas[i], sigmas[i + 1]) = (sigma_lo,
sigma_hi)`` with the 0-based lower index ``i`` in ``[0, N - 2]``. (The authors' code indexes
the same grid in descending order; ``slct.curriculum.diffusion_loss_mask`` documents the
translation.)
"""

from __future__ import annotations

import torch

__all__ = ["karras_sigmas", "ct_weight"]


def karras_sigmas(
    n: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``n``-point Karras grid, ascending: ``t_i = (s_min^(1/rho) + (i-1)/(n-1) (s_max^(1/rho) -
    s_min^(1/rho)))^rho`` for ``i = 1..n`` (REFERENCE.md [1], paper section 3).

    Computed in float64 on the CPU and then cast to ``dtype`` (float64 by default, so that the
    weight ``1 / (t_{i+1} - t_i)`` stays accurate near ``sigma_min`` where neighbours differ by
    ~1e-5). The end points are exactly ``sigma_min`` and ``sigma_max`` (no ``x^(1/rho)^rho``
    round-off), so the boundary condition ``c_skip(sigma_min) = 1`` holds on the grid.

    Returns a tensor of shape ``(n,)``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (lo + ramp * (hi - lo)) ** rho
    sigmas[0], sigmas[-1] = sigma_min, sigma_max
    return sigmas.to(dtype=dtype, device=device)


def ct_weight(sigma_lo, sigma_hi):
    """iCT's weight ``lambda(t_i) = 1 / (t_{i+1} - t_i)`` (REFERENCE.md [2]).

    Accepts floats or tensors (broadcast elementwise); requires ``sigma_hi > sigma_lo``, which
    holds for every pair drawn from an ascending grid. Floats are checked; tensors are not (a
    check would force a device synchronisation every step).
    """
    if not isinstance(sigma_lo, torch.Tensor) and not isinstance(sigma_hi, torch.Tensor):
        if not sigma_hi > sigma_lo:
            raise ValueError(f"ct_weight needs sigma_hi > sigma_lo, got sigma_lo={sigma_lo}, sigma_hi={sigma_hi}")
    return 1 / (sigma_hi - sigma_lo)
