"""What every objective shares: the per-sample loss terms, the base class (call signature, input checks, the noise
draw and its coupling, [5]), the registry, and the randomness helpers through which every draw goes.

An objective is a stateless callable ``objective(model, x0, step, labels=None, noise=None, generator=None) ->
LossTerms``; ``model(x, sigma, class_labels=None)`` is the preconditioned network (e.g. ``PrecondModel(net,
objective.precond)``). Everything that depends on the training progress is a pure function of ``step``, and all
randomness comes from ``generator`` (or the global RNGs), so a run resumed with restored RNG states continues bit for
bit.

Adding an objective is one new module in this package (plus its preset): a subclass of :class:`Objective` decorated
with :func:`register_objective`, its config fields as a small dataclass with a ``validate_fields`` function; the
package imports every module it holds, and :class:`slct.objectives.ObjectiveConfig` gains the fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from slct.coupling import ot_coupling
from slct.losses import REDUCTIONS
from slct.precond import PRECOND_KINDS, Precond

# noise re-pairing: name -> (x0, noise) -> noise in the order matching x0 (REFERENCE.md [5])
COUPLINGS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ot": lambda x0, noise: noise[ot_coupling(x0, noise).to(noise.device)],
    "none": lambda x0, noise: noise,
}


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


# ---------------------------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class ObjectiveSpec:
    """One registered objective: its class, its config fields (a dataclass whose fields join ObjectiveConfig) and the
    function that validates them (``validate(cfg)`` raises ValueError naming the field)."""

    kind: str
    cls: type
    fields: type | None = None
    validate: Callable | None = None


# cfg.kind -> ObjectiveSpec, in registration order
REGISTRY: dict[str, ObjectiveSpec] = {}


def register_objective(kind: str, fields: type | None = None, validate: Callable | None = None):
    """Class decorator: ``@register_objective("meanflow", MeanFlowFields, validate_meanflow)``."""

    def add(cls):
        if kind in REGISTRY:
            raise ValueError(f"objective kind {kind!r} is registered twice ({REGISTRY[kind].cls.__name__}, "
                             f"{cls.__name__})")
        cls.kind = kind
        REGISTRY[kind] = ObjectiveSpec(kind, cls, fields, validate)
        return cls

    return add


# ---------------------------------------------------------------------------------------------------------------------
# The fields every objective reads


@dataclass
class SharedFields:
    """The noise levels, data scale and coupling every objective reads (``[n]`` = REFERENCE.md section)."""

    kind: str = "consistency"  # a key of slct.objectives.OBJECTIVES: consistency | edm | meanflow | shortcut | ...
    sigma_min: float = 0.002  # smallest noise level, the boundary f(x, sigma_min) = x [1]
    sigma_max: float = 80.0  # largest noise level [1]
    sigma_data: float = 0.5  # data std assumed by the preconditioning [1]
    rho: float = 7.0  # Karras grid curvature [1]
    loss_reduction: str = "mean"  # per-sample reduction of distances: "mean" over elements (code) | "sum" (paper) [3]
    coupling: str = "ot"  # "ot": minibatch OT re-pairing of data and noise | "none" [5]


def validate_shared(cfg) -> None:
    check_choice("kind", cfg.kind, REGISTRY)
    check_choice("loss_reduction", cfg.loss_reduction, REDUCTIONS)
    check_choice("coupling", cfg.coupling, COUPLINGS)
    check_positive("sigma_min", cfg.sigma_min)
    check_positive("sigma_max", cfg.sigma_max)
    if not cfg.sigma_max > cfg.sigma_min:
        raise ValueError(f"sigma_max must be > sigma_min ({cfg.sigma_min}), got {cfg.sigma_max}")
    for name in ("sigma_data", "rho"):
        check_positive(name, getattr(cfg, name))


# ---------------------------------------------------------------------------------------------------------------------
# Validation helpers (each raises ValueError naming the field and what is allowed)


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")


def check_finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_positive(name: str, value, allow_zero: bool = False) -> None:
    check_finite(name, value)
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


# the adaptive loss weight w = 1 / (err + eps)^p of MeanFlow and SoFlow (their p = 1, eps 1e-3 / 0.01): a large p or
# eps makes every weight underflow to 0 (loss and gradient exactly 0: a run that cannot learn)
ADAPTIVE_P_MAX, ADAPTIVE_EPS_MAX = 4.0, 100.0


def check_adaptive_weight(p_name: str, p, eps_name: str, eps) -> None:
    """The adaptive weight's p in [0, ADAPTIVE_P_MAX] and eps in (0, ADAPTIVE_EPS_MAX]: beyond them the weight
    underflows and nothing is learnt."""
    check_positive(p_name, p, allow_zero=True)
    check_positive(eps_name, eps)
    if p > ADAPTIVE_P_MAX or eps > ADAPTIVE_EPS_MAX:
        raise ValueError(f"{p_name} must be in [0, {ADAPTIVE_P_MAX:g}] and {eps_name} in (0, {ADAPTIVE_EPS_MAX:g}] "
                         f"(the papers: p = 1, eps <= 0.01), got {p!r} and {eps!r}: the weight 1 / (err + eps)^p "
                         "would underflow to 0 and nothing would be learnt")


def check_fraction(name: str, value) -> None:
    check_finite(name, value)
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Randomness helpers: every draw goes through `generator` (its device) or the global RNGs.


def randn(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Unit Gaussian float32 draw from ``generator`` (on its device), or from ``device``'s global RNG."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def rand(shape, generator: torch.Generator | None) -> torch.Tensor:
    """U[0, 1) float64 on the CPU from ``generator`` (or the global CPU RNG)."""
    if generator is None:
        return torch.rand(shape, dtype=torch.float64)
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64).cpu()


def draw_seed(generator: torch.Generator | None) -> int:
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (), generator=generator, device=device))


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device):
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


def active_dropout(model) -> bool:
    """Whether a forward pass of ``model`` draws dropout masks: a dropout module with p > 0 in training mode.

    Two passes under one seed (``seeded_rng``) share their masks only if they see the same batch shape, so an
    objective that runs its target pass on some rows must run it on all of them when this is true.
    """
    return isinstance(model, torch.nn.Module) and any(
        isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 and m.training for m in model.modules())


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"dropout_seed must be a non-negative integer, got {seed!r}")
    return seed


def check_draws(draws, batch: int, columns: int) -> torch.Tensor:
    """Pre-drawn per-sample times: a float tensor (batch, columns), returned as float64 on the CPU."""
    if not isinstance(draws, torch.Tensor) or not draws.is_floating_point() or draws.shape != (batch, columns):
        raise ValueError(f"pre-drawn times must be a float tensor of shape ({batch}, {columns}), got "
                         f"{getattr(draws, 'shape', draws)!r}")
    return draws.to("cpu", torch.float64)


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1), broadcastable against ``like``."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def _check_inputs(x0, labels, noise) -> None:
    if not isinstance(x0, torch.Tensor) or x0.ndim < 1 or x0.shape[0] < 1:
        raise ValueError(f"x0 must be a batch-first tensor (B, ...) with B >= 1, got {getattr(x0, 'shape', x0)!r}")
    if noise is not None and (not isinstance(noise, torch.Tensor) or noise.shape != x0.shape):
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {getattr(noise, 'shape', noise)!r}")
    batch = x0.shape[0]
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.ndim < 1 or labels.shape[0] != batch):
        raise ValueError(f"labels must have batch size {x0.shape[0]}, got {getattr(labels, 'shape', labels)!r}")


# ---------------------------------------------------------------------------------------------------------------------


class Objective:
    """What the objectives share: a private validated copy of the config, the preconditioning they
    train through, the call signature, the input checks and the noise draw (then coupled by
    ``cfg.coupling``, [5]) that comes before any other draw.

    A subclass sets ``precond_kind`` and implements ``_terms``; it may pre-draw its per-sample times for the
    global batch (``draw_times``) so that any number of processes trains on the same draws.
    """

    kind: str  # set by register_objective
    precond_kind: str  # Precond kind the network is trained through
    sync_gradients_manually = False  # True: the loop all-reduces gradients itself (forward-mode AD bypasses DDP)
    flow_map = True  # flow objectives: the network's u(x, t, h) is meaningful for h > 0 (False: flow matching)
    takes_ema_target = False  # True: _terms takes ema_target (the consistency objectives' objective.target_ema)

    def __init__(self, cfg, total_steps: int):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        self.cfg = dataclasses.replace(cfg).validate()  # private copy: the caller's config is never touched
        self.total_steps = total_steps
        self.precond = Precond(self.cfg.sigma_data, self.cfg.sigma_min, kind=self.precond_kind) \
            if self.precond_kind in PRECOND_KINDS else None  # flow objectives: slct.precond.FlowModel

    @staticmethod
    def draw_times(cfg, step: int, total_steps: int, batch: int, generator) -> torch.Tensor | None:
        """Per-sample times for a batch, as ``_terms`` would draw them (None: the objective draws its own)."""
        return None

    @property
    def target_weights(self) -> str | None:
        """Which weights make the targets when not the online model's: "ema" (the run's default EMA, in eval mode;
        the training loop then passes ``target_model``), or None."""
        return None

    @classmethod
    def report_nfe(cls, sampling_cfg) -> list[int]:
        """The step counts its samples are shown and evaluated at unless told (grids, `slct sample`, `slct eval`):
        1 and 2 for few-step models; for a denoiser (``precond_kind`` "edm") the EDM solver's network evaluations,
        2 x steps - 1 for Heun, steps for Euler."""
        if cls.precond_kind == "edm":
            steps = sampling_cfg.ldm_steps
            return [2 * steps - 1 if sampling_cfg.ldm_solver == "heun" else steps]
        return [1, 2]

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
        target_model: Callable[..., torch.Tensor] | None = None,
        ema_target: Callable[..., torch.Tensor] | None = None,
    ) -> LossTerms:
        """One loss evaluation; ``indices`` (int, ``(B,)``) and ``dropout_seed`` are optional
        pre-drawn randomness (see the class docstring); ``c`` overrides the c schedule (the
        training loop passes the measured c of ``c_schedule="calibrated"``); ``target_model``: the model
        that makes the targets when ``target_weights`` names one (the training loop passes its EMA copy);
        ``ema_target``: the consistency objectives' target network when ``objective.target_ema`` > 0."""
        _check_inputs(x0, labels, noise)
        x0 = x0.to(torch.promote_types(x0.dtype, torch.float32))
        if noise is None:
            noise = COUPLINGS[self.cfg.coupling](x0, randn(x0.shape, generator, x0.device))
        extra = {"ema_target": ema_target} if self.takes_ema_target else {}
        return self._terms(model, x0, noise.to(x0.dtype), step, labels, generator, indices, dropout_seed, c,
                           target_model, **extra)

    def _terms(self, model, x0, z, step, labels, generator, indices, dropout_seed, c, target=None) -> LossTerms:
        raise NotImplementedError


def flow_equivalent_sigma(t: torch.Tensor) -> torch.Tensor:
    """The VE noise level of flow time t: x_t / (1 - t) = x0 + t / (1 - t) e (for the per-noise-band logging of the
    flow objectives, whose path is x_t = (1 - t) x0 + t e)."""
    return t / (1 - t).clamp_min(0)
