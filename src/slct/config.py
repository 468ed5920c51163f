"""Typed training configuration, named presets and strict overrides.

A run's configuration is a tree of dataclasses. It is resolved in a fixed order, later layers winning:

    defaults <- --data-preset <- --preset (method) <- --config FILE <- --set key=value <- everyday flags

Presets are YAML files shipped in ``slct/presets/{method,data}/``; a preset may ``extends:`` another of its kind, so
each ablation row states only how it differs from its parent. Every override is strict: an unknown key or a value of
the wrong type is a ValueError that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import re

import yaml

from slct.objectives import OBJECTIVES, ObjectiveConfig
from slct.optimizers import OPTIMIZERS

FLOW_SOLVERS = ("map", "euler", "heun")  # sampling.flow_solver (slct.sampling.flow_ode_sample)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 and 2E+3 as floats (YAML 1.2), as researchers write learning rates."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def read_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


@dataclass
class DataConfig:
    path: str = ""  # latent dataset directory (from `slct encode`), "builtin:digits8" (8x8) or "builtin:digits" (16x16)
    normalization: str = "per-element"  # REFERENCE [7]: per-element | per-channel | scale | none
    scale: float | None = None  # the factor for normalization "scale" (e.g. 0.18215)
    hflip: bool = False  # random latent flips: only valid for pixel/identity codecs
    conditional: bool = False  # train class-conditional on the dataset's labels (the paper's models are unconditional)


@dataclass
class NetworkConfig:
    name: str = "unet-paper"  # a preset of slct.nn.NETWORK_PRESETS
    block_norm: str | None = None  # None: the preset's own (GroupNorm for UNets)
    out_norm: str | None = None
    dropout: float | None = None
    label_dropout: float | None = None
    # further build_network overrides (model_channels, channel_mult, ...); build_network checks the keys strictly
    options: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    # REFERENCE [8]: RAdam, lr 1e-4, weight decay 1e-4, no schedule, no clipping
    optimizer: str = "radam"  # radam (authors) | adam (EDM's recipe); slct.optimizers.OPTIMIZERS
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up (not in the authors' code: 0 keeps it off)
    # the same warm-up as a fraction of train.total_steps, so it fits any run length (EDM: 10 of 200 Mimg = 0.05);
    # the longer of the two applies
    warmup_fraction: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 = off (authors)
    accumulate: int = 1  # gradient-accumulation rounds per step (same global batch, less memory)
    # Beyond the authors' coupled decay on every tensor: RAdam's coupled decay adds weight_decay x w to the gradient,
    # so its pull is rescaled by the adaptive step and competes with the loss gradient (strongly for small losses);
    # decoupled decay shrinks w by lr x weight_decay per step whatever the loss (AdamW-style).
    decoupled_weight_decay: bool = False
    decay_norms_and_biases: bool = True  # False: no decay on normalisation layers' parameters and biases
    # Beyond the paper, for the consistency curriculum's jumps (docs/training.md "Stage jumps"): each jump of N makes
    # the Cauchy loss's gradient several times larger, while RAdam's second moment (beta2 = 0.999) remembers ~1,000
    # steps, so the first updates of a stage are larger than the learning rate says. Two remedies, off by default:
    stage_warmup_steps: int = 0  # the LR ramps up linearly again over this many steps after each curriculum stage start
    grad_scale_beta: float = 0.0  # > 0: the loss is divided by a running mean (this beta) of its gradient norm


@dataclass
class TrainConfig:
    total_steps: int = 295_313  # K; CelebA-HQ: 1400 epochs x 27,000 latents / batch 128
    batch_size: int = 128  # global batch, over all processes and accumulation rounds
    seed: int = 0
    ema_decays: list = field(default_factory=lambda: [0.9999, 0.99993])  # REFERENCE [8]; reported: 0.99993
    # EDM's ramp-up EMA (slct.ema.RampUp): half-life = ratio x images seen, at most ema_halflife_nimg; 0 = off.
    # It averages the latest ~5% of training whatever the run's length, so it is the default EMA (ema_default).
    ema_rampup_ratio: float = 0.05
    ema_halflife_nimg: float = 500_000.0
    ema_power_stds: list = field(default_factory=list)  # EDM2 power EMAs tracked, e.g. [0.05, 0.1] (slct ema)
    ema_power_every_steps: int = 0  # store the power EMAs every N steps in power-ema/ for `slct ema`; 0 = never
    # what snapshots, grids, periodic evaluation, sample and eval use unless told: "rampup", a decay, "std=0.05"
    ema_default: str | float = "rampup"
    precision: str = "fp32"  # fp32 (authors) | bf16 (autocast; norms and loss stay fp32)
    channels_last: bool = False
    compile: bool = False
    tf32: bool = True  # TF32 matmuls on Ampere+ GPUs; set by the train command, not at import
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    ot_scope: str = "local"  # local: OT per process on its own minibatch (authors) | global: on the global batch
    # batches (incl. OT coupling) prepared by a background thread while the device steps; 0 = inline in the step;
    # -1 = auto: 2 on a GPU, 0 on a CPU (there the thread only competes with the step for the same cores)
    prefetch_batches: int = -1
    max_bad_steps: int = 5  # consecutive non-finite steps before rolling back to the last checkpoint
    rollback_lr_factor: float = 0.5  # the LR is multiplied by this at each rollback
    max_rollbacks: int = 3  # rollbacks before a run whose steps stay non-finite stops (one line: step, last loss, hints)
    max_zero_grad_steps: int = 100  # a run whose gradient is exactly 0 this many steps in a row stops (0: never)
    # start from another run's default weights (a run directory, snapshot or checkpoint of the same network on the
    # same latents), e.g. consistency tuning from an ldm run; "" = a fresh initialisation (slct.training.warmstart)
    init: str = ""


@dataclass
class SamplingConfig:
    sigma_mid: float = 0.36931547703985584  # REFERENCE [9]: index 440 of the 641-point grid from sigma_max (LSUN: 0.5285640)
    ldm_solver: str = "heun"  # the ldm baseline's EDM sampler: heun | euler
    ldm_steps: int = 18  # EDM grid points; Heun uses 2 * steps - 1 network evaluations (fm: its default NFE too)
    # flow objectives: "map" = k jumps of the learnt flow map u(x, t, h = 1/k) (MeanFlow, Shortcut, SoFlow);
    # "euler" | "heun" = the ODE dx/dt = u(x, t, 0) of the instantaneous velocity at any NFE (fm: only these)
    flow_solver: str = "map"


@dataclass
class LoggingConfig:
    log_every_steps: int = 50  # metrics.jsonl and the progress bar's loss terms
    sample_every_steps: int = 5000  # 1- and 2-step sample grids from the EMA model; 0 = only at the end
    grid_size: int = 64  # images per sample grid (fixed seeds 0..grid_size-1)
    tensorboard: bool = False  # needs the "tensorboard" extra
    plot: bool = True  # training.png at the end of a run (and at a stop); ~1 s each, so sweeps of tiny runs may skip it
    eval_every_steps: int = 0  # FD (+ precision/recall) of the EMA model against logging.eval_reference; 0 = off
    eval_reference: str = ""  # reference statistics from `slct eval ref` (their extractor is used)
    eval_n: int = 1000  # samples per periodic evaluation (small: a trend, not the 50k protocol)


@dataclass
class CheckpointConfig:
    every_steps: int = 5000  # training-state checkpoints (for resuming)
    keep: int = 3  # newest checkpoints kept on disk
    snapshot_every_steps: int = 25_000  # EMA snapshots (for sampling and evaluation); the final one is always written


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preset: str = ""  # provenance: the presets this config was built from (informational)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        self.objective.validate()
        _check_choice("train.precision", self.train.precision, ("fp32", "bf16"))
        _check_choice("train.ot_scope", self.train.ot_scope, ("local", "global"))
        _check_choice("data.normalization", self.data.normalization, ("per-element", "per-channel", "scale", "none"))
        _check_choice("sampling.ldm_solver", self.sampling.ldm_solver, ("heun", "euler"))
        _check_choice("sampling.flow_solver", self.sampling.flow_solver, FLOW_SOLVERS)
        if self.sampling.flow_solver == "map" and not OBJECTIVES[self.objective.kind].flow_map:
            raise ValueError(f"objective {self.objective.kind!r} learns an instantaneous velocity, not a flow map: "
                             "sampling.flow_solver must be euler or heun")
        positive = {
            "train.total_steps": self.train.total_steps, "train.batch_size": self.train.batch_size,
            "optim.accumulate": self.optim.accumulate, "logging.log_every_steps": self.logging.log_every_steps,
            "checkpoint.every_steps": self.checkpoint.every_steps, "checkpoint.keep": self.checkpoint.keep,
            "sampling.ldm_steps": self.sampling.ldm_steps, "train.max_bad_steps": self.train.max_bad_steps,
        }
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        self._validate_optim()
        if self.train.max_zero_grad_steps < 0:
            raise ValueError(f"train.max_zero_grad_steps must be >= 0 (0: off), got {self.train.max_zero_grad_steps}")
        if self.train.max_rollbacks < 0 or not 0 < self.train.rollback_lr_factor <= 1:
            raise ValueError(f"train.max_rollbacks must be >= 0 and train.rollback_lr_factor in (0, 1], got "
                             f"{self.train.max_rollbacks} and {self.train.rollback_lr_factor}")
        if self.logging.eval_every_steps < 0 or self.logging.eval_n < 2:
            raise ValueError("logging.eval_every_steps must be >= 0 and logging.eval_n >= 2")
        if self.logging.eval_every_steps and not self.logging.eval_reference:
            raise ValueError("logging.eval_every_steps needs logging.eval_reference (a .npz from `slct eval ref`)")
        if self.train.prefetch_batches < -1:
            raise ValueError(f"train.prefetch_batches must be >= -1 (-1: auto, 0: inline), got "
                             f"{self.train.prefetch_batches}")
        if self.train.batch_size % self.optim.accumulate:
            raise ValueError(f"train.batch_size ({self.train.batch_size}) must be divisible by optim.accumulate "
                             f"({self.optim.accumulate})")
        if not 0 < self.sampling.sigma_mid < self.objective.sigma_max:
            raise ValueError(f"sampling.sigma_mid must lie in (0, sigma_max), got {self.sampling.sigma_mid}")
        for d in self.train.ema_decays:
            if not 0.0 <= float(d) < 1.0:
                raise ValueError(f"train.ema_decays entries must be in [0, 1), got {d}")
        from slct.ema import power_gamma, profiles_from_config

        for std in self.train.ema_power_stds:
            power_gamma(float(std))  # raises for an impossible width
        if self.train.ema_rampup_ratio < 0 or self.train.ema_halflife_nimg <= 0 or self.train.ema_power_every_steps < 0:
            raise ValueError("train.ema_rampup_ratio and train.ema_power_every_steps must be >= 0, "
                             "train.ema_halflife_nimg > 0")
        if isinstance(self.train.ema_default, float):  # --set train.ema_default=0.9999 reads as a number
            self.train.ema_default = str(self.train.ema_default)
        names = [p.name for p in profiles_from_config(self.train)]
        if not names:
            raise ValueError("no EMA tracked: set train.ema_decays, train.ema_rampup_ratio or train.ema_power_stds")
        if self.train.ema_default not in names:
            raise ValueError(f"train.ema_default {self.train.ema_default!r} is not a tracked EMA; tracked: "
                             f"{', '.join(names)}")
        if self.data.normalization == "scale" and self.data.scale is None:
            raise ValueError("data.normalization 'scale' needs data.scale (e.g. 0.18215)")


    def _validate_optim(self) -> None:
        o = self.optim
        finite = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        if not (finite(o.lr) and o.lr > 0):
            raise ValueError(f"optim.lr must be a finite number > 0 (the paper: 1e-4), got {o.lr}")
        for key, value in (("optim.weight_decay", o.weight_decay), ("optim.grad_clip", o.grad_clip)):
            if not (finite(value) and value >= 0):
                raise ValueError(f"{key} must be a finite number >= 0, got {value}")
        if not (finite(o.eps) and o.eps > 0):
            raise ValueError(f"optim.eps must be a finite number > 0, got {o.eps}")
        if len(o.betas) != 2 or not all(finite(b) and 0 <= b < 1 for b in o.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        _check_choice("optim.optimizer", o.optimizer, tuple(OPTIMIZERS))
        if not (finite(o.warmup_fraction) and 0 <= o.warmup_fraction <= 1):
            raise ValueError(f"optim.warmup_fraction must be in [0, 1] (EDM: 0.05), got {o.warmup_fraction}")
        if o.warmup_steps < 0 or o.stage_warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps and optim.stage_warmup_steps must be >= 0, got {o.warmup_steps} "
                             f"and {o.stage_warmup_steps}")
        if not (finite(o.grad_scale_beta) and 0 <= o.grad_scale_beta < 1):
            raise ValueError(f"optim.grad_scale_beta must be in [0, 1) (0: off), got {o.grad_scale_beta}")
        coupled_decay = o.weight_decay > 0 and not o.decoupled_weight_decay
        if o.grad_scale_beta > 0 and (o.grad_clip > 0 or coupled_decay):
            raise ValueError("optim.grad_scale_beta divides the gradients by their running norm, so optim.grad_clip "
                             "and coupled weight decay would act on the scaled gradients: with it, set "
                             "optim.grad_clip=0 and optim.decoupled_weight_decay=true (or optim.weight_decay=0)")


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Strict merging of plain dicts into the dataclass tree


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` checked against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def merge(obj: Any, updates: dict, prefix: str = "") -> None:
    """Merge a nested dict into a dataclass tree in place, strictly (unknown keys and wrong types are errors)."""
    if not isinstance(updates, dict):
        raise ValueError(f"{prefix or 'config'}: expected a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ValueError(f"unknown config key {full!r}; {prefix.rstrip('.') or 'top level'} allows: "
                             f"{', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            merge(current, value, prefix=f"{full}.")
        elif hints[key] is dict and isinstance(value, dict) and isinstance(current, dict):
            setattr(obj, key, {**current, **value})  # option dicts merge key by key across layers
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def parse_set(expr: str) -> dict:
    """``"objective.loss=cauchy"`` -> ``{"objective": {"loss": "cauchy"}}``; the value is read as YAML."""
    if "=" not in expr:
        raise ValueError(f"--set expects key.sub=value, got {expr!r}")
    key, raw = expr.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set: bad key {key!r}")
    value = read_yaml(raw) if raw.strip() else ""
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Presets


PRESET_KINDS = ("method", "data")


def _preset_dir(kind: str):
    return resources.files("slct") / "presets" / kind


def list_presets(kind: str) -> list[str]:
    """Names of the shipped presets of one kind ("method" or "data"); a name starting with ``_`` is a shared base
    that presets extend, not one to train with, and is not listed."""
    return sorted(p.name[:-5] for p in _preset_dir(kind).iterdir()
                  if p.name.endswith(".yaml") and not p.name.startswith("_"))


def load_preset(kind: str, name: str, _seen: tuple = ()) -> dict:
    """A preset as a nested dict, with its ``extends:`` chain applied (parents first)."""
    if kind not in PRESET_KINDS:
        raise ValueError(f"preset kind must be one of {PRESET_KINDS}, got {kind!r}")
    path = _preset_dir(kind) / f"{name}.yaml"
    if not path.is_file() or (name.startswith("_") and not _seen):  # a base only through extends:
        raise ValueError(f"unknown {kind} preset {name!r}; available: {', '.join(list_presets(kind))}")
    if name in _seen:
        raise ValueError(f"{kind} preset {name!r} extends itself (cycle: {' -> '.join((*_seen, name))})")
    body = read_yaml(path.read_text()) or {}
    body.pop("description", None)
    parent = body.pop("extends", None)
    base = load_preset(kind, parent, (*_seen, name)) if parent else {}
    return _deep_merge(base, body)


def preset_description(kind: str, name: str) -> str:
    body = read_yaml((_preset_dir(kind) / f"{name}.yaml").read_text()) or {}
    return str(body.get("description", "")).strip()


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    preset: str | None = "slct",
    data_preset: str | None = None,
    config_file: str | Path | None = None,
    sets: list[str] | tuple[str, ...] = (),
    overrides: dict | None = None,
) -> Config:
    """Resolve a config: defaults <- data preset <- method preset <- YAML file <- --set <- ``overrides``."""
    cfg = Config()
    layers: list[tuple[str, dict]] = []
    if data_preset:
        layers.append((f"data preset {data_preset!r}", load_preset("data", data_preset)))
    if preset:
        layers.append((f"method preset {preset!r}", load_preset("method", preset)))
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"--config: no such file {path}")
        layers.append((str(path), read_yaml(path.read_text()) or {}))
    layers.extend((f"--set {s}", parse_set(s)) for s in sets)
    if overrides:
        layers.append(("command-line flags", overrides))
    for source, layer in layers:
        try:
            merge(cfg, layer)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    cfg.preset = " x ".join(p for p in (preset, data_preset) if p)
    cfg.validate()
    return cfg


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config saved with ``to_dict`` (checkpoints, snapshots, config.yaml)."""
    cfg = Config()
    merge(cfg, d)
    return cfg
