"""SoFlow (Luo, Yuan & Liu, ICLR 2026), beyond the paper: learn the solution function f(x_t, t, s) of the flow ODE
directly, with a flow-matching loss on part of the batch and a solution-consistency loss on the rest that needs no
Jacobian-vector product (unlike MeanFlow). Same latents, networks and samplers as the other flow objectives.

Parameterisation (their Euler one): ``f(x_t, t, s) = x_t + (s - t) F(x_t, t, s)``, so f(x, t, t) = x holds by
construction. On slct's flow path ``x_t = (1 - t) x0 + t e`` (t = 1 noise) a step from t down to s < t is
``x_s = x_t - (t - s) u(x_t, t, t - s)``: F is ``slct.precond.FlowModel``'s average velocity u with h = t - s, and
1-step sampling is ``x = e - u(e, 1, 1)``, as MeanFlow's (``slct.sampling.flow_sample``).

- Flow matching (a share ``soflow_fm_fraction`` of each batch): ``u(x_t, t, 0)`` regresses the path's velocity
  ``v = e - x0`` (the solution function's derivative in s at s = t).
- Solution consistency (the rest): for s < l < t, ``f(x_t, t, s)`` is pulled towards ``sg f(x_l, l, s)`` where
  ``x_l = x_t + (l - t) v`` is the same path at l (the same noise, as consistency training); the intermediate time
  ``l = t + (s - t) r(k)`` moves towards t as training goes on (r from ``soflow_r_init`` to ``soflow_r_end``,
  exponentially in the step k: a pure function of the step). The per-sample difference quotient
  ``q = (f_t - sg f_l) / (t - l)`` enters as ``-mean(u_t * sg(w q))``, whose gradient is the direction of
  ``||q||^2`` without the (t - s)/(t - l) factor that grows without bound as l -> t.
- Both terms carry the adaptive weight ``w = 1 / (mean(err^2) + eps)^p`` (sg), as MeanFlow's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slct.objectives.base import (LossTerms, Objective, active_dropout, check_adaptive_weight, check_choice,
                                  check_draws, check_finite, check_fraction, check_positive, check_seed, draw_seed,
                                  flow_equivalent_sigma, per_sample, randn, register_objective, seeded_rng)

MIN_GAP = 1e-4  # the smallest t - s and t - l: the difference quotient needs a gap


@dataclass
class SoFlowFields:
    soflow_fm_fraction: float = 0.75  # share of each batch given the flow-matching loss (their ImageNet: 0.75)
    soflow_t_mean: float = 0.2  # logit-normal t of the consistency rows: mean of logit t (their ImageNet: 0.2)
    soflow_t_std: float = 0.8  # ... and its std
    soflow_s_mean: float = -1.0  # logit-normal s (then capped below t): mean (their ImageNet: -1.0)
    soflow_s_std: float = 0.8  # ... and its std
    soflow_fm_t_mean: float = -0.2  # logit-normal t of the flow-matching rows: mean (their ImageNet: -0.2)
    soflow_fm_t_std: float = 1.0  # ... and its std
    soflow_r_init: float = 0.1  # l = t + (s - t) r(k): r at the first step (their ImageNet: 0.1)
    soflow_r_end: float = 0.002  # ... and at the last (0.002); exponential in between
    soflow_p: float = 1.0  # adaptive weight 1 / (mse + eps)^p (their ImageNet: 1.0)
    soflow_eps: float = 0.01  # ... and its eps (0.01)
    # the no-grad target pass f(x_l, l, s): on the consistency rows only (the authors'; the same loss, bitwise, for
    # a network without dropout; with dropout active the pass runs on all rows, so each row's target sees its online
    # pass's dropout mask, as iCT's do) or on "all" rows (kept to measure what the rows save: benchmarks/training.py)
    soflow_target_rows: str = "consistency"


def validate_soflow(cfg) -> None:
    check_fraction("soflow_fm_fraction", cfg.soflow_fm_fraction)
    for name in ("soflow_t_mean", "soflow_s_mean", "soflow_fm_t_mean"):
        check_finite(name, getattr(cfg, name))
    for name in ("soflow_t_std", "soflow_s_std", "soflow_fm_t_std"):
        check_positive(name, getattr(cfg, name))
    check_adaptive_weight("soflow_p", cfg.soflow_p, "soflow_eps", cfg.soflow_eps)
    check_choice("soflow_target_rows", cfg.soflow_target_rows, ("consistency", "all"))
    for name in ("soflow_r_init", "soflow_r_end"):
        value = getattr(cfg, name)
        check_finite(name, value)
        if not 0 < value <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {value}")


def soflow_ratio(step: int, total_steps: int, r_init: float, r_end: float) -> float:
    """r(k) = r_init (r_end / r_init)^(k / K): where l sits between t (r = 0) and s (r = 1) at step k."""
    return r_init * (r_end / r_init) ** (min(step, total_steps) / total_steps)


def soflow_draws(batch: int, cfg, step: int, total_steps: int, generator) -> torch.Tensor:
    """(B, 3) float64 rows (t, s, l) on the CPU: the first ``round(B * soflow_fm_fraction)`` rows are flow matching
    (s = l = t), the rest solution consistency with s < l < t (gaps at least MIN_GAP)."""
    n_fm = int(round(batch * cfg.soflow_fm_fraction))
    n_sc = batch - n_fm

    def logit_normal(n, mean, std):
        return torch.sigmoid(randn((n,), generator, torch.device("cpu")).double() * std + mean)

    t_fm = logit_normal(n_fm, cfg.soflow_fm_t_mean, cfg.soflow_fm_t_std)
    s_raw = logit_normal(n_sc, cfg.soflow_s_mean, cfg.soflow_s_std)
    t_sc = logit_normal(n_sc, cfg.soflow_t_mean, cfg.soflow_t_std).clamp_min(MIN_GAP)
    s_sc = torch.minimum(s_raw, t_sc - MIN_GAP)
    r = soflow_ratio(step, total_steps, cfg.soflow_r_init, cfg.soflow_r_end)
    l_sc = torch.minimum(t_sc + (s_sc - t_sc) * r, t_sc - MIN_GAP)
    t = torch.cat([t_fm, t_sc])
    return torch.stack([t, torch.cat([t_fm, s_sc]), torch.cat([t_fm, l_sc])], dim=1)


@register_objective("soflow", SoFlowFields, validate_soflow)
class SoFlowObjective(Objective):
    """Flow matching on rows with s = t, solution consistency on the others (see the module docstring). Logged:
    flow matching as ``diffusion``, consistency as ``consistency``; ``mse_fm`` and ``mse_sc`` are the unweighted
    errors (the consistency term's value is a surrogate whose gradient is the one wanted, not an error)."""

    precond_kind = "flow"

    @staticmethod
    def draw_times(cfg, step: int, total_steps: int, batch: int, generator) -> torch.Tensor:
        return soflow_draws(batch, cfg, step, total_steps, generator)

    def _terms(self, model, x0, z, step, labels, generator, indices, dropout_seed, c, target=None) -> LossTerms:
        cfg = self.cfg
        device, batch = x0.device, x0.shape[0]
        draws = soflow_draws(batch, cfg, step, self.total_steps, generator) if indices is None \
            else check_draws(indices, batch, 3)
        t_cpu, s_cpu, l_cpu = draws[:, 0], draws[:, 1], draws[:, 2]
        fm_cpu = s_cpu == t_cpu
        t, s, l = (v.to(device, x0.dtype) for v in (t_cpu, s_cpu, l_cpu))
        v = z - x0  # the path's velocity
        xt = x0 + per_sample(t, x0) * v
        seed = draw_seed(generator) if dropout_seed is None else check_seed(dropout_seed)
        with seeded_rng(seed, device):
            u_t = model(xt, t, labels, t - s).to(x0.dtype)  # h = 0 on flow-matching rows
        fm = fm_cpu.to(device)
        # flow matching: u(x_t, t, 0) -> v
        err_fm = (u_t - v).pow(2).flatten(1).mean(1)
        # solution consistency: f(x_t, t, s) vs sg f(x_l, l, s), the target pass on the consistency rows only (as
        # the authors run it; a network without dropout gives those rows bitwise the full-batch pass's values). With
        # dropout a pass over fewer rows would draw other masks than the online pass, and q divides their
        # difference by t - l (small): so then the pass runs over every row, under the online pass's seed
        xl = x0 + per_sample(l, x0) * v
        u_l = torch.zeros_like(x0)
        every = cfg.soflow_target_rows == "all" or active_dropout(model)
        rows = (torch.ones_like(fm_cpu) if every else ~fm_cpu).nonzero().squeeze(1).to(device)
        if len(rows):
            lab = labels[rows.to(labels.device)] if labels is not None else None
            with torch.no_grad(), seeded_rng(seed, device):
                u_l[rows] = model(xl[rows], l[rows], lab, (l - s)[rows]).to(x0.dtype)
        f_t = xt - per_sample(t - s, x0) * u_t
        f_l = (xl - per_sample(l - s, x0) * u_l).detach()
        gap = torch.where(fm, torch.ones_like(t), t - l)  # flow-matching rows: any non-zero value (unused)
        q = (f_t.detach() - f_l) / per_sample(gap, x0)
        err_sc = q.pow(2).flatten(1).mean(1)
        err = torch.where(fm, err_fm.detach(), err_sc)
        w = 1 / (err + cfg.soflow_eps) ** cfg.soflow_p  # adaptive weight, sg
        consistency_i = -(u_t * (per_sample(w, x0) * q).detach()).flatten(1).mean(1)  # d/du of w ||q||^2 / 2 (t-s)
        diffusion_i = w * err_fm
        zero = torch.zeros_like(err_fm)
        diffusion, consistency = torch.where(fm, diffusion_i, zero), torch.where(fm, zero, consistency_i)
        n_fm = int(fm_cpu.sum())
        stats = {"mean_sigma": float(t_cpu.mean()), "diffusion_fraction": n_fm / batch,
                 "soflow_r": soflow_ratio(step, self.total_steps, cfg.soflow_r_init, cfg.soflow_r_end)}
        if n_fm:
            stats["mse_fm"] = float(err_fm.detach()[fm].mean())
        if n_fm < batch:
            stats["mse_sc"] = float(err_sc[~fm].mean())
        return LossTerms(consistency, diffusion, consistency + diffusion, stats, flow_equivalent_sigma(t_cpu))
