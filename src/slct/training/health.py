"""Keeping a run alive: non-finite steps are skipped and, when they persist, rolled back (rundir.rollback); a run
that keeps diverging stops with one line of advice; SIGTERM/SIGINT stop at the end of the step with a checkpoint."""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass

import torch

from slct import checkpoint


class TrainingDiverged(RuntimeError):
    """Non-finite steps continued after train.max_rollbacks rollbacks; the run stopped (its checkpoints are finite)."""


class TrainingStalled(TrainingDiverged):
    """Every gradient was exactly zero for train.max_zero_grad_steps steps in a row: the run cannot learn."""


@dataclass
class Health:
    """Non-finite step bookkeeping of one train() call (the totals live in TrainState)."""

    consecutive_bad: int = 0
    last_finite_loss: float = float("nan")
    last_finite_step: int = -1
    checkpoint_due: bool = False  # a periodic checkpoint fell inside a streak of bad steps: write it at the next good one
    consecutive_zero: int = 0  # steps in a row whose gradient was exactly zero (a run that cannot learn)


class StopSignals:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the step and returns."""

    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def global_norm(tensors) -> torch.Tensor:
    """The L2 norm of all floating-point ``tensors`` together (float64; inf or nan when any entry is), no sync."""
    floats = [t for t in tensors if t is not None and t.is_floating_point() and t.numel()]
    if not floats:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(torch._foreach_norm(floats)).double().norm()


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global gradient norm (its finiteness decides whether a step is taken)."""
    return global_norm([p.grad for p in params])


def state_finite(model, optimizer, ema) -> bool:
    """Weights, optimizer moments and EMAs all finite: the condition for writing a checkpoint."""
    moments = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    shadows = [v for shadow in ema.shadows for v in shadow.values()]
    return bool(torch.isfinite(global_norm([*model.state_dict().values(), *moments, *shadows]).cpu()))


def stall_message(cfg, state, health: Health, loss: float) -> str:
    return (f"training stopped: the gradient was exactly zero for {health.consecutive_zero} steps in a row up to "
            f"step {state.step} (loss {loss:.4g}): nothing can be learnt with these settings. Check the objective's "
            f"weights and scales in config.yaml (e.g. an adaptive weight whose p or eps makes every weight 0), or "
            f"raise train.max_zero_grad_steps (now {cfg.train.max_zero_grad_steps}; 0 turns the check off)")


def divergence_message(run_dir, cfg, state, health: Health, lr: float) -> str:
    newest = checkpoint.latest_checkpoint(run_dir)
    last = (f"last finite loss {health.last_finite_loss:.4g} at step {health.last_finite_step}"
            if health.last_finite_step >= 0 else "no finite loss since the last rollback")
    return (f"training diverged: {health.consecutive_bad} consecutive non-finite steps up to step {state.step} after "
            f"{state.rollbacks} rollback(s) ({last}); the newest good checkpoint is "
            f"{newest.name if newest else 'none'}. Start a new run (another --out) with a lower optim.lr (the last "
            f"one used was {lr:.3g}), optim.grad_clip=1.0 or train.precision=fp32; or resume with more "
            f"train.max_rollbacks (now {cfg.train.max_rollbacks})")
