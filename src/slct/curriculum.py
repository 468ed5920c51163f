"""Everything that depends on the training step: the discretisation curriculum N(k), the
discrete lognormal timestep distribution, the robustness scale c and the small-noise
diffusion-loss selection (REFERENCE.md [2]-[4]).

All functions are pure: the curriculum is a function of the step alone, so resuming a run at
step k reproduces N, c and the timestep distribution exactly.

Index convention (see ``slct.sigmas``): the grid is ascending and a pair is
``(sigmas[i], sigmas[i + 1]) = (sigma_lo, sigma_hi)`` with the 0-based lower index ``i``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch

from slct.sigmas import karras_sigmas

__all__ = [
    "stage_length_steps",
    "curriculum_stages",
    "num_scales",
    "stage_start_step",
    "timestep_probabilities",
    "sample_timestep_indices",
    "C_SCHEDULES",
    "c_schedule",
    "calibrated_c",
    "CALIBRATED",
    "diffusion_loss_mask",
]


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_stages(s0: int, s1: int) -> None:
    _check_int("s0", s0, 1)
    _check_int("s1", s1, s0)


# ---------------------------------------------------------------------------------------------
# Curriculum (paper eq. 10)


def stage_length_steps(total_steps: int, s0: int = 10, s1: int = 640, min_stage_steps: int = 0) -> int:
    """Steps per curriculum stage ``K' = floor(K / (log2 floor(s1/s0) + 1))`` (paper eq. 10), at least
    ``min_stage_steps``.

    ``log2 floor(s1/s0) + 1`` is the number of stages (7 for the paper's 10 -> 640, 8 for
    iCT's 10 -> 1280). When ``total_steps`` is smaller than that, eq. 10 gives ``K' = 0``; we
    return 1 instead, so a short (smoke-test) run still walks the curriculum one stage per step
    and then stays at ``s1 + 1``.

    ``min_stage_steps`` (beyond the paper; 0 = eq. 10 exactly) keeps eq. 10's doubling but never lets a stage be
    shorter than that: a short run then walks fewer stages (it ends below ``s1 + 1``) instead of giving each one
    fewer steps than the optimiser's memory (RAdam's beta2 = 0.999 remembers ~1,000 steps).
    """
    _check_int("total_steps", total_steps, 1)
    _check_stages(s0, s1)
    _check_int("min_stage_steps", min_stage_steps, 0)
    n_stages = math.log2(s1 // s0) + 1
    return max(1, math.floor(total_steps / n_stages), min_stage_steps)


def curriculum_stages(total_steps: int, s0: int = 10, s1: int = 640, min_stage_steps: int = 0) -> list[dict]:
    """The stages a run of ``total_steps`` walks: [{"start", "steps", "n_scales"}], the last one up to K."""
    k_prime = stage_length_steps(total_steps, s0, s1, min_stage_steps)
    stages: list[dict] = []
    for start in range(0, total_steps, k_prime):
        n = num_scales(start, total_steps, s0, s1, min_stage_steps)
        if stages and stages[-1]["n_scales"] == n:
            stages[-1]["steps"] += min(k_prime, total_steps - start)
            continue
        stages.append({"start": start, "steps": min(k_prime, total_steps - start), "n_scales": n})
    return stages


def num_scales(step: int, total_steps: int, s0: int = 10, s1: int = 640, min_stage_steps: int = 0) -> int:
    """Number of grid points ``N(k) = min(s0 * 2^floor(k/K'), s1) + 1`` (paper eq. 10).

    ``step`` is the 0-based iteration k; it may exceed ``total_steps`` (N stays at ``s1 + 1``).
    For s0 = 10, s1 = 640 the sequence is 11, 21, 41, 81, 161, 321, 641. ``min_stage_steps``: see
    ``stage_length_steps``.
    """
    _check_int("step", step, 0)
    stage_steps = stage_length_steps(total_steps, s0, s1, min_stage_steps)
    # s0 * 2^e > s1 once e reaches bit_length(s1 // s0): cap e so huge steps never build huge ints
    doublings = min(step // stage_steps, (s1 // s0).bit_length())
    return min(s0 * 2**doublings, s1) + 1


def stage_start_step(step: int, total_steps: int, s0: int = 10, s1: int = 640, min_stage_steps: int = 0) -> int:
    """The first step of the curriculum stage ``step`` is in (eq. 10): where N last changed (0 in the first stage;
    the stage at N = s1 + 1 lasts to the end)."""
    _check_int("step", step, 0)
    stage_steps = stage_length_steps(total_steps, s0, s1, min_stage_steps)
    doublings = min(step // stage_steps, (s1 // s0).bit_length())
    while doublings and s0 * 2 ** (doublings - 1) >= s1:  # past the cap N no longer changes: one long last stage
        doublings -= 1
    return doublings * stage_steps


# ---------------------------------------------------------------------------------------------
# Discrete lognormal timestep distribution (iCT; REFERENCE.md [2])


def timestep_probabilities(
    n_scales: int,
    p_mean: float = -1.1,
    p_std: float = 2.0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> torch.Tensor:
    """Probabilities of the lower index ``i`` of a pair, shape ``(n_scales - 1,)``, float64.

    ``P(i) ∝ erf((ln t_{i+1} - P_mean) / (sqrt2 P_std)) - erf((ln t_i - P_mean) / (sqrt2 P_std))``:
    the mass that ``ln sigma ~ N(P_mean, P_std^2)`` puts on ``[t_i, t_{i+1}]`` (REFERENCE.md [2]).
    """
    _check_int("n_scales", n_scales, 2)
    if not (math.isfinite(p_std) and p_std > 0):
        raise ValueError(f"p_std must be finite and > 0, got {p_std}")
    sigmas = karras_sigmas(n_scales, sigma_min, sigma_max, rho)
    cdf = torch.special.erf((sigmas.log() - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def sample_timestep_indices(
    n_scales: int,
    batch: int,
    p_mean: float = -1.1,
    p_std: float = 2.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> torch.Tensor:
    """Draw ``batch`` lower indices ``i`` in ``[0, n_scales - 2]`` from ``timestep_probabilities``.

    Returns an int64 tensor of shape ``(batch,)``; the pairs are ``(sigmas[i], sigmas[i + 1])``.
    The draw uses ``torch.multinomial`` on the generator's device (the CPU when ``generator`` is
    None, i.e. the global CPU RNG), so a saved RNG state reproduces it; the result is then moved
    to ``device`` (default: where it was drawn).
    """
    _check_int("batch", batch, 0)
    probs = timestep_probabilities(n_scales, p_mean, p_std, sigma_min, sigma_max, rho)
    probs = probs.to(generator.device if generator is not None else "cpu")
    if batch == 0:
        indices = torch.empty(0, dtype=torch.int64, device=probs.device)
    else:
        indices = torch.multinomial(probs, batch, replacement=True, generator=generator)
    return indices if device is None else indices.to(device)


# ---------------------------------------------------------------------------------------------
# Robustness scale c (REFERENCE.md [3])


def _c_fixed(n_scales: int, dim: int, s0: int, c0: float | None) -> float:
    # iCT: c0 = 0.00054 sqrt(d), d = elements of one sample (0.03456 for 4x32x32)
    return 0.00054 * math.sqrt(dim) if c0 is None else c0


def _c_adaptive(n_scales: int, dim: int, s0: int, c0: float | None) -> float:
    # paper eq. 11
    return math.exp(-1.18 * math.log(n_scales - 1) - 0.72)


def _c_adaptive_code(n_scales: int, dim: int, s0: int, c0: float | None) -> float:
    # authors' released code: iCT's c0 during the first stage, then a refit of eq. 11
    if n_scales == s0 + 1:
        return _c_fixed(n_scales, dim, s0, c0)
    return math.exp(-1.15 * math.log(n_scales - 1) - 0.85)


# name -> c(n_scales, dim, s0, c0)
C_SCHEDULES: dict[str, Callable[[int, int, int, float | None], float]] = {
    "fixed": _c_fixed,
    "adaptive": _c_adaptive,
    "adaptive-code": _c_adaptive_code,
}


def c_schedule(name: str, n_scales: int, dim: int, s0: int = 10, *, c0: float | None = None) -> float:
    """The robust loss scale ``c`` for the current curriculum stage (REFERENCE.md [3]).

    ``name``: "fixed" (iCT, ``c0 = 0.00054 sqrt(dim)``), "adaptive" (paper eq. 11, default) or
    "adaptive-code" (authors' code: c0 while ``n_scales == s0 + 1``, then
    ``exp(-1.15 ln(N - 1) - 0.85)``). ``dim`` is the number of elements of one sample;
    ``c0`` overrides iCT's fixed value where a schedule uses it.
    """
    if name not in C_SCHEDULES:
        raise ValueError(f"c_schedule name must be one of {sorted(C_SCHEDULES)}, got {name!r}")
    _check_int("n_scales", n_scales, 2)
    _check_int("dim", dim, 1)
    _check_int("s0", s0, 1)
    if c0 is not None and not (math.isfinite(c0) and c0 > 0):
        raise ValueError(f"c0 must be None or finite and > 0, got {c0}")
    return float(C_SCHEDULES[name](n_scales, dim, s0, c0))


# the measured schedule (beyond the paper): c is set by the training loop at each stage start from the r it measures
CALIBRATED = "calibrated"


def calibrated_c(r: torch.Tensor, quantile: float = 0.5, knee: float = 2.0,
                 bounds: tuple[float, float] = (0.0, math.inf)) -> float:
    """c that puts the ``quantile`` of the measured distances r at the robust loss's knee, r = knee x c^2, clamped to
    ``bounds``.

    The Cauchy loss log(1 + r / (2c^2)) (eq. 6) is quadratic below r = 2c^2 (knee 2) and logarithmic above it;
    pseudo-Huber's knee is r = c^2 (eq. 7), Geman-McClure's r = 4c^2 (eq. 8) (``slct.losses``: each loss's
    ``knee``). This c keeps that share of the pairs in the quadratic regime, whatever the data, network and
    curriculum stage (eq. 11 fixes c from N alone, fitted to the paper's CelebA-HQ run). The bounds keep a
    degenerate measurement (all r ~ 0 on a collapsed model, say) from setting an absurd scale.
    """
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if not knee > 0:
        raise ValueError(f"knee must be > 0, got {knee}")
    r = r.detach().double().flatten()
    r = r[torch.isfinite(r)]
    if r.numel() == 0:
        raise ValueError("no finite distance to calibrate c from")
    q = float(torch.quantile(r, quantile))
    lo, hi = bounds
    return min(max(math.sqrt(max(q, 1e-24) / knee), lo), hi)


# ---------------------------------------------------------------------------------------------
# Small-noise diffusion loss selection (paper eq. 9; REFERENCE.md [4])


def diffusion_loss_mask(indices: torch.Tensor, n_scales: int, r: float) -> torch.Tensor:
    """Which samples get the diffusion loss: ``indices < floor(n_scales * r)``, a bool tensor
    shaped like ``indices``.

    ``indices`` are 0-based lower indices on the ascending grid, so this is the paper's 1-based
    "i <= int(N r) counted from sigma_min" (eq. 9). The authors' code counts the same pairs from
    sigma_max (descending index ``k = N - 2 - i``) and selects ``k >= int(0.75 N)``; for r = 0.25
    and every curriculum N (11, 21, ..., 641) the two sets are equal.
    ``r`` in [0, 1]: 1 selects every pair, 0 disables the loss (all False).
    """
    _check_int("n_scales", n_scales, 2)
    if isinstance(r, bool) or not (isinstance(r, numbers.Real) and 0 <= r <= 1):
        raise ValueError(f"r must be a number in [0, 1] (0 disables the diffusion loss), got {r!r}")
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point or indices.is_complex():
        raise ValueError("indices must be an integer tensor of 0-based lower indices")
    return indices < math.floor(n_scales * r)
