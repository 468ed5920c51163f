"""The parts a run is built from, each from its config section: the device, the latent dataset and the optimiser."""

from __future__ import annotations

from pathlib import Path

import torch

from slct.config import Config
from slct.optimizers import OPTIMIZERS


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but no CUDA device is available")
    return device


def open_dataset(cfg: Config):
    from slct.data import LatentDataset

    if not cfg.data.path:
        raise ValueError("no training data: pass --data DIR (a latent dataset from `slct encode`) or --data-preset")
    if not cfg.data.path.startswith("builtin:") and not Path(cfg.data.path).exists():
        raise FileNotFoundError(f"data path {cfg.data.path} does not exist (create it with `slct encode`)")
    if cfg.data.hflip and cfg.data.path and not cfg.data.path.startswith("builtin:"):
        codec = LatentDataset(cfg.data.path, normalization="none").codec_spec.get("name")
        if codec != "identity":
            raise ValueError(f"data.hflip flips latents, which is only valid in pixel space (identity codec); this "
                             f"dataset's codec is {codec!r}: store flipped copies with `slct encode --hflip-copies`")
    return LatentDataset(cfg.data.path, normalization=cfg.data.normalization, sigma_data=cfg.objective.sigma_data,
                         scale=cfg.data.scale, hflip=False)  # flips are drawn by the pipeline (deterministic)


def norm_and_bias_parameters(model: torch.nn.Module) -> set[int]:
    """``id``s of every normalisation layer's parameters (whatever their shape: the per-element norms' scales and
    shifts are (C, H, W)) and of every bias."""
    from slct.nn.norms import NORMS

    norm_types = (*NORMS.values(), torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.modules.batchnorm._NormBase,
                  torch.nn.RMSNorm)
    out = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, norm_types) or name == "bias" or name.endswith("_bias"):
                out.add(id(p))
    return out


def build_optimizer(optim_cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``optim.optimizer`` (RAdam, REFERENCE [8], or Adam) with the weight-decay options: coupled (authors) or decoupled, on every tensor
    (authors) or on the weights only (``decay_norms_and_biases=False``: none on normalisation layers' parameters,
    chosen by module type, and on biases)."""
    exempt = set() if optim_cfg.decay_norms_and_biases else norm_and_bias_parameters(model)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if id(p) in exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return OPTIMIZERS[optim_cfg.optimizer](groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                             decoupled_weight_decay=optim_cfg.decoupled_weight_decay)


def warmup_steps(optim_cfg, total_steps: int) -> int:
    """The run's linear LR warm-up in steps: the longer of ``optim.warmup_steps`` and ``optim.warmup_fraction`` of
    the run (EDM ramps up over 10 of its 200 Mimg: a fraction fits any run length)."""
    return max(optim_cfg.warmup_steps, round(optim_cfg.warmup_fraction * total_steps))


def learning_rate(optim_cfg, step: int, lr_scale: float = 1.0, stage_start: int = 0, total_steps: int = 0) -> float:
    """The learning rate of ``step``: ``optim.lr`` x the rollback factor x the linear warm-up (``warmup_steps``
    of a ``total_steps`` run), and with
    ``optim.stage_warmup_steps`` a linear warm-up again from each curriculum stage start (``stage_start``: the first
    step of the stage ``step`` is in; a stage start at 0 is the run's own warm-up). A pure function."""
    lr = optim_cfg.lr * lr_scale * min(1.0, (step + 1) / max(warmup_steps(optim_cfg, total_steps), 1))
    if optim_cfg.stage_warmup_steps and stage_start > 0:
        lr *= min(1.0, (step - stage_start + 1) / optim_cfg.stage_warmup_steps)
    return lr


def stage_start(cfg, step: int) -> int:
    """The first step of the consistency curriculum stage ``step`` is in; 0 for objectives without stages."""
    from slct.curriculum import stage_start_step
    from slct.objectives import uses_curriculum

    obj = cfg.objective
    if not uses_curriculum(obj):
        return 0
    return stage_start_step(step, cfg.train.total_steps, obj.s0, obj.s1, obj.min_stage_steps)


def adam_step_rms(optimizer: torch.optim.Optimizer) -> float:
    """The RMS over all parameters of Adam's bias-corrected step direction m_hat / (sqrt(v_hat) + eps): 1 when the
    gradients are steady, larger right after they grow (the second moment lags), the update's size relative to the
    learning rate (RAdam's rectification aside). NaN before the first step."""
    directions, count = [], 0
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st or "exp_avg" not in st:
                continue
            t = float(st["step"])
            m_hat = st["exp_avg"] / (1 - beta1 ** t)
            v_hat = st["exp_avg_sq"] / (1 - beta2 ** t)
            directions.append((m_hat / (v_hat.sqrt() + group["eps"])).square().sum())
            count += p.numel()
    if not directions:
        return float("nan")
    return float((torch.stack(directions).sum() / count).sqrt())
