"""Evaluation EMAs of the online weights (REFERENCE [8]), for runs of any length. Not the target network: iCT's target
EMA is mu = 0.

Three kinds of profile, each a float32 shadow copy updated after every optimizer step, named in snapshots by ``name``:

- ``FixedDecay`` (the authors' 0.9999 / 0.99993, named "0.9999"): beta = decay. Its half-life is fixed in steps, so a
  run much shorter than ~10 half-lives still holds its initialisation (0.9999: 6,931 steps).
- ``RampUp`` (EDM, Karras et al. 2022; named "rampup"): the half-life is ``ratio`` x the images seen so far, capped at
  ``halflife_nimg``; beta = 0.5 ** (batch / half-life). The average always covers the latest ~5% of training, whatever
  the run's length: the default of every data preset.
- ``PowerEMA`` (EDM2, Karras et al. 2024; named "std=0.05"): beta_t = (1 - 1/t)^(gamma + 1), the weights averaged with a
  power-function profile t^gamma whose relative width is ``std`` (sigma_rel). Stored at intervals, two such profiles
  let ``posthoc_coefficients`` reconstruct an EMA of any other width after training (``slct ema``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class FixedDecay:
    decay: float

    @property
    def name(self) -> str:
        return str(float(self.decay))

    def beta(self, step: int, nimg: int, batch: int) -> float:
        return self.decay


@dataclass(frozen=True)
class RampUp:
    ratio: float = 0.05  # EDM's ema_rampup_ratio
    halflife_nimg: float = 500_000  # EDM's ema_halflife_kimg = 500

    name = "rampup"

    def beta(self, step: int, nimg: int, batch: int) -> float:
        halflife = min(self.halflife_nimg, self.ratio * nimg)  # nimg: images seen including this step
        return 0.5 ** (batch / max(halflife, 1e-8))


def power_gamma(std: float) -> float:
    """The exponent gamma of the power-function EMA with relative standard deviation ``std`` (EDM2 eq. 3):
    the largest real root of std^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))."""
    if not 0 < std < 12 ** -0.5:  # gamma > -1 requires std below 1/sqrt(12) (the uniform average's)
        raise ValueError(f"a power EMA's std must be in (0, {12 ** -0.5:.4f}), got {std}")
    t = std ** -2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def power_std(gamma: float) -> float:
    """The inverse of ``power_gamma``."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


@dataclass(frozen=True)
class PowerEMA:
    std: float

    @property
    def name(self) -> str:
        return f"std={self.std:g}"

    @property
    def gamma(self) -> float:
        return power_gamma(self.std)

    def beta(self, step: int, nimg: int, batch: int) -> float:
        return (1 - 1 / step) ** (self.gamma + 1)  # step >= 1: the number of updates so far, this one included


def profiles_from_config(train_cfg, target_ema: float = 0.0) -> list:
    """The EMA profiles a run tracks: fixed decays, the ramp-up EMA, the power EMAs (``train.ema_*`` keys), and the
    consistency target network's decay (``objective.target_ema`` > 0) unless a fixed decay already is it."""
    decays = [float(d) for d in train_cfg.ema_decays]
    out: list = [FixedDecay(d) for d in decays]
    if target_ema > 0 and float(target_ema) not in decays:
        out.append(FixedDecay(float(target_ema)))
    if train_cfg.ema_rampup_ratio > 0:
        out.append(RampUp(train_cfg.ema_rampup_ratio, train_cfg.ema_halflife_nimg))
    out += [PowerEMA(float(s)) for s in train_cfg.ema_power_stds]
    return out


class EMA:
    """One float32 shadow copy of the parameters and buffers per profile."""

    def __init__(self, model: torch.nn.Module, profiles: list):
        self.profiles = list(profiles)
        self.names = [p.name for p in self.profiles]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"EMA profiles must be distinct, got {self.names}")
        self.shadows = [{k: v.detach().float().clone() for k, v in model.state_dict().items()} for _ in self.profiles]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, nimg: int, batch: int) -> None:
        """After optimizer step ``step`` (1-based: the number of updates so far), ``nimg`` images seen."""
        current = model.state_dict()
        for profile, shadow in zip(self.profiles, self.shadows):
            keys = [k for k, v in shadow.items() if v.is_floating_point()]
            beta = profile.beta(step, nimg, batch)
            # shadow <- beta * shadow + (1 - beta) * current, one fused call for all tensors
            torch._foreach_lerp_([shadow[k] for k in keys], [current[k].float() for k in keys], 1.0 - beta)

    def state_dict(self) -> dict:
        return {"names": self.names, "shadows": self.shadows}

    def load_state_dict(self, state: dict) -> None:
        names = state.get("names") or [str(float(d)) for d in state.get("decays", [])]  # older checkpoints
        if names != self.names:
            raise ValueError(f"the checkpoint tracks the EMAs {names}, the config {self.names} (train.ema_*)")
        for shadow, saved in zip(self.shadows, state["shadows"]):
            for k, v in saved.items():
                shadow[k].copy_(v)

    def weights(self, name: str) -> dict:
        if name not in self.names:
            raise ValueError(f"no EMA named {name!r}; this run tracks {self.names}")
        return self.shadows[self.names.index(name)]


def default_ema(names: list[str], wanted: str | None) -> str:
    """The EMA that snapshots, sample grids, periodic evaluation, `slct sample` and `slct eval` use by default:
    ``wanted`` (``train.ema_default``) when tracked, else the ramp-up EMA, else the largest fixed decay."""
    if wanted and wanted in names:
        return wanted
    if "rampup" in names:
        return "rampup"
    decays = [n for n in names if _is_number(n)]
    if decays:
        return max(decays, key=float)
    if not names:
        raise ValueError("no EMA is tracked")
    return names[-1]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Post-hoc EMA (EDM2, Karras et al. 2024, section 3 and appendix C), in exact discrete form


def power_profile(gamma: float, t: int, length: int | None = None) -> np.ndarray:
    """The weight of the online weights after each step tau = 1..t in a power EMA read after step t (float64,
    ``length`` entries, zero beyond t): w(tau) = (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1).

    This is exactly what the recursion beta_tau = (1 - 1/tau)^(gamma + 1) produces (the products of beta telescope);
    the weights sum to 1.
    """
    tau = np.arange(1, t + 1, dtype=np.float64)
    w = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / float(t) ** (gamma + 1)
    return np.pad(w, (0, (length or t) - t))


def posthoc_coefficients(stored: list[tuple[int, float]], target: tuple[int, float], chunk: int = 1 << 16) -> np.ndarray:
    """Least-squares weights x so that sum_i x_i EMA_i approximates a power EMA of another width.

    ``stored``: (step t_i, std_i) of each stored power-EMA snapshot; ``target``: (step, std) wanted. Minimises
    || sum_i x_i w_i - w_target ||_2 over the per-step weights w (``power_profile``), which is exact when the target
    profile lies in the span of the stored ones (for instance when snapshots exist at every step), and otherwise the
    closest combination (EDM2's post-hoc EMA, with discrete sums instead of integrals so short runs are exact too).
    The weights are divided by their sum, as EDM2 does: where the fit is exact they already sum to 1, elsewhere an
    unnormalised combination would shrink or grow every weight of the network.
    """
    if not stored:
        raise ValueError("no stored power-EMA snapshots to reconstruct from")
    t_r, std_r = target
    length = max(t_r, *(t for t, _ in stored))
    gammas = [power_gamma(s) for _, s in stored]
    gamma_r = power_gamma(std_r)
    n = len(stored)
    a, b = np.zeros((n, n)), np.zeros(n)
    for start in range(0, length, chunk):  # W is n x length: accumulate W W^T and W w_r chunk by chunk
        stop = min(start + chunk, length)
        w = np.stack([power_profile(g, t, length)[start:stop] for (t, _), g in zip(stored, gammas)])
        w_r = power_profile(gamma_r, t_r, length)[start:stop]
        a += w @ w.T
        b += w @ w_r
    x, *_ = np.linalg.lstsq(a, b, rcond=None)
    total = float(x.sum())
    if not abs(total) > 1e-12:
        raise ValueError(f"the stored power EMAs cannot make std={std_r:g} at step {t_r}: their least-squares "
                         "weights sum to 0")
    return x / total  # a weighted average: the result keeps the weights' scale (EDM2 normalises the same way)


def combine(states: list[dict], coefficients) -> dict:
    """sum_i c_i states[i] for floating-point entries (the others from the first state)."""
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            acc = torch.zeros_like(first, dtype=torch.float64)
            for c, state in zip(coefficients, states):
                acc += float(c) * state[key].double()
            out[key] = acc.to(first.dtype)
        else:
            out[key] = first.clone()
    return out
