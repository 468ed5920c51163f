"""EDM's denoising loss: the paper's diffusion baseline (LDM-8-dagger) with the same network (REFERENCE.md [10])."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from slct.losses import robust_loss
from slct.objectives.base import (LossTerms, Objective, check_finite, check_positive, check_seed, per_sample,
                                  randn, register_objective, seeded_rng)


@dataclass
class EDMFields:
    edm_p_mean: float = -1.2  # kind "edm": EDM's training distribution, mean of ln sigma
    edm_p_std: float = 1.2  # kind "edm": ... and its std


def validate_edm(cfg) -> None:
    check_positive("edm_p_std", cfg.edm_p_std)
    check_finite("edm_p_mean", cfg.edm_p_mean)


@register_objective("edm", EDMFields, validate_edm)
class EDMObjective(Objective):
    """EDM's denoising loss, the paper's diffusion baseline with the same network (VE, [10]).

    ``sigma = exp(N(edm_p_mean, edm_p_std^2))`` per sample; ``total_i = (sigma^2 + sd^2) /
    (sigma sd)^2 * mse(D(x0 + sigma z, sigma), x0)`` with the per-sample mse reduced as
    ``cfg.loss_reduction``. ``model`` should use ``Precond(kind="edm")`` (``self.precond``).
    ``step`` is accepted for a uniform call signature and unused; ``cfg.coupling`` applies to
    the noise as in ``ConsistencyObjective`` (set "none" for a plain EDM baseline).
    RNG draws per call, in order: noise (unless given), sigmas. ``dropout_seed``, if given, seeds
    the forward pass (as in ``ConsistencyObjective``); ``indices`` must be None (sigmas here are
    continuous).
    """

    precond_kind = "edm"

    def _terms(self, model, x0, z, step, labels, generator, indices, dropout_seed, c, target=None) -> LossTerms:
        cfg = self.cfg
        if indices is not None:
            raise ValueError("indices must be None for the EDM objective (it draws continuous sigmas)")
        device, batch = x0.device, x0.shape[0]
        # Karras et al. 2022, Table 1: ln sigma ~ N(P_mean, P_std^2), lambda = (s^2 + sd^2) / (s sd)^2
        sigma = (randn((batch,), generator, torch.device("cpu")).double() * cfg.edm_p_std + cfg.edm_p_mean).exp()
        weight = (sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data) ** 2
        stats = {"mean_sigma": float(sigma.mean()), "mean_weight": float(weight.mean()), "diffusion_fraction": 1.0}
        sigma_cpu = sigma
        sigma, weight = sigma.to(device, x0.dtype), weight.to(device, x0.dtype)
        seeded = dropout_seed is not None
        with seeded_rng(check_seed(dropout_seed), device) if seeded else contextlib.nullcontext():
            denoised = model(x0 + per_sample(sigma, x0) * z, sigma, labels).to(x0.dtype)
        total = weight * robust_loss("l2", denoised, x0, reduction=cfg.loss_reduction)
        return LossTerms(torch.zeros_like(total), total, total, stats, sigma_cpu)
