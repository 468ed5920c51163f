"""Training objectives, one module each: sLCT's consistency objective and the EDM diffusion baseline (REFERENCE.md
[2]-[5]; paper section 4), and the newer few-step objectives on the same latents and networks, MeanFlow (Geng et al.
2025) and Shortcut models (Frans et al. 2025), written from their papers.

``slct.objectives.base`` holds what they share and the registry. This package imports every module it holds, so a
new objective is one new file (a registered :class:`~slct.objectives.base.Objective` subclass with its fields) plus
its preset. :class:`ObjectiveConfig` is the shared fields followed by every registered objective's fields, in one
flat namespace, as configs and presets spell them (``objective.meanflow_p``); each group is validated by the module
that defines it.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing

import torch

from slct.objectives.base import (COUPLINGS, REGISTRY, LossTerms, Objective, SharedFields, check_choice,
                                  flow_equivalent_sigma, register_objective, validate_shared)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base" and not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")

from slct.objectives.consistency import DIFFUSION_SIGMAS, DIFFUSION_WEIGHTINGS, ConsistencyObjective  # noqa: E402
from slct.objectives.edm import EDMObjective  # noqa: E402
from slct.objectives.meanflow import (MEANFLOW_DERIVATIVES, MeanFlowObjective, logit_normal,  # noqa: E402
                                      meanflow_draws, meanflow_times)
from slct.objectives.shortcut import ShortcutObjective, shortcut_draws  # noqa: E402

__all__ = [
    "ObjectiveConfig",
    "LossTerms",
    "Objective",
    "ConsistencyObjective",
    "EDMObjective",
    "MeanFlowObjective",
    "ShortcutObjective",
    "OBJECTIVES",
    "COUPLINGS",
    "DIFFUSION_WEIGHTINGS",
    "register_objective",
    "build_objective",
    "draw_times",
    "parameterisation",
    "is_flow",
    "uses_curriculum",
    # kept importable from here as before the split into modules
    "DIFFUSION_SIGMAS",
    "MEANFLOW_DERIVATIVES",
    "flow_equivalent_sigma",
    "logit_normal",
    "meanflow_draws",
    "meanflow_times",
    "shortcut_draws",
]

# cfg.kind -> objective class
OBJECTIVES: dict[str, type] = {kind: spec.cls for kind, spec in REGISTRY.items()}


def parameterisation(kind: str) -> str:
    """How an objective of ``kind`` wraps its network: "consistency" or "edm" (a ``slct.precond.Precond`` of that
    kind) or "flow" (``slct.precond.FlowModel``: MeanFlow, Shortcut, SoFlow, fm, whose network predicts a velocity
    and takes a second time input). Each objective class declares it (``precond_kind``)."""
    if kind not in OBJECTIVES:
        raise ValueError(f"unknown objective kind {kind!r}; known: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[kind].precond_kind


def is_flow(kind: str) -> bool:
    """An objective trained in the flow parameterisation (see :func:`parameterisation`)."""
    return parameterisation(kind) == "flow"


def uses_curriculum(objective_cfg) -> bool:
    """Whether the objective walks eq. 10's discretisation curriculum (every consistency-parameterised objective:
    consistency training and distillation)."""
    return parameterisation(objective_cfg.kind) == "consistency"


def _validate(self):
    """Raise ValueError naming the first invalid field and its allowed values; return self."""
    validate_shared(self)
    for spec in REGISTRY.values():
        if spec.validate is not None:
            spec.validate(self)
    return self


def _compose_config() -> type:
    groups = [SharedFields, *(spec.fields for spec in REGISTRY.values() if spec.fields is not None)]
    fields, owner = [], {}
    for group in groups:
        hints = typing.get_type_hints(group)
        for f in dataclasses.fields(group):
            if f.name in owner:
                raise TypeError(f"objective field {f.name!r} is declared by both {owner[f.name]} and {group.__name__}")
            owner[f.name] = group.__name__
            default = (dataclasses.field(default=f.default) if f.default is not dataclasses.MISSING
                       else dataclasses.field(default_factory=f.default_factory))
            fields.append((f.name, hints[f.name], default))
    doc = ("Everything the training objectives need, one typed field per constant: the shared fields "
           f"({SharedFields.__name__}) and each objective's ({', '.join(g.__name__ for g in groups[1:])}). Defaults: "
           "the sLCT recipe; where paper and released code differ the default follows the code, except c_schedule "
           "(paper eq. 11). docs/method.md tabulates the variants.")
    cls = dataclasses.make_dataclass("ObjectiveConfig", fields, namespace={"validate": _validate, "__doc__": doc})
    cls.__module__ = __name__  # found by pickle and named in reprs as slct.objectives.ObjectiveConfig
    return cls


ObjectiveConfig = _compose_config()


def draw_times(cfg, step: int, total_steps: int, batch: int, generator) -> torch.Tensor | None:
    """Per-sample times for a batch, drawn as the objective of ``cfg.kind`` would (the batch pipeline pre-draws them
    for the global batch so that any number of processes trains on the same draws): consistency: lower grid indices
    (B,); meanflow: (t, r) rows; shortcut: (t, d) rows; edm: None (it draws its sigmas itself)."""
    return OBJECTIVES[cfg.kind].draw_times(cfg, step, total_steps, batch, generator)


def build_objective(cfg, total_steps: int) -> Objective:
    """The objective for ``cfg.kind`` (a key of :data:`OBJECTIVES`)."""
    check_choice("kind", cfg.kind, OBJECTIVES)
    return OBJECTIVES[cfg.kind](cfg, total_steps)
