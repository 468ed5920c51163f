"""Robust distances d(x, y) between online and target outputs (paper eqs. 6-8; REFERENCE.md [3]).

Every loss is a function of the per-sample squared residual ``r`` (L1 of the absolute residual),
reduced over all non-batch elements in one of two conventions:

- ``"mean"`` (default; the authors' code, which produced the published numbers): ``r`` is the
  per-sample MEAN of ``(x - y)^2``;
- ``"sum"`` (iCT's and the paper's printed ``||x - y||_2^2``): the full squared norm.

With the same ``c`` the two differ by a factor of d, the number of elements per sample (4096 for
4x32x32 latents). Adding a loss is one decorated function::

    @register_loss("welsch")
    def welsch(residual, c, reduce):
        return 1 - torch.exp(-reduce(residual.square()) / (2 * c**2))
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["LOSSES", "REDUCTIONS", "register_loss", "robust_loss"]

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _per_sample_mean(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).mean(1) if t.numel() else t.new_zeros(t.shape[0])


def _per_sample_sum(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(1) if t.numel() else t.new_zeros(t.shape[0])


# per-sample reduction over every non-batch dim: (B, ...) -> (B,)
REDUCTIONS: dict[str, Reduce] = {"mean": _per_sample_mean, "sum": _per_sample_sum}

# name -> loss(residual, c, reduce) -> (B,); residual = x - y, upcast to >= float32
LOSSES: dict[str, Callable[[torch.Tensor, float, Reduce], torch.Tensor]] = {}


def register_loss(name: str, *, uses_c: bool = True, knee: float | None = None):
    """Decorator adding ``fn(residual, c, reduce) -> (B,)`` to ``LOSSES`` under ``name``.

    ``uses_c=False`` marks losses without a scale, which then accept ``c=None``. ``knee``: where a robust loss
    leaves its quadratic regime, as r = knee x c^2 (what ``c_schedule="calibrated"`` puts a quantile of r at).
    """

    def decorator(fn):
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        fn.uses_c = uses_c
        fn.knee = knee
        LOSSES[name] = fn
        return fn

    return decorator


@register_loss("l2", uses_c=False)
def l2(residual, c, reduce):
    return reduce(residual.square())


@register_loss("l1", uses_c=False)
def l1(residual, c, reduce):
    return reduce(residual.abs())


@register_loss("pseudo_huber", knee=1.0)  # sqrt(r + c^2) - c: ~r/(2c) below r = c^2, ~sqrt(r) above
def pseudo_huber(residual, c, reduce):
    # eq. 7, sqrt(r + c^2) - c, written as r / (sqrt(r + c^2) + c) to avoid cancellation at r << c^2
    r = reduce(residual.square())
    return r / (torch.sqrt(r + c**2) + c)


@register_loss("cauchy", knee=2.0)  # log(1 + r/(2c^2)): ~r/(2c^2) below r = 2c^2, ~log r above
def cauchy(residual, c, reduce):
    # eq. 6
    return torch.log1p(reduce(residual.square()) / (2 * c**2))


@register_loss("geman_mcclure", knee=4.0)  # 2r/(r + 4c^2): ~r/(2c^2) below r = 4c^2, ~2 above
def geman_mcclure(residual, c, reduce):
    # eq. 8
    r = reduce(residual.square())
    return 2 * r / (r + 4 * c**2)


def _check_c(name: str, c) -> float:
    try:
        value = float(c)  # also accepts a one-element tensor
    except (TypeError, ValueError, RuntimeError):
        value = math.nan
    if c is None or isinstance(c, bool) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"c must be a finite number > 0 for loss {name!r}, got {c!r}")
    return value


def robust_loss(
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    c: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Per-sample distance ``d(x, y)``, shape ``(B,)`` for inputs of shape ``(B, ...)``.

    ``name`` is a key of ``LOSSES`` ("l2", "l1", "pseudo_huber", "cauchy", "geman_mcclure");
    ``c`` (finite, > 0) is required by the robust ones; ``reduction`` is "mean" or "sum" (see
    the module docstring). Computed in at least float32, also when the inputs come from a
    bf16/fp16 autocast region; float64 inputs stay float64.
    """
    fn = LOSSES.get(name)
    if fn is None:
        raise ValueError(f"loss name must be one of {sorted(LOSSES)}, got {name!r}")
    reduce = REDUCTIONS.get(reduction)
    if reduce is None:
        raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError("x and y must be tensors")
    if x.ndim < 1 or x.shape != y.shape:
        raise ValueError(
            f"x and y must have the same batch-first shape (B, ...), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if getattr(fn, "uses_c", True):
        c = _check_c(name, c)
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    return fn(x.to(dtype) - y.to(dtype), c, reduce)
