"""Consistency distillation (CD; Song et al. 2023, the route the paper's reviewers asked to compare): the consistency
objective with the target's input x_{t_i} made by one Heun step of a diffusion teacher from x_{t_{i+1}}, instead of
the same noise at t_i. Everything else is the consistency objective's: the curriculum, the robust losses (Cauchy
included), the adaptive c, the diffusion term, OT. The teacher is an ``ldm`` run on the same latents; the training
loop loads it (frozen, eval mode) and counts its training in the run's record."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slct.objectives.base import per_sample, register_objective
from slct.objectives.consistency import ConsistencyObjective


@dataclass
class DistillationFields:
    teacher: str = ""  # distillation: the diffusion teacher, an ldm run directory or snapshot (`--teacher`)


def validate_distillation(cfg) -> None:
    if cfg.kind == "distillation" and not cfg.teacher:
        raise ValueError("consistency distillation needs a teacher: pass --teacher RUN (an ldm run on the same "
                         "latents) or --set objective.teacher=PATH")
    if cfg.teacher and cfg.kind != "distillation":
        raise ValueError(f"objective.teacher is read by consistency distillation only (--preset ilcd or slcd); this "
                         f"is a {cfg.kind} objective")


def heun_step(teacher, x: torch.Tensor, sigma_hi: torch.Tensor, sigma_lo: torch.Tensor, labels=None) -> torch.Tensor:
    """One step of EDM's Heun solver of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma from
    ``sigma_hi`` to ``sigma_lo`` (per sample, (B,)): Euler, then the trapezoidal correction (Karras et al. 2022,
    Algorithm 1, without churn)."""
    hi, lo = per_sample(sigma_hi, x), per_sample(sigma_lo, x)
    d_hi = (x - teacher(x, sigma_hi, labels).to(x.dtype)) / hi
    x_euler = x + (lo - hi) * d_hi
    d_lo = (x_euler - teacher(x_euler, sigma_lo, labels).to(x.dtype)) / lo
    return x + (lo - hi) * (d_hi + d_lo) / 2


@register_objective("distillation", DistillationFields, validate_distillation)
class DistillationObjective(ConsistencyObjective):
    """CD: ``target = sg f(heun(teacher, x0 + t_{i+1} z, t_{i+1} -> t_i), t_i)``, ``online = f(x0 + t_{i+1} z,
    t_{i+1})`` (mu = 0, the same dropout mask), the consistency objective's loss between them. ``target_model`` is the
    teacher (a denoiser D(x, sigma) in the EDM parameterisation); without one the call fails."""

    @property
    def target_weights(self) -> str | None:
        return "teacher"

    def _target_input(self, x0, z, sigma_lo, sigma_hi, labels, teacher) -> torch.Tensor:
        if teacher is None:
            raise ValueError("consistency distillation needs its teacher as target_model (slct.training passes it)")
        return heun_step(teacher, x0 + per_sample(sigma_hi, x0) * z, sigma_hi, sigma_lo, labels)
