"""Conditional flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023), beyond the paper: the many-step
baseline of the flow-map objectives (SoFlow's flow-matching rows are this loss), on the same latents and networks.

Path and target (slct's flow convention, ``slct.precond.FlowModel``): ``x_t = (1 - t) x0 + t e`` (t = 1: noise),
whose velocity is ``v = e - x0``; the network's instantaneous velocity ``u(x_t, t, 0)`` regresses v with a per-sample
mean squared error (no weighting: flow matching's plain loss). Time law: logit-normal, ``t = sigmoid(N(fm_t_mean,
fm_t_std^2))`` (Esser et al. 2024's rectified-flow default, mean 0 and std 1: more weight on the middle of the path
than uniform t). Sampled by integrating ``dx/dt = u(x, t, 0)`` from t = 1 to 0 with Euler or Heun at any NFE
(``sampling.flow_solver``; :func:`slct.sampling.flow_ode_sample`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slct.objectives.base import (LossTerms, Objective, check_draws, check_finite, check_positive, check_seed,
                                  draw_seed, flow_equivalent_sigma, per_sample, randn, register_objective,
                                  seeded_rng)


@dataclass
class FlowMatchingFields:
    fm_t_mean: float = 0.0  # kind "fm": logit-normal t, mean of logit t (rectified flow as in Esser et al. 2024)
    fm_t_std: float = 1.0  # ... and its std


def validate_fm(cfg) -> None:
    check_finite("fm_t_mean", cfg.fm_t_mean)
    check_positive("fm_t_std", cfg.fm_t_std)


def fm_times(batch: int, cfg, generator) -> torch.Tensor:
    """(B, 1) float64 on the CPU: t = sigmoid(N(fm_t_mean, fm_t_std^2)), the flow-matching time law."""
    return torch.sigmoid(randn((batch,), generator, torch.device("cpu")).double() * cfg.fm_t_std
                         + cfg.fm_t_mean).unsqueeze(1)


@register_objective("fm", FlowMatchingFields, validate_fm)
class FlowMatchingObjective(Objective):
    """``total_i = mean((u(x_t, t, 0) - (e - x0))^2)``, reported as ``diffusion`` (the consistency term is 0).
    RNG draws per call: noise (unless given), times, one dropout seed (unless given)."""

    precond_kind = "flow"
    flow_map = False  # trained at h = 0 only: sampled by integrating its velocity (sampling.flow_solver)

    @staticmethod
    def draw_times(cfg, step: int, total_steps: int, batch: int, generator) -> torch.Tensor:
        return fm_times(batch, cfg, generator)

    @classmethod
    def report_nfe(cls, sampling_cfg) -> list[int]:
        # a many-step ODE model: the same network evaluations as the ldm baseline's Heun sampler
        return [2 * sampling_cfg.ldm_steps - 1]

    def _terms(self, model, x0, z, step, labels, generator, indices, dropout_seed, c, target=None) -> LossTerms:
        batch, device = x0.shape[0], x0.device
        t_cpu = (fm_times(batch, self.cfg, generator) if indices is None else check_draws(indices, batch, 1))[:, 0]
        t = t_cpu.to(device, x0.dtype)
        xt = x0 + per_sample(t, x0) * (z - x0)
        seed = draw_seed(generator) if dropout_seed is None else check_seed(dropout_seed)
        with seeded_rng(seed, device):
            u = model(xt, t, labels, torch.zeros_like(t)).to(x0.dtype)
        total = (u - (z - x0)).pow(2).flatten(1).mean(1)
        stats = {"mean_sigma": float(t_cpu.mean()), "diffusion_fraction": 1.0}
        return LossTerms(torch.zeros_like(total), total, total, stats, flow_equivalent_sigma(t_cpu))
