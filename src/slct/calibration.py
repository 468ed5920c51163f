"""c measured instead of scheduled (``objective.c_schedule = "calibrated"``, beyond the paper): at the first step of
each curriculum stage, r is measured on a few batches without gradients and c set so that the chosen quantile of r
sits at the Cauchy loss's knee, r/(2c^2) = 1 (``slct.curriculum.calibrated_c``). The measured c of each stage is kept
in the training state, so checkpoints carry it and a resumed run uses the same c."""

from __future__ import annotations

import torch

from slct import distributed
from slct.coupling import ot_coupling
from slct.curriculum import CALIBRATED, calibrated_c, num_scales, sample_timestep_indices
from slct.objectives import uses_curriculum
from slct.losses import LOSSES
from slct.pipeline import step_seed


def bounds_of_c(obj, latent_shape) -> tuple[float, float]:
    """``objective.c_calibration_bounds`` are per element (the scale of c with loss_reduction "mean"); with "sum",
    r is the full squared norm, d times larger, so c's bounds are sqrt(d) times larger (as iCT's c0 = 0.00054 sqrt(d))."""
    lo, hi = obj.c_calibration_bounds
    if obj.loss_reduction == "sum":
        d = 1
        for side in latent_shape:
            d *= int(side)
        lo, hi = lo * d**0.5, hi * d**0.5
    return lo, hi


def stage_c(model, objective, dataset, cfg, state, device, dist, logger, target=None,
            ema_target=None) -> float | None:
    """The measured c of this step's curriculum stage, measured at the stage's first step and kept in
    ``state.c_table``; None unless ``c_schedule`` is "calibrated". ``target``: the model that makes the objective's
    targets when it is not the online one (distillation's teacher); ``ema_target``: the target network of
    ``objective.target_ema`` > 0."""
    obj = cfg.objective
    if not uses_curriculum(obj) or obj.c_schedule != CALIBRATED:
        return None
    n = num_scales(state.step, cfg.train.total_steps, obj.s0, obj.s1, obj.min_stage_steps)
    if str(n) not in state.c_table:
        c, count = measure_c(model, objective, dataset, cfg, state.step, device, dist, target, ema_target)
        state.c_table[str(n)] = c
        knee = LOSSES[obj.loss].knee
        lo, hi = bounds_of_c(obj, dataset.latent_shape)
        clamped = " (clamped to objective.c_calibration_bounds)" if c in (lo, hi) else ""
        logger.event(f"c calibrated at step {state.step} for N = {n}: {c:.4g}{clamped} (quantile "
                     f"{obj.c_calibration_quantile:g} of r over {count} pairs at r = {knee:g} c^2, the {obj.loss} "
                     "loss's knee)", state.step)
    return state.c_table[str(n)]


@torch.no_grad()
def measure_c(model, objective, dataset, cfg, step: int, device, dist, target=None,
              ema_target=None) -> tuple[float, int]:
    """Measure r on ``objective.c_calibration_batches`` batches (no gradients; drawn from their own seed stream, so
    the training batches are untouched) and return (calibrated c, number of pairs). Every rank measures its share
    of each global batch; the quantile is taken over all of them."""
    obj, batch = cfg.objective, cfg.train.batch_size
    n = num_scales(step, cfg.train.total_steps, obj.s0, obj.s1, obj.min_stage_steps)
    g = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, stream=2))
    lo, hi = dist.rank * batch // dist.world_size, (dist.rank + 1) * batch // dist.world_size
    rs = []
    for _ in range(obj.c_calibration_batches):
        chosen = torch.randint(len(dataset), (batch,), generator=g).numpy()
        noise = torch.randn((batch, *dataset.latent_shape), generator=g)[lo:hi]
        indices = sample_timestep_indices(n, batch, obj.p_mean, obj.p_std, generator=g, sigma_min=obj.sigma_min,
                                          sigma_max=obj.sigma_max, rho=obj.rho)[lo:hi]
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        x0, _ = dataset.get_batch(chosen[lo:hi])
        if obj.coupling == "ot":
            noise = noise[ot_coupling(x0, noise)]
        terms = objective(model, x0.to(device), step, noise=noise.to(device), indices=indices, dropout_seed=seed, c=1.0,
                          target_model=target, ema_target=ema_target)
        rs.append(terms.r.float().cpu())
    r = torch.cat([torch.as_tensor(part) for part in distributed.gather_objects(torch.cat(rs))])
    knee = LOSSES[obj.loss].knee
    return calibrated_c(r, obj.c_calibration_quantile, knee, bounds_of_c(obj, dataset.latent_shape)), len(r)
