"""What a checkpoint restores besides weights: the training counters and the global RNG states."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class TrainState:
    step: int = 0
    nimg: int = 0
    lr_scale: float = 1.0  # lowered at each rollback after repeated non-finite steps
    bad_steps: int = 0  # non-finite steps skipped in total
    rollbacks: int = 0
    wall_seconds: float = 0.0
    c_table: dict = field(default_factory=dict)  # c_schedule "calibrated": str(N) -> c measured at the stage start
    grad_scale: float = 0.0  # optim.grad_scale_beta > 0: running mean of the loss's gradient norm (0: none yet)

    def to_dict(self) -> dict:
        return dict(vars(self))


def rng_state() -> dict:
    """The global RNG states as tensors and plain values only, so checkpoints load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
