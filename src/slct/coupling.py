"""Minibatch optimal-transport coupling of data and noise (paper section 4.4; REFERENCE.md [5]).

Each step the batch's unit-Gaussian noise vectors are re-paired with its data latents so that
the total squared Euclidean distance is minimal. We permute the NOISE, not the data: data,
labels and any per-sample metadata keep their order and stay aligned for free.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["ot_coupling", "couple"]


def _squared_distances(x: torch.Tensor, noise: torch.Tensor) -> np.ndarray:
    """``cost[j, k] = ||x_j - noise_k||^2`` between flattened samples, float64 on the CPU, (B, B)."""
    a = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
    b = noise.detach().reshape(noise.shape[0], -1).to("cpu", torch.float64)
    # expanded form: B x B x D memory would be 2 GiB for B=256 latents; float64 makes the
    # cancellation in |a|^2 + |b|^2 - 2ab harmless at these magnitudes
    cost = a.square().sum(1, keepdim=True) + b.square().sum(1)[None, :] - 2 * a @ b.T
    return cost.clamp_(min=0).numpy()


def ot_coupling(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Exact minibatch OT pairing: returns ``perm`` (int64, shape ``(B,)``, on ``x.device``) such
    that ``noise[perm][j]`` is the partner of ``x[j]``.

    Minimises ``sum_j ||x_j - noise_perm[j]||^2`` over flattened samples, i.e. the discrete OT
    problem with squared-Euclidean cost and uniform marginals. Any batch size (1 included) and
    sample shape; ``x`` and ``noise`` must have the same shape. Deterministic; solved on the CPU.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(noise, torch.Tensor):
        raise ValueError("x and noise must be tensors")
    if x.ndim < 1 or x.shape != noise.shape:
        raise ValueError(
            f"x and noise must have the same batch-first shape (B, ...), got {tuple(x.shape)} and {tuple(noise.shape)}"
        )
    if x.shape[0] <= 1:
        return torch.arange(x.shape[0], device=x.device)
    cost = _squared_distances(x, noise)
    # The authors run POT's exact solver ot.emd on cost / cost.max(). With equal batch sizes and
    # uniform marginals the OT optimum is attained at a permutation (Birkhoff-von Neumann), so
    # the linear assignment problem has the same optimal cost; scipy's solver returns that
    # permutation directly and deterministically, with no transport plan to round (a plan with
    # ties can spread mass over several partners). Normalising by the max, as the authors do,
    # keeps the numbers O(1); an all-zero cost (identical points) is left as is.
    peak = cost.max()
    if peak > 0:
        cost /= peak
    rows, cols = linear_sum_assignment(cost)
    assert (rows == np.arange(len(rows))).all()  # square problem: one partner per row, in order
    return torch.from_numpy(cols.astype(np.int64)).to(x.device)


def couple(
    x: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(x, noise[ot_coupling(x, noise)], labels)``: the noise is re-paired, so ``x`` and
    ``labels`` are returned unchanged and remain aligned with each other."""
    return x, noise[ot_coupling(x, noise).to(noise.device)], labels
