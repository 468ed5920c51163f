"""Training objectives: sLCT's consistency objective, the EDM diffusion baseline (REFERENCE.md [2]-[5]; paper
section 4), and two newer few-step objectives on the same latents and networks: MeanFlow (Geng et al. 2025) and
Shortcut models (Frans et al. 2025), written from their papers.

An objective is a stateless callable ``objective(model, x0, step, labels=None, noise=None,
generator=None) -> LossTerms``; ``model(x, sigma, class_labels=None)`` is the preconditioned
network (e.g. ``PrecondModel(net, objective.precond)``). Everything that depends on the training
progress is a pure function of ``step``, and all randomness comes from ``generator`` (or the
global RNGs), so a run resumed with restored RNG states continues bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from slct.coupling import ot_coupling
from slct.curriculum import (C_SCHEDULES, CALIBRATED, c_schedule, diffusion_loss_mask, num_scales,
                             sample_timestep_indices)
from slct.losses import LOSSES, REDUCTIONS, robust_loss
from slct.precond import PRECOND_KINDS, Precond
from slct.sigmas import ct_weight, karras_sigmas

__all__ = [
    "ObjectiveConfig",
    "LossTerms",
    "ConsistencyObjective",
    "EDMObjective",
    "MeanFlowObjective",
    "ShortcutObjective",
    "OBJECTIVES",
    "COUPLINGS",
    "DIFFUSION_WEIGHTINGS",
    "build_objective",
]


# noise re-pairing: name -> (x0, noise) -> noise in the order matching x0 (REFERENCE.md [5])
COUPLINGS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ot": lambda x0, noise: noise[ot_coupling(x0, noise).to(noise.device)],
    "none": lambda x0, noise: noise,
}

# diffusion-loss weighting: name -> (sigma, sigma_data) -> per-sample weight (REFERENCE.md [4])
DIFFUSION_WEIGHTINGS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "edm": lambda sigma, sigma_data: 1 / sigma**2 + 1 / sigma_data**2,  # authors' code (EDM's lambda)
    "none": lambda sigma, sigma_data: torch.ones_like(sigma),  # paper eq. 9 as printed
}

# which pass the diffusion loss uses: the online one at t_{i+1}, or an extra one at t_i
DIFFUSION_SIGMAS: tuple[str, ...] = ("hi", "lo")

# how MeanFlow gets du/dt along the path
MEANFLOW_DERIVATIVES: tuple[str, ...] = ("jvp", "finite-difference")


@dataclass
class ObjectiveConfig:
    """Everything the training objective needs, one typed field per constant (``[n]`` = REFERENCE.md
    section). Defaults: the sLCT recipe; where paper and released code differ the default follows
    the code, except ``c_schedule`` (paper eq. 11). docs/method.md tabulates the variants."""

    kind: str = "consistency"  # "consistency" (sLCT / iCT) | "edm" (diffusion baseline) | "meanflow" | "shortcut"
    sigma_min: float = 0.002  # smallest noise level, the boundary f(x, sigma_min) = x [1]
    sigma_max: float = 80.0  # largest noise level [1]
    sigma_data: float = 0.5  # data std assumed by the preconditioning [1]
    rho: float = 7.0  # Karras grid curvature [1]
    p_mean: float = -1.1  # lognormal timestep distribution: mean of ln sigma [2]
    p_std: float = 2.0  # ... and its std [2]
    s0: int = 10  # curriculum: initial number of intervals, N = s0 + 1 (eq. 10) [2]
    s1: int = 640  # curriculum: final number of intervals (iCT's CIFAR-10: 1280) [2]
    min_stage_steps: int = 0  # curriculum stages last at least this long (fewer stages in short runs); 0 = eq. 10
    loss: str = "cauchy"  # robust distance, a key of slct.losses.LOSSES (eqs. 6-8) [3]
    loss_reduction: str = "mean"  # "mean" over elements (authors' code) | "sum" (paper/iCT) [3]
    c_schedule: str = "adaptive"  # "adaptive" (eq. 11) | "adaptive-code" | "fixed" (iCT) | "calibrated" [3]
    c_calibration_quantile: float = 0.5  # "calibrated": this quantile of r sits at the knee r/(2c^2) = 1
    c_calibration_batches: int = 4  # "calibrated": batches measured (no gradients) at each stage start
    c0: float | None = None  # iCT's fixed c; None -> 0.00054 sqrt(elements per sample) [3]
    diffusion_r: float = 0.25  # diffusion loss on the smallest-sigma fraction r of the grid; 0 = off [4]
    diffusion_weight: float = 5.0  # its weight w (authors' code: 5; paper form: 1) [4]
    diffusion_weighting: str = "edm"  # "edm": x (1/s^2 + 1/sd^2) (code) | "none" (paper) [4]
    diffusion_sigma: str = "hi"  # "hi": reuse the online pass at t_{i+1} (code) | "lo": extra pass at t_i (paper) [4]
    coupling: str = "ot"  # "ot": minibatch OT re-pairing of data and noise | "none" [5]
    edm_p_mean: float = -1.2  # kind "edm": EDM's training distribution, mean of ln sigma
    edm_p_std: float = 1.2  # kind "edm": ... and its std
    # kinds "meanflow" / "shortcut" (flow path x_t = (1 - t) x0 + t e, t = 1 noise; slct.precond.FlowModel)
    flow_t_mean: float = -0.4  # meanflow: logit-normal time sampler, mean of logit t (MeanFlow's ImageNet best)
    flow_t_std: float = 1.0  # ... and its std
    meanflow_r_fraction: float = 0.25  # meanflow: share of samples with r != t (the rest: r = t, flow matching)
    meanflow_p: float = 1.0  # meanflow: adaptive loss weight 1 / (||err||^2 + c)^p (p = 0: plain squared error)
    meanflow_c: float = 1e-3  # ... and its c
    meanflow_derivative: str = "jvp"  # "jvp": forward-mode torch.func.jvp | "finite-difference" (central, 2 passes)
    meanflow_fd_eps: float = 1e-3  # step of the finite difference along (dz, dt) = (v, 1)
    shortcut_max_steps: int = 128  # shortcut: M, the finest step 1/M (a power of 2); d in {1/M, ..., 1}
    shortcut_bootstrap: float = 0.25  # shortcut: share of the batch given self-consistency targets (the paper: 1/4)

    def validate(self) -> ObjectiveConfig:
        """Raise ValueError naming the first invalid field and its allowed values; return self."""
        _choice("kind", self.kind, OBJECTIVES)
        _choice("loss", self.loss, LOSSES)
        _choice("loss_reduction", self.loss_reduction, REDUCTIONS)
        _choice("c_schedule", self.c_schedule, {*C_SCHEDULES, CALIBRATED})
        if not 0 < self.c_calibration_quantile < 1 or self.c_calibration_batches < 1:
            raise ValueError("c_calibration_quantile must be in (0, 1) and c_calibration_batches >= 1")
        _choice("diffusion_weighting", self.diffusion_weighting, DIFFUSION_WEIGHTINGS)
        _choice("diffusion_sigma", self.diffusion_sigma, DIFFUSION_SIGMAS)
        _choice("coupling", self.coupling, COUPLINGS)
        _positive("sigma_min", self.sigma_min)
        _positive("sigma_max", self.sigma_max)
        if not self.sigma_max > self.sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min ({self.sigma_min}), got {self.sigma_max}")
        for name in ("sigma_data", "rho", "p_std", "diffusion_weight", "edm_p_std"):
            _positive(name, getattr(self, name), allow_zero=name == "diffusion_weight")
        for name in ("p_mean", "edm_p_mean", "flow_t_mean"):
            _finite(name, getattr(self, name))
        for name in ("flow_t_std", "meanflow_c", "meanflow_fd_eps"):
            _positive(name, getattr(self, name))
        _positive("meanflow_p", self.meanflow_p, allow_zero=True)
        for name in ("meanflow_r_fraction", "shortcut_bootstrap"):
            _finite(name, getattr(self, name))
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        _choice("meanflow_derivative", self.meanflow_derivative, MEANFLOW_DERIVATIVES)
        m = self.shortcut_max_steps
        if isinstance(m, bool) or not isinstance(m, int) or m < 2 or m & (m - 1):
            raise ValueError(f"shortcut_max_steps must be a power of 2 >= 2, got {m!r}")
        for name, minimum in (("s0", 1), ("s1", self.s0), ("min_stage_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if self.c0 is not None:
            _positive("c0", self.c0)
        _finite("diffusion_r", self.diffusion_r)
        if not 0 <= self.diffusion_r <= 1:
            raise ValueError(f"diffusion_r must be in [0, 1] (0 disables the diffusion loss), got {self.diffusion_r}")
        return self


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")


def _finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    _finite(name, value)
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass
class LossTerms:
    """Per-sample loss terms, each of shape ``(B,)``; ``total.mean()`` is the loss to backprop.

    ``total = consistency + diffusion``. ``stats`` holds plain floats for logging (computed
    without a device synchronisation): ``n_scales``, ``c``, ``mean_sigma`` (of the online pass),
    ``mean_weight`` (lambda), ``diffusion_fraction`` (share of the batch given the diffusion loss).
    """

    consistency: torch.Tensor
    diffusion: torch.Tensor
    total: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)
    # diagnostics, detached: each sample's noise level (of the online pass; CPU float64) and squared distance r of
    # the consistency pair (as the robust loss reduces it), for the per-noise-band logging
    sigma: torch.Tensor | None = None
    r: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# Randomness helpers: every draw goes through `generator` (its device) or the global RNGs.


def _randn(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Unit Gaussian float32 draw from ``generator`` (on its device), or from ``device``'s global RNG."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _draw_seed(generator: torch.Generator | None) -> int:
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (), generator=generator, device=device))


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device):
    """Run the block with the CPU RNG (and ``device``'s RNG) seeded by ``seed``, then restore them.

    Running both consistency passes under the same seed gives them the same dropout mask (iCT),
    and restoring leaves the global RNG streams independent of what the model draws.
    """
    accelerators = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices=accelerators, device_type=device.type):
        torch.default_generator.manual_seed(seed)
        if accelerators:
            module = torch.get_device_module(device.type)
            module.set_rng_state(torch.Generator(device=device).manual_seed(seed).get_state(), device)
        yield


def _check_inputs(x0, labels, noise) -> None:
    if not isinstance(x0, torch.Tensor) or x0.ndim < 1 or x0.shape[0] < 1:
        raise ValueError(f"x0 must be a batch-first tensor (B, ...) with B >= 1, got {getattr(x0, 'shape', x0)!r}")
    if noise is not None and (not isinstance(noise, torch.Tensor) or noise.shape != x0.shape):
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {getattr(noise, 'shape', noise)!r}")
    batch = x0.shape[0]
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.ndim < 1 or labels.shape[0] != batch):
        raise ValueError(f"labels must have batch size {x0.shape[0]}, got {getattr(labels, 'shape', labels)!r}")


def _check_indices(indices, batch: int, n_scales: int) -> torch.Tensor:
    """Validated lower indices as an int64 CPU tensor of shape (B,)."""
    integer = isinstance(indices, torch.Tensor) and not indices.dtype.is_floating_point and indices.dtype != torch.bool
    if not integer or indices.shape != (batch,):
        shape = getattr(indices, "shape", indices)
        raise ValueError(f"indices must be an integer tensor of shape ({batch},), got {shape!r}")
    index = indices.to("cpu", torch.int64)
    if batch and not (0 <= int(index.min()) and int(index.max()) <= n_scales - 2):
        raise ValueError(f"indices must lie in [0, {n_scales - 2}] for N = {n_scales} grid points")
    return index


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"dropout_seed must be a non-negative integer, got {seed!r}")
    return seed


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1), broadcastable against ``like``."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


# ---------------------------------------------------------------------------------------------


class _Objective:
    """What the objectives share: a private validated copy of the config, the preconditioning they
    train through, the call signature, the input checks and the noise draw (then coupled by
    ``cfg.coupling``, [5]) that comes before any other draw."""

    precond_kind: str  # Precond kind the network is trained through

    def __init__(self, cfg: ObjectiveConfig, total_steps: int):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        self.cfg = dataclasses.replace(cfg).validate()  # private copy: the caller's config is never touched
        self.total_steps = total_steps
        self.precond = Precond(self.cfg.sigma_data, self.cfg.sigma_min, kind=self.precond_kind) \
            if self.precond_kind in PRECOND_KINDS else None  # flow objectives: slct.precond.FlowModel

    def __call__(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        step: int,
        labels: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        indices: torch.Tensor | None = None,
        dropout_seed: int | None = None,
        c: float | None = None,
    ) -> LossTerms:
        """One loss evaluation; ``indices`` (int, ``(B,)``) and ``dropout_seed`` are optional
        pre-drawn randomness (see the class docstring); ``c`` overrides the c schedule (the
        training loop passes the measured c of ``c_schedule="calibrated"``)."""
        _check_inputs(x0, labels, noise)
        x0 = x0.to(torch.promote_types(x0.dtype, torch.float32))
        if noise is None:
            noise = COUPLINGS[self.cfg.coupling](x0, _randn(x0.shape, generator, x0.device))
        return self._terms(model, x0, noise.to(x0.dtype), step, labels, generator, indices, dropout_seed, c)

    def _terms(self, model, x0, z, step, labels, generator, indices, dropout_seed, c) -> LossTerms:
        raise NotImplementedError


class ConsistencyObjective(_Objective):
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

    def _terms(self, model, x0, z, step, labels, generator, indices, dropout_seed, c) -> LossTerms:
        """``indices``: lower indices in ``[0, N - 2]``."""
        cfg = self.cfg
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
        index = _check_indices(indices, batch, n_scales)
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

        seed = _draw_seed(generator) if dropout_seed is None else _check_seed(dropout_seed)
        with _seeded_rng(seed, device):
            online = model(x0 + _per_sample(sigma_hi, x0) * z, sigma_hi, labels)
        with torch.no_grad(), _seeded_rng(seed, device):
            target = model(x0 + _per_sample(sigma_lo, x0) * z, sigma_lo, labels)
        online = online.to(x0.dtype)
        target = target.detach().to(x0.dtype)
        consistency = weight * robust_loss(cfg.loss, online, target, c, cfg.loss_reduction)
        r = robust_loss("l2", online.detach(), target, reduction=cfg.loss_reduction)  # the r of eqs. 6-8

        diffusion = torch.zeros_like(consistency)
        if n_selected > 0 and cfg.diffusion_weight > 0:
            rows = selected.nonzero().squeeze(1).to(device)
            term = self._diffusion_term(model, x0, z, labels, rows, online, sigma_lo, sigma_hi, seed)
            diffusion = diffusion.index_put((rows,), cfg.diffusion_weight * term * (batch / n_selected))
        return LossTerms(consistency, diffusion, consistency + diffusion, stats, sigmas[index + 1], r)

    def _diffusion_term(self, model, x0, z, labels, rows, online, sigma_lo, sigma_hi, seed) -> torch.Tensor:
        """``weighting * mse`` of the selected ``rows``, shape ``(len(rows),)`` (eq. 9, [4])."""
        cfg = self.cfg
        if cfg.diffusion_sigma == "hi":  # authors' code: the online pass at t_{i+1}, no extra cost
            pred, sigma = online[rows], sigma_hi[rows]
        else:  # paper eq. 9 as printed: f(x_{t_i}, t_i), one extra online pass on the selected rows
            sigma = sigma_lo[rows]
            sub_labels = labels[rows.to(labels.device)] if labels is not None else None
            with _seeded_rng(seed, x0.device):
                pred = model(x0[rows] + _per_sample(sigma, x0) * z[rows], sigma, sub_labels).to(x0.dtype)
        mse = robust_loss("l2", pred, x0[rows], reduction=cfg.loss_reduction)
        return DIFFUSION_WEIGHTINGS[cfg.diffusion_weighting](sigma, cfg.sigma_data) * mse


class EDMObjective(_Objective):
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

    def _terms(self, model, x0, z, step, labels, generator, indices, dropout_seed, c) -> LossTerms:
        cfg = self.cfg
        if indices is not None:
            raise ValueError("indices must be None for the EDM objective (it draws continuous sigmas)")
        device, batch = x0.device, x0.shape[0]
        # Karras et al. 2022, Table 1: ln sigma ~ N(P_mean, P_std^2), lambda = (s^2 + sd^2) / (s sd)^2
        sigma = (_randn((batch,), generator, torch.device("cpu")).double() * cfg.edm_p_std + cfg.edm_p_mean).exp()
        weight = (sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data) ** 2
        stats = {"mean_sigma": float(sigma.mean()), "mean_weight": float(weight.mean()), "diffusion_fraction": 1.0}
        sigma_cpu = sigma
        sigma, weight = sigma.to(device, x0.dtype), weight.to(device, x0.dtype)
        seeded = dropout_seed is not None
        with _seeded_rng(_check_seed(dropout_seed), device) if seeded else contextlib.nullcontext():
            denoised = model(x0 + _per_sample(sigma, x0) * z, sigma, labels).to(x0.dtype)
        total = weight * robust_loss("l2", denoised, x0, reduction=cfg.loss_reduction)
        return LossTerms(torch.zeros_like(total), total, total, stats, sigma_cpu)


def flow_equivalent_sigma(t: torch.Tensor) -> torch.Tensor:
    """The VE noise level of flow time t: x_t / (1 - t) = x0 + t / (1 - t) e (for the per-noise-band logging)."""
    return t / (1 - t).clamp_min(0)


def logit_normal(shape, mean: float, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """t = sigmoid(N(mean, std^2)), float64 on the CPU (MeanFlow's time sampler)."""
    return torch.sigmoid(_randn(shape, generator, torch.device("cpu")).double() * std + mean)


def _rand(shape, generator: torch.Generator | None) -> torch.Tensor:
    """U[0, 1) float64 on the CPU from ``generator`` (or the global CPU RNG)."""
    if generator is None:
        return torch.rand(shape, dtype=torch.float64)
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64).cpu()


def meanflow_times(batch: int, cfg: ObjectiveConfig, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, r), t >= r: two logit-normal draws sorted; a fraction 1 - meanflow_r_fraction gets r = t (MeanFlow 4.3)."""
    a = logit_normal((batch,), cfg.flow_t_mean, cfg.flow_t_std, generator)
    b = logit_normal((batch,), cfg.flow_t_mean, cfg.flow_t_std, generator)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    keep = _rand((batch,), generator) < cfg.meanflow_r_fraction
    return t, torch.where(keep, r, t)


class MeanFlowObjective(_Objective):
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

    def _terms(self, model, x0, z, step, labels, generator, indices, dropout_seed, c) -> LossTerms:
        cfg = self.cfg
        device, batch = x0.device, x0.shape[0]
        draws = meanflow_draws(batch, cfg, generator) if indices is None else _check_draws(indices, batch, 2)
        t_cpu, r_cpu = draws[:, 0], draws[:, 1]
        t, h = t_cpu.to(device, x0.dtype), (t_cpu - r_cpu).to(device, x0.dtype)
        zt = (1 - _per_sample(t, x0)) * x0 + _per_sample(t, x0) * z  # MeanFlow eq. 1
        v = z - x0

        def u_fn(zz, tt, hh):
            return model(zz, tt, labels, hh)

        seed = _draw_seed(generator) if dropout_seed is None else _check_seed(dropout_seed)
        ones = torch.ones_like(t)
        with _seeded_rng(seed, device):
            if cfg.meanflow_derivative == "jvp":
                u, dudt = torch.func.jvp(u_fn, (zt, t, h), (v, ones, ones))  # total derivative along (v, 1, 1)
            else:
                u = u_fn(zt, t, h)
        if cfg.meanflow_derivative == "finite-difference":
            eps = cfg.meanflow_fd_eps
            with torch.no_grad(), _seeded_rng(seed, device):
                ahead = u_fn(zt + eps * v, t + eps, h + eps)
            with torch.no_grad(), _seeded_rng(seed, device):
                behind = u_fn(zt - eps * v, t - eps, h - eps)
            dudt = (ahead - behind) / (2 * eps)
        u = u.to(x0.dtype)
        target = (v - _per_sample(h, x0) * dudt.to(x0.dtype)).detach()  # MeanFlow eq. 6, stop-gradient
        sq = (u - target).pow(2).flatten(1).sum(1)  # ||u - u_tgt||^2 per sample
        weight = 1 / (sq.detach() + cfg.meanflow_c) ** cfg.meanflow_p  # adaptive weight, sg
        total = weight * sq
        instantaneous = (t_cpu == r_cpu).to(device)
        # the weighted loss is sq / (sq + c) ~ 1 whenever sq >> c: the unweighted error is what shows progress
        mean_weight, mse = torch.stack([weight.detach().mean(), sq.detach().mean() / x0[0].numel()]).tolist()
        stats = {"mean_sigma": float(t_cpu.mean()), "mean_weight": mean_weight, "mse": mse,  # one device sync
                 "diffusion_fraction": float((t_cpu == r_cpu).double().mean()), "mean_interval": float((t_cpu - r_cpu).mean())}
        zero = torch.zeros_like(total)
        return LossTerms(torch.where(instantaneous, zero, total), torch.where(instantaneous, total, zero), total,
                         stats, flow_equivalent_sigma(t_cpu))


def shortcut_draws(batch: int, cfg: ObjectiveConfig, generator) -> torch.Tensor:
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
    t_boot = (torch.floor(_rand((n_boot,), generator) * sections) + 1) / sections  # {d, 2d, ..., 1}
    n_flow = batch - n_boot
    t_flow = (torch.floor(_rand((n_flow,), generator) * m) + 1) / m  # {1/M, ..., 1}
    d = torch.cat([d_boot, torch.full((n_flow,), 1 / m, dtype=torch.float64)])
    return torch.stack([torch.cat([t_boot, t_flow]), d], dim=1)


def meanflow_draws(batch: int, cfg: ObjectiveConfig, generator) -> torch.Tensor:
    """(B, 2) float64 rows (t, r) (:func:`meanflow_times`)."""
    return torch.stack(meanflow_times(batch, cfg, generator), dim=1)


def _check_draws(draws, batch: int, columns: int) -> torch.Tensor:
    if not isinstance(draws, torch.Tensor) or not draws.is_floating_point() or draws.shape != (batch, columns):
        raise ValueError(f"pre-drawn times must be a float tensor of shape ({batch}, {columns}), got "
                         f"{getattr(draws, 'shape', draws)!r}")
    return draws.to("cpu", torch.float64)


class ShortcutObjective(_Objective):
    """Shortcut models (Frans et al. 2025): one network u(x_t, t, d) that steps from t to t - d, trained with flow
    matching at the finest step and self-consistency across step sizes (their eq. 5):
    ``u(x_t, t, 2d) = (u(x_t, t, d) + u(x_t - d u(x_t, t, d), t - d, d)) / 2``, the right side under no_grad.

    Draws: :func:`shortcut_draws` (or pre-drawn (t, d) rows as ``indices``); ``x_t = (1 - t) x0 + t e``. Flow-matching rows regress ``v = e - x0``; bootstrap
    rows (step d, target from two d/2 steps of the same online model, no gradient) regress the average of the two.
    Per-sample loss: mean squared error over elements; flow matching is reported as ``diffusion``, bootstrap as
    ``consistency``. RNG draws per call: noise (unless given), times, one dropout seed (unless given).
    """

    precond_kind = "flow"

    def _terms(self, model, x0, z, step, labels, generator, indices, dropout_seed, c) -> LossTerms:
        cfg = self.cfg
        device, batch = x0.device, x0.shape[0]
        draws = shortcut_draws(batch, cfg, generator) if indices is None else _check_draws(indices, batch, 2)
        t_cpu, d_cpu = draws[:, 0], draws[:, 1]
        boot_cpu = d_cpu > 1.5 / cfg.shortcut_max_steps  # self-consistency rows (flow matching: d = 1/M)
        t, d = t_cpu.to(device, x0.dtype), d_cpu.to(device, x0.dtype)
        xt = (1 - _per_sample(t, x0)) * x0 + _per_sample(t, x0) * z
        target = z - x0  # flow matching: the velocity
        seed = _draw_seed(generator) if dropout_seed is None else _check_seed(dropout_seed)
        rows = boot_cpu.nonzero().squeeze(1).to(device)
        if len(rows):
            lab = labels[rows.to(labels.device)] if labels is not None else None
            half = d[rows] / 2
            with torch.no_grad(), _seeded_rng(seed + 1, device):
                u1 = model(xt[rows], t[rows], lab, half).to(x0.dtype)
                x_mid = xt[rows] - _per_sample(half, u1) * u1
                u2 = model(x_mid, t[rows] - half, lab, half).to(x0.dtype)
            target = target.index_put((rows,), ((u1 + u2) / 2).detach())  # Shortcut eq. 5, no gradient
        with _seeded_rng(seed, device):
            pred = model(xt, t, labels, d).to(x0.dtype)
        total = robust_loss("l2", pred, target, reduction="mean")
        boot = boot_cpu.to(device)
        zero = torch.zeros_like(total)
        n_boot = int(boot_cpu.sum())
        stats = {"mean_sigma": float(t_cpu.mean()), "diffusion_fraction": (batch - n_boot) / batch,
                 "mean_step": float(d_cpu[boot_cpu].mean()) if n_boot else 0.0}
        return LossTerms(torch.where(boot, total, zero), torch.where(boot, zero, total), total, stats,
                         flow_equivalent_sigma(t_cpu))


def draw_times(cfg: ObjectiveConfig, step: int, total_steps: int, batch: int, generator) -> torch.Tensor | None:
    """Per-sample times for a batch, drawn as the objective of ``cfg.kind`` would (the batch pipeline pre-draws them
    for the global batch so that any number of processes trains on the same draws): consistency: lower grid indices
    (B,); meanflow: (t, r) rows; shortcut: (t, d) rows; edm: None (it draws its sigmas itself)."""
    if cfg.kind == "consistency":
        n = num_scales(step, total_steps, cfg.s0, cfg.s1, cfg.min_stage_steps)
        return sample_timestep_indices(n, batch, cfg.p_mean, cfg.p_std, generator=generator,
                                       sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, rho=cfg.rho)
    draw = TIME_DRAWS.get(cfg.kind)
    return None if draw is None else draw(batch, cfg, generator)


# kind -> (batch, cfg, generator) -> pre-drawn per-sample times, for the kinds that take them as ``indices``
TIME_DRAWS: dict[str, Callable] = {"meanflow": meanflow_draws, "shortcut": shortcut_draws}


# cfg.kind -> objective class
OBJECTIVES: dict[str, type] = {"consistency": ConsistencyObjective, "edm": EDMObjective,
                               "meanflow": MeanFlowObjective, "shortcut": ShortcutObjective}


def build_objective(cfg: ObjectiveConfig, total_steps: int):
    """The objective for ``cfg.kind`` (a key of :data:`OBJECTIVES`)."""
    _choice("kind", cfg.kind, OBJECTIVES)
    return OBJECTIVES[cfg.kind](cfg, total_steps)
