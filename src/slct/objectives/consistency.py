"""sLCT's consistency-training objective (iCT with mu = 0) plus the small-noise diffusion loss (REFERENCE.md [2]-[4];
paper section 4)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from slct.curriculum import (C_SCHEDULES, CALIBRATED, c_schedule, diffusion_loss_mask, num_scales,
                             sample_timestep_indices)
from slct.losses import LOSSES, robust_loss
from slct.objectives.base import (LossTerms, Objective, check_choice, check_finite, check_int,
                                  check_positive, check_seed, draw_seed, per_sample, register_objective, seeded_rng)
from slct.sigmas import ct_weight, karras_sigmas

# diffusion-loss weighting: name -> (sigma, sigma_data) -> per-sample weight (REFERENCE.md [4])
DIFFUSION_WEIGHTINGS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "edm": lambda sigma, sigma_data: 1 / sigma**2 + 1 / sigma_data**2,  # authors' code (EDM's lambda)
    "none": lambda sigma, sigma_data: torch.ones_like(sigma),  # paper eq. 9 as printed
}

# which pass the diffusion loss uses: the online one at t_{i+1}, or an extra one at t_i
DIFFUSION_SIGMAS: tuple[str, ...] = ("hi", "lo")


@dataclass
class ConsistencyFields:
    """The consistency objective's constants (``[n]`` = REFERENCE.md section). Defaults: the sLCT recipe; where
    paper and released code differ the default follows the code, except ``c_schedule`` (paper eq. 11)."""

    p_mean: float = -1.1  # lognormal timestep distribution: mean of ln sigma [2]
    p_std: float = 2.0  # ... and its std [2]
    s0: int = 10  # curriculum: initial number of intervals, N = s0 + 1 (eq. 10) [2]
    s1: int = 640  # curriculum: final number of intervals (iCT's CIFAR-10: 1280) [2]
    min_stage_steps: int = 0  # curriculum stages last at least this long (fewer stages in short runs); 0 = eq. 10
    loss: str = "cauchy"  # robust distance, a key of slct.losses.LOSSES (eqs. 6-8) [3]
    c_schedule: str = "adaptive"  # "adaptive" (eq. 11) | "adaptive-code" | "fixed" (iCT) | "calibrated" [3]
    c_calibration_quantile: float = 0.5  # "calibrated": this quantile of r sits at the knee r/(2c^2) = 1
    c_calibration_batches: int = 4  # "calibrated": batches measured (no gradients) at each stage start
    # "calibrated": c is clamped to these, per element (x sqrt(d) with loss_reduction "sum": slct.calibration)
    c_calibration_bounds: list = field(default_factory=lambda: [1e-5, 1.0])
    c0: float | None = None  # iCT's fixed c; None -> 0.00054 sqrt(elements per sample) [3]
    diffusion_r: float = 0.25  # diffusion loss on the smallest-sigma fraction r of the grid; 0 = off [4]
    diffusion_weight: float = 5.0  # its weight w (authors' code: 5; paper form: 1) [4]
    diffusion_weighting: str = "edm"  # "edm": x (1/s^2 + 1/sd^2) (code) | "none" (paper) [4]
    diffusion_sigma: str = "hi"  # "hi": reuse the online pass at t_{i+1} (code) | "lo": extra pass at t_i (paper) [4]
    # the target network: 0 = the online network itself (iCT's mu = 0, [2]); mu > 0 = an EMA of the online weights
    # with this decay, updated after every step (the original CT/CD; openai's consistency distillation: 0.95)
    target_ema: float = 0.0


def validate_consistency(cfg) -> None:
    check_choice("loss", cfg.loss, LOSSES)
    check_choice("c_schedule", cfg.c_schedule, {*C_SCHEDULES, CALIBRATED})
    if not 0 < cfg.c_calibration_quantile < 1 or cfg.c_calibration_batches < 1:
        raise ValueError("c_calibration_quantile must be in (0, 1) and c_calibration_batches >= 1")
    bounds = cfg.c_calibration_bounds
    if len(bounds) != 2 or not all(isinstance(b, (int, float)) and math.isfinite(b) for b in bounds) \
            or not 0 < bounds[0] < bounds[1]:
        raise ValueError(f"c_calibration_bounds must be [low, high] with 0 < low < high, got {bounds}")
    if cfg.c_schedule == CALIBRATED and LOSSES[cfg.loss].knee is None:
        knees = sorted(name for name, fn in LOSSES.items() if fn.knee is not None)
        raise ValueError(f"c_schedule 'calibrated' puts r at a robust loss's knee; the {cfg.loss!r} loss has no c: "
                         f"use one of {knees} or another c_schedule")
    check_choice("diffusion_weighting", cfg.diffusion_weighting, DIFFUSION_WEIGHTINGS)
    if not (isinstance(cfg.target_ema, (int, float)) and 0 <= cfg.target_ema < 1):
        raise ValueError(f"target_ema must be in [0, 1) (0: the online network, iCT's; 0.95: openai's CD), got "
                         f"{cfg.target_ema!r}")
    check_choice("diffusion_sigma", cfg.diffusion_sigma, DIFFUSION_SIGMAS)
    for name in ("p_std", "diffusion_weight"):
        check_positive(name, getattr(cfg, name), allow_zero=name == "diffusion_weight")
    check_finite("p_mean", cfg.p_mean)
    for name, minimum in (("s0", 1), ("s1", cfg.s0), ("min_stage_steps", 0)):
        check_int(name, getattr(cfg, name), minimum)
    if cfg.c0 is not None:
        check_positive("c0", cfg.c0)
    check_finite("diffusion_r", cfg.diffusion_r)
    if not 0 <= cfg.diffusion_r <= 1:
        raise ValueError(f"diffusion_r must be in [0, 1] (0 disables the diffusion loss), got {cfg.diffusion_r}")


def check_indices(indices, batch: int, n_scales: int) -> torch.Tensor:
    """Validated lower indices as an int64 CPU tensor of shape (B,)."""
    integer = isinstance(indices, torch.Tensor) and not indices.dtype.is_floating_point and indices.dtype != torch.bool
    if not integer or indices.shape != (batch,):
        shape = getattr(indices, "shape", indices)
        raise ValueError(f"indices must be an integer tensor of shape ({batch},), got {shape!r}")
    index = indices.to("cpu", torch.int64)
    if batch and not (0 <= int(index.min()) and int(index.max()) <= n_scales - 2):
        raise ValueError(f"indices must lie in [0, {n_scales - 2}] for N = {n_scales} grid points")
    return index


@register_objective("consistency", ConsistencyFields, validate_consistency)
class ConsistencyObjective(Objective):
    """sLCT's consistency-training loss (iCT with mu = 0) plus the small-noise diffusion loss.

    Per call, for a batch ``x0`` of shape ``(B, ...)`` at training step ``step``:

    1. ``N = num_scales(step)`` (eq. 10), ``c = c_schedule(N)`` (eq. 11 or variants);
    2. noise ``z``: ``noise`` as given (already coupled by the caller), else drawn and re-paired
       by ``cfg.coupling`` (OT, [5]) before anything else is drawn;
    3. lower indices ``i`` from the discrete lognormal [2]; ``x_hi = x0 + t_{i+1} z`` through the
       online pass (with grad), ``x_lo = x0 + t_i z`` through the same model under no_grad
       (the target, mu = 0), both with the same dropout mask;
    4. ``consistency_i = lambda(t_i) d(f(x_hi), f(x_lo))``, ``lambda = 1 / (t_{i+1} - t_i)``;
    5. ``diffusion_i = w * weighting_i * mse_i * mask_i * B / max(n_selected, 1)`` on the
       smallest-sigma fraction r of the grid (eq. 9), so ``total.mean()`` is the batch-mean
       consistency loss plus w times the mean diffusion term over the selected samples —
       the authors' reduction; an empty selection contributes exactly 0.

    RNG draws per call, in order: noise (unless given), indices, one dropout seed. A data
    pipeline may pre-draw all three (``noise``, ``indices``, ``dropout_seed``), e.g. for the
    global batch from a per-step generator; the objective then draws nothing.
    """

    precond_kind = "consistency"
    takes_ema_target = True

    @staticmethod
    def draw_times(cfg, step: int, total_steps: int, batch: int, generator) -> torch.Tensor:
        """Lower grid indices (B,) from the discrete lognormal at this step's N (eq. 10, [2])."""
        n = num_scales(step, total_steps, cfg.s0, cfg.s1, cfg.min_stage_steps)
        return sample_timestep_indices(n, batch, cfg.p_mean, cfg.p_std, generator=generator,
                                       sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, rho=cfg.rho)

    def _terms(self, model, x0, z, step, labels, generator, indices, dropout_seed, c, target=None,
               ema_target=None) -> LossTerms:
        """``indices``: lower indices in ``[0, N - 2]``; ``target``: the teacher of distillation (see there);
        ``ema_target``: the target network when ``target_ema`` > 0 (the EMA of the online weights)."""
        cfg, teacher = self.cfg, target
        if cfg.target_ema > 0 and ema_target is None:
            raise ValueError("objective.target_ema > 0 needs the EMA target network as ema_target (slct.training "
                             "passes it)")
        target_net = ema_target if cfg.target_ema > 0 else model
        device, batch = x0.device, x0.shape[0]
        n_scales = num_scales(step, self.total_steps, cfg.s0, cfg.s1, cfg.min_stage_steps)
        if c is None:
            if cfg.c_schedule == CALIBRATED:
                raise ValueError("c_schedule 'calibrated' needs the c measured at the stage start: pass c=... "
                                 "(slct.training does)")
            c = c_schedule(cfg.c_schedule, n_scales, x0[0].numel(), cfg.s0, c0=cfg.c0)

        # indices, grid and weights stay on the CPU in float64: no device sync for the stats
        grid = dict(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, rho=cfg.rho)
        if indices is None:
            indices = sample_timestep_indices(n_scales, batch, cfg.p_mean, cfg.p_std, generator, **grid)
        index = check_indices(indices, batch, n_scales)
        sigmas = karras_sigmas(n_scales, **grid)
        sigma_lo, sigma_hi = sigmas[index], sigmas[index + 1]
        weight = ct_weight(sigma_lo, sigma_hi)
        selected = diffusion_loss_mask(index, n_scales, cfg.diffusion_r)
        n_selected = int(selected.sum())
        stats = {
            "n_scales": float(n_scales),
            "c": c,
            "mean_sigma": float(sigma_hi.mean()),
            "mean_weight": float(weight.mean()),
            "diffusion_fraction": n_selected / batch,
        }
        sigma_lo, sigma_hi, weight = (t.to(device, x0.dtype) for t in (sigma_lo, sigma_hi, weight))

        seed = draw_seed(generator) if dropout_seed is None else check_seed(dropout_seed)
        with seeded_rng(seed, device):
            online = model(x0 + per_sample(sigma_hi, x0) * z, sigma_hi, labels)
        with torch.no_grad(), seeded_rng(seed, device):
            target = target_net(self._target_input(x0, z, sigma_lo, sigma_hi, labels, teacher), sigma_lo, labels)
        online = online.to(x0.dtype)
        target = target.detach().to(x0.dtype)
        consistency = weight * robust_loss(cfg.loss, online, target, c, cfg.loss_reduction)  # eq. 4
        r = robust_loss("l2", online.detach(), target, reduction=cfg.loss_reduction)  # the r of eqs. 6-8

        diffusion = torch.zeros_like(consistency)
        if n_selected > 0 and cfg.diffusion_weight > 0:
            rows = selected.nonzero().squeeze(1).to(device)
            term = self._diffusion_term(model, x0, z, labels, rows, online, sigma_lo, sigma_hi, seed)
            diffusion = diffusion.index_put((rows,), cfg.diffusion_weight * term * (batch / n_selected))
        return LossTerms(consistency, diffusion, consistency + diffusion, stats, sigmas[index + 1], r)

    def _target_input(self, x0, z, sigma_lo, sigma_hi, labels, teacher) -> torch.Tensor:
        """x_{t_i} of the target pass: the same noise at t_i (consistency training, iCT)."""
        return x0 + per_sample(sigma_lo, x0) * z

    def _diffusion_term(self, model, x0, z, labels, rows, online, sigma_lo, sigma_hi, seed) -> torch.Tensor:
        """``weighting * mse`` of the selected ``rows``, shape ``(len(rows),)`` (eq. 9, [4])."""
        cfg = self.cfg
        if cfg.diffusion_sigma == "hi":  # authors' code: the online pass at t_{i+1}, no extra cost
            pred, sigma = online[rows], sigma_hi[rows]
        else:  # paper eq. 9 as printed: f(x_{t_i}, t_i), one extra online pass on the selected rows
            sigma = sigma_lo[rows]
            sub_labels = labels[rows.to(labels.device)] if labels is not None else None
            with seeded_rng(seed, x0.device):
                pred = model(x0[rows] + per_sample(sigma, x0) * z[rows], sigma, sub_labels).to(x0.dtype)
        mse = robust_loss("l2", pred, x0[rows], reduction=cfg.loss_reduction)
        return DIFFUSION_WEIGHTINGS[cfg.diffusion_weighting](sigma, cfg.sigma_data) * mse
