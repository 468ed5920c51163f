"""Shortcut models (Frans et al. 2025), beyond the paper, written from the Shortcut paper: one network u(x_t, t, d)
conditioned on the step size, on the flow path x_t = (1 - t) x0 + t e (slct.precond.FlowModel)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slct.losses import robust_loss
from slct.objectives.base import (LossTerms, Objective, check_choice, check_draws, check_finite, check_seed, draw_seed,
                                  flow_equivalent_sigma, per_sample, rand, register_objective, seeded_rng)


@dataclass
class ShortcutFields:
    shortcut_max_steps: int = 128  # shortcut: M, the finest step 1/M (a power of 2); d in {1/M, ..., 1}
    shortcut_bootstrap: float = 0.25  # shortcut: share of the batch given self-consistency targets (the paper: 1/4)
    # who makes the self-consistency targets: "online" (the model being trained, in train mode: eq. 5 as written)
    # or "ema" (the run's default EMA in eval mode, no dropout: the authors' code)
    shortcut_targets: str = "online"


def validate_shortcut(cfg) -> None:
    check_finite("shortcut_bootstrap", cfg.shortcut_bootstrap)
    if not 0 <= cfg.shortcut_bootstrap <= 1:
        raise ValueError(f"shortcut_bootstrap must be in [0, 1], got {cfg.shortcut_bootstrap}")
    check_choice("shortcut_targets", cfg.shortcut_targets, ("online", "ema"))
    m = cfg.shortcut_max_steps
    if isinstance(m, bool) or not isinstance(m, int) or m < 2 or m & (m - 1):
        raise ValueError(f"shortcut_max_steps must be a power of 2 >= 2, got {m!r}")


def shortcut_draws(batch: int, cfg, generator) -> torch.Tensor:
    """(B, 2) float64 rows (t, d) for a Shortcut batch, on the CPU.

    The first ``round(batch * shortcut_bootstrap)`` rows are self-consistency ones: step sizes d = 2^-k spread
    evenly over k in {0, ..., log2 M - 1} and t on d's grid {d, 2d, ..., 1}; the rest are flow matching with
    t on the 1/M grid {1/M, ..., 1} and d = 1/M, the finest step standing for d -> 0 (as the authors' code does,
    so every self-consistency chain ends on a level that flow matching trains). A row is a self-consistency one
    exactly when d > 1/M.
    """
    m = cfg.shortcut_max_steps
    levels = int(math.log2(m))
    n_boot = int(round(batch * cfg.shortcut_bootstrap))
    k = torch.arange(n_boot) * levels // max(n_boot, 1)  # even coverage of the levels, coarsest first
    d_boot = 0.5 ** k.double()
    sections = (1 / d_boot).round().long()
    t_boot = (torch.floor(rand((n_boot,), generator) * sections) + 1) / sections  # {d, 2d, ..., 1}
    n_flow = batch - n_boot
    t_flow = (torch.floor(rand((n_flow,), generator) * m) + 1) / m  # {1/M, ..., 1}
    d = torch.cat([d_boot, torch.full((n_flow,), 1 / m, dtype=torch.float64)])
    return torch.stack([torch.cat([t_boot, t_flow]), d], dim=1)


@register_objective("shortcut", ShortcutFields, validate_shortcut)
class ShortcutObjective(Objective):
    """Shortcut models (Frans et al. 2025): one network u(x_t, t, d) that steps from t to t - d, trained with flow
    matching at the finest step and self-consistency across step sizes (their eq. 5):
    ``u(x_t, t, 2d) = (u(x_t, t, d) + u(x_t - d u(x_t, t, d), t - d, d)) / 2``, the right side under no_grad.

    Draws: :func:`shortcut_draws` (or pre-drawn (t, d) rows as ``indices``); ``x_t = (1 - t) x0 + t e``.
    Flow-matching rows regress ``v = e - x0``; bootstrap rows (step d, target from two d/2 steps of the same online
    model, no gradient) regress the average of the two. Per-sample loss: mean squared error over elements; flow
    matching is reported as ``diffusion``, bootstrap as ``consistency``. RNG draws per call: noise (unless given),
    times, one dropout seed (unless given).
    """

    precond_kind = "flow"

    @property
    def target_weights(self) -> str | None:
        return "ema" if self.cfg.shortcut_targets == "ema" else None

    @staticmethod
    def draw_times(cfg, step: int, total_steps: int, batch: int, generator) -> torch.Tensor:
        return shortcut_draws(batch, cfg, generator)

    @classmethod
    def report_nfe(cls, sampling_cfg) -> list[int]:
        return [1, 2, 4]

    def _terms(self, model, x0, z, step, labels, generator, indices, dropout_seed, c, target=None) -> LossTerms:
        cfg = self.cfg
        teacher = model if target is None else target  # the EMA in eval mode when shortcut_targets is "ema"
        device, batch = x0.device, x0.shape[0]
        draws = shortcut_draws(batch, cfg, generator) if indices is None else check_draws(indices, batch, 2)
        t_cpu, d_cpu = draws[:, 0], draws[:, 1]
        boot_cpu = d_cpu > 1.5 / cfg.shortcut_max_steps  # self-consistency rows (flow matching: d = 1/M)
        t, d = t_cpu.to(device, x0.dtype), d_cpu.to(device, x0.dtype)
        xt = (1 - per_sample(t, x0)) * x0 + per_sample(t, x0) * z
        target = z - x0  # flow matching: the velocity
        seed = draw_seed(generator) if dropout_seed is None else check_seed(dropout_seed)
        rows = boot_cpu.nonzero().squeeze(1).to(device)
        if len(rows):
            lab = labels[rows.to(labels.device)] if labels is not None else None
            half = d[rows] / 2
            with torch.no_grad(), seeded_rng(seed + 1, device):
                u1 = teacher(xt[rows], t[rows], lab, half).to(x0.dtype)
                x_mid = xt[rows] - per_sample(half, u1) * u1
                u2 = teacher(x_mid, t[rows] - half, lab, half).to(x0.dtype)
            target = target.index_put((rows,), ((u1 + u2) / 2).detach())  # Shortcut eq. 5, no gradient
        with seeded_rng(seed, device):
            pred = model(xt, t, labels, d).to(x0.dtype)
        total = robust_loss("l2", pred, target, reduction="mean")
        boot = boot_cpu.to(device)
        zero = torch.zeros_like(total)
        n_boot = int(boot_cpu.sum())
        stats = {"mean_sigma": float(t_cpu.mean()), "diffusion_fraction": (batch - n_boot) / batch,
                 "mean_step": float(d_cpu[boot_cpu].mean()) if n_boot else 0.0}
        return LossTerms(torch.where(boot, total, zero), torch.where(boot, zero, total), total, stats,
                         flow_equivalent_sigma(t_cpu))
