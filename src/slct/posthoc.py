"""Post-hoc EMA (EDM2): reconstruct the EMA of any width from the power EMAs a run stored, as new snapshots.

A run that tracks ``train.ema_power_stds`` (e.g. [0.05, 0.1]) keeps them in every snapshot and, every
``train.ema_power_every_steps``, in ``power-ema/snapshot-*.pt``. ``reconstruct`` finds every stored (step, std) pair,
solves for the combination that best matches the wanted power profile (``slct.ema.posthoc_coefficients``: exact when
the wanted profile is in the span of the stored ones), and writes ``posthoc-ema/snapshot-STEP-stdS.pt``, which
`slct sample` and `slct eval` read like any snapshot. Files are memory-mapped and summed one at a time, so a
paper-size UNet needs no more memory than two copies of its weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slct import checkpoint
from slct.ema import posthoc_coefficients, power_gamma, power_profile


MAX_FIT_ERROR = 0.1  # relative L2 error of the reconstructed per-step weight profile beyond which nothing is written


def stored_power_emas(run_dir: str | Path) -> list[tuple[int, float, Path, str]]:
    """(step, std, file, EMA name) of every power EMA stored in the run's snapshots and ``power-ema/``."""
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("snapshot-*.pt")) + sorted((run_dir / "power-ema").glob("snapshot-*.pt"))
    found: dict[tuple[int, float], tuple[int, float, Path, str]] = {}
    for path in files:
        payload = checkpoint.load(path, expect=checkpoint.SNAPSHOT_FORMAT, mmap=True)
        for name in payload["ema"]:
            if name.startswith("std="):
                std = float(name[4:])
                found.setdefault((int(payload["step"]), std), (int(payload["step"]), std, path, name))
    return sorted(found.values())


def fit_error(stored: list[tuple[int, float]], target: tuple[int, float], x: np.ndarray) -> float:
    """Relative L2 mismatch between the reconstructed and the wanted per-step weight profiles (0: exact)."""
    length = max(target[0], *(t for t, _ in stored))
    wanted = power_profile(power_gamma(target[1]), target[0], length)
    got = sum(c * power_profile(power_gamma(s), t, length) for c, (t, s) in zip(x, stored))
    return float(np.linalg.norm(got - wanted) / np.linalg.norm(wanted))


def reconstruct(run_dir: str | Path, std: float, step: int | None = None, out_dir: str | Path | None = None,
                max_fit_error: float = MAX_FIT_ERROR) -> dict:
    """Write the snapshot of the power EMA of width ``std`` read at ``step`` (default: the latest stored step).

    Only snapshots up to ``step`` are used (an EMA read at step t cannot depend on later weights). A reconstruction
    whose weight profile misses the wanted one by more than ``max_fit_error`` (relative L2) is refused: its weights
    are not that EMA. Returns {"path", "step", "std", "sources", "fit_error"}.
    """
    run_dir = Path(run_dir)
    power_gamma(std)  # validates the width
    entries = stored_power_emas(run_dir)
    if not entries:
        raise FileNotFoundError(f"{run_dir} has no stored power EMAs: train with --set train.ema_power_stds=[0.05,0.1] "
                                "(and train.ema_power_every_steps=N for more than the snapshots' steps)")
    newest = max(e[0] for e in entries)
    step = newest if step is None else int(step)
    if step > newest:  # nothing stored knows the weights of the steps after the newest
        raise ValueError(f"--step {step} is past the newest stored power EMA (step {newest}); the EMA at a step is "
                         f"built from what was stored up to it: use --step {newest} or less")
    entries = [e for e in entries if e[0] <= step]
    if not entries:
        raise ValueError(f"no power EMA is stored at or before step {step}")
    stored = [(t, s) for t, s, _, _ in entries]
    x = posthoc_coefficients(stored, (step, std))
    total = None
    for c, (_, _, path, name) in zip(x, entries):
        state = checkpoint.load(path, expect=checkpoint.SNAPSHOT_FORMAT, mmap=True)["ema"][name]
        if total is None:
            total = {k: torch.zeros_like(v, dtype=torch.float64) if v.is_floating_point() else v.clone()
                     for k, v in state.items()}
        for k, v in state.items():
            if v.is_floating_point():
                total[k] += float(c) * v.double()
    error = fit_error(stored, (step, std), x)
    if error > max_fit_error:
        raise ValueError(f"the stored power EMAs cannot make std={std:g} at step {step}: the profile fit error is "
                         f"{error:.0%} (at most {max_fit_error:.0%} accepted); store them more often "
                         "(train.ema_power_every_steps), pick a step where one is stored, or a std between the stored "
                         "ones")
    template = checkpoint.load(entries[-1][2], expect=checkpoint.SNAPSHOT_FORMAT, mmap=True)
    name = f"std={std:g}"
    payload = {**template, "ema": {name: {k: v.float() if v.is_floating_point() else v for k, v in total.items()}},
               "ema_default": name, "step": step,
               "posthoc": {"std": std, "step": step, "fit_error": error,
                           "sources": [{"file": str(p.relative_to(run_dir)), "step": t, "std": s, "coefficient": float(c)}
                                       for c, (t, s, p, _) in zip(x, entries)]}}
    if step != template["step"]:
        payload["nimg"] = None  # images seen at ``step`` are not recorded in a snapshot of another step
    out_dir = Path(out_dir) if out_dir else run_dir / "posthoc-ema"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint.save_atomic(payload, out_dir / f"snapshot-{step:08d}-std{std:g}.pt",
                                  what=f"post-hoc EMA std={std:g} at step {step}")
    return {"path": path, "step": step, "std": std, "sources": len(entries), "fit_error": error}
