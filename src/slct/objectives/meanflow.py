"""MeanFlow (Geng et al. 2025), beyond the paper, written from the MeanFlow paper: the average velocity trained from
the MeanFlow identity on the flow path x_t = (1 - t) x0 + t e (t = 1 noise; slct.precond.FlowModel)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slct.objectives.base import (LossTerms, Objective, check_adaptive_weight, check_choice, check_draws, check_finite,
                                  check_fraction, check_positive, check_seed, draw_seed, flow_equivalent_sigma,
                                  per_sample, rand, randn, register_objective, seeded_rng)

# how MeanFlow gets du/dt along the path
MEANFLOW_DERIVATIVES: tuple[str, ...] = ("jvp", "finite-difference")


@dataclass
class MeanFlowFields:
    flow_t_mean: float = -0.4  # meanflow: logit-normal time sampler, mean of logit t (MeanFlow's ImageNet best)
    flow_t_std: float = 1.0  # ... and its std
    meanflow_r_fraction: float = 0.25  # meanflow: share of samples with r != t (the rest: r = t, flow matching)
    meanflow_p: float = 1.0  # meanflow: adaptive loss weight 1 / (||err||^2 + c)^p (p = 0: plain squared error)
    meanflow_c: float = 1e-3  # ... and its c
    meanflow_derivative: str = "jvp"  # "jvp": forward-mode torch.func.jvp | "finite-difference" (central, 2 passes)
    meanflow_fd_eps: float = 1e-3  # step of the finite difference along (dz, dt) = (v, 1)
    # beyond the paper, for short runs: this share of the rows gets the whole interval (t, r) = (1, 0), the one step
    # that 1-step sampling takes (the logit-normal times almost never reach t = 1); 0 = the paper's sampler
    meanflow_boundary_fraction: float = 0.0


def validate_meanflow(cfg) -> None:
    check_finite("flow_t_mean", cfg.flow_t_mean)
    for name in ("flow_t_std", "meanflow_fd_eps"):
        check_positive(name, getattr(cfg, name))
    check_adaptive_weight("meanflow_p", cfg.meanflow_p, "meanflow_c", cfg.meanflow_c)
    check_fraction("meanflow_r_fraction", cfg.meanflow_r_fraction)
    check_fraction("meanflow_boundary_fraction", cfg.meanflow_boundary_fraction)
    check_choice("meanflow_derivative", cfg.meanflow_derivative, MEANFLOW_DERIVATIVES)


def logit_normal(shape, mean: float, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """t = sigmoid(N(mean, std^2)), float64 on the CPU (MeanFlow's time sampler)."""
    return torch.sigmoid(randn(shape, generator, torch.device("cpu")).double() * std + mean)


def meanflow_times(batch: int, cfg, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, r), t >= r: two logit-normal draws sorted; a fraction 1 - meanflow_r_fraction gets r = t (MeanFlow 4.3);
    then, with ``meanflow_boundary_fraction`` > 0, that share of rows gets (t, r) = (1, 0) (drawn last, and only
    then, so the paper's sampler draws exactly what it always did)."""
    a = logit_normal((batch,), cfg.flow_t_mean, cfg.flow_t_std, generator)
    b = logit_normal((batch,), cfg.flow_t_mean, cfg.flow_t_std, generator)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    keep = rand((batch,), generator) < cfg.meanflow_r_fraction
    r = torch.where(keep, r, t)
    if cfg.meanflow_boundary_fraction > 0:
        whole = rand((batch,), generator) < cfg.meanflow_boundary_fraction
        t, r = torch.where(whole, 1.0, t), torch.where(whole, 0.0, r)
    return t, r


def meanflow_draws(batch: int, cfg, generator) -> torch.Tensor:
    """(B, 2) float64 rows (t, r) (:func:`meanflow_times`)."""
    return torch.stack(meanflow_times(batch, cfg, generator), dim=1)


@register_objective("meanflow", MeanFlowFields, validate_meanflow)
class MeanFlowObjective(Objective):
    """MeanFlow (Geng et al. 2025): train the average velocity u(z, r, t) = 1/(t - r) int_r^t v(z_s, s) ds from the
    MeanFlow identity u = v - (t - r) du/dt (their eq. 6), du/dt the total derivative along the path.

    Per sample: (t, r) from :func:`meanflow_times`, ``z = (1 - t) x0 + t e``, ``v = e - x0``; with ``h = t - r`` the
    model is ``u(z, t, h)`` (:class:`slct.precond.FlowModel`) and du/dt = J_u (v, 1, 1) over (z, t, h) (dr/dt = 0,
    so dh/dt = 1): one forward-mode JVP (``torch.func.jvp``, whose primal output keeps its autograd graph), or a
    central finite difference. Target ``u_tgt = sg(v - h du/dt)``; loss ``sg(w) ||u - u_tgt||^2`` with the adaptive
    weight ``w = 1 / (||u - u_tgt||^2 + c)^p`` (their eq. 9 with p = 1, c = 1e-3; ||.||^2 sums over elements).
    Samples with r = t are flow matching (target v): reported as ``diffusion``, the others as ``consistency``.

    Under DDP the JVP must run on the unwrapped module (PyTorch's DDP does not support forward-mode AD): the
    training loop passes it and all-reduces the gradients itself (``sync_gradients_manually``).
    RNG draws per call, in order: noise (unless given), times (unless given as ``indices``: (B, 2) float64 rows
    (t, r), as the batch pipeline pre-draws them for the global batch), one dropout seed (unless given).
    """

    precond_kind = "flow"
    sync_gradients_manually = True

    @staticmethod
    def draw_times(cfg, step: int, total_steps: int, batch: int, generator) -> torch.Tensor:
        return meanflow_draws(batch, cfg, generator)

    def _terms(self, model, x0, z, step, labels, generator, indices, dropout_seed, c, target=None) -> LossTerms:
        cfg = self.cfg
        device, batch = x0.device, x0.shape[0]
        draws = meanflow_draws(batch, cfg, generator) if indices is None else check_draws(indices, batch, 2)
        t_cpu, r_cpu = draws[:, 0], draws[:, 1]
        t, h = t_cpu.to(device, x0.dtype), (t_cpu - r_cpu).to(device, x0.dtype)
        zt = (1 - per_sample(t, x0)) * x0 + per_sample(t, x0) * z  # MeanFlow eq. 1
        v = z - x0

        def u_fn(zz, tt, hh):
            return model(zz, tt, labels, hh)

        seed = draw_seed(generator) if dropout_seed is None else check_seed(dropout_seed)
        ones = torch.ones_like(t)
        with seeded_rng(seed, device):
            if cfg.meanflow_derivative == "jvp":
                u, dudt = torch.func.jvp(u_fn, (zt, t, h), (v, ones, ones))  # total derivative along (v, 1, 1)
            else:
                u = u_fn(zt, t, h)
        if cfg.meanflow_derivative == "finite-difference":
            eps = cfg.meanflow_fd_eps
            with torch.no_grad(), seeded_rng(seed, device):
                ahead = u_fn(zt + eps * v, t + eps, h + eps)
            with torch.no_grad(), seeded_rng(seed, device):
                behind = u_fn(zt - eps * v, t - eps, h - eps)
            dudt = (ahead - behind) / (2 * eps)
        u = u.to(x0.dtype)
        target = (v - per_sample(h, x0) * dudt.to(x0.dtype)).detach()  # MeanFlow eq. 6, stop-gradient
        sq = (u - target).pow(2).flatten(1).sum(1)  # ||u - u_tgt||^2 per sample
        weight = 1 / (sq.detach() + cfg.meanflow_c) ** cfg.meanflow_p  # adaptive weight, sg
        total = weight * sq
        instantaneous = (t_cpu == r_cpu).to(device)
        # the weighted loss is sq / (sq + c) ~ 1 whenever sq >> c: the unweighted error is what shows progress
        mean_weight, mse = torch.stack([weight.detach().mean(), sq.detach().mean() / x0[0].numel()]).tolist()
        stats = {"mean_sigma": float(t_cpu.mean()), "mean_weight": mean_weight, "mse": mse,  # one device sync
                 "diffusion_fraction": float((t_cpu == r_cpu).double().mean()),
                 "mean_interval": float((t_cpu - r_cpu).mean())}
        zero = torch.zeros_like(total)
        return LossTerms(torch.where(instantaneous, zero, total), torch.where(instantaneous, total, zero), total,
                         stats, flow_equivalent_sigma(t_cpu))
