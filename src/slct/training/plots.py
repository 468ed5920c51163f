"""training.png: the run's metrics against the step, one panel per quantity, curriculum stage starts marked."""

from __future__ import annotations

import json
import math
from pathlib import Path

from slct.training.bands import NOISE_BANDS

def plot_metrics(metrics_path: Path, out: Path, stage_starts: list[int] | None = None) -> Path | None:
    """One PNG (None for fewer than two logged steps): loss terms, loss and r/(2c^2) per noise band, gradient norm,
    c, N (and FD when evaluated) against the step, with the curriculum's stage starts (``stage_starts``) as dotted
    lines."""
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    rows = list({r["step"]: r for r in rows if "step" in r}.values())  # after a rollback the latest row of a step wins
    rows.sort(key=lambda r: r["step"])
    if len(rows) < 2:  # one logged step is no curve (a run shorter than logging.log_every_steps): metrics.jsonl has it
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    bands = [name for name, _, _ in NOISE_BANDS]
    panels = [("loss (rises with N: closer pairs, larger lambda; not divergence)", ("loss", "consistency", "diffusion"),
               True),
              ("loss per noise band (sigma)", tuple(f"loss_sigma_{b}" for b in bands), True),
              ("r / (2c^2), median per band (>> 1: Cauchy's log regime)", tuple(f"r2c2_p50_sigma_{b}" for b in bands),
               True),
              ("gradient norm", ("grad_norm",), True),
              ("Adam step size, RMS of m/sqrt(v) (1: steady; > 1 after a jump)", ("adam_step_rms",), True),
              ("c", ("c",), True), ("N", ("n_scales",), False)]
    panels = [p for p in panels if any(k in r for r in rows for k in p[1])]
    evals = [json.loads(line) for line in open(metrics_path) if '"eval_step"' in line]
    count = len(panels) + bool(evals)
    cols = min(count, 4)
    fig, axes = plt.subplots((count + cols - 1) // cols, cols, figsize=(4.4 * cols, 3.4 * ((count + cols - 1) // cols)),
                             squeeze=False)
    axes = list(axes.flat)
    if evals:  # periodic evaluation (logging.eval_every_steps): FD per NFE against the step
        ax = axes[len(panels)]
        for key in sorted({k for r in evals for k in r if k.startswith("fd_nfe")}):
            pts = [(r["eval_step"], r[key]) for r in evals if key in r]
            ax.plot(*zip(*pts), marker="o", label=key.replace("fd_nfe", "") + " NFE")
        ax.set_yscale("log")
        ax.set_title(f"FD ({evals[-1]['eval_n']} samples)")
        ax.legend()
    for ax, (title, keys, log) in zip(axes, panels):
        for k in keys:
            ys = [r.get(k) for r in rows]
            if any(y is not None and math.isfinite(y) and (y > 0 or not log) for y in ys):
                label = k.replace("loss_sigma_", "sigma ").replace("r2c2_p50_sigma_", "sigma ")
                ax.plot(steps, [y if y is not None else float("nan") for y in ys], label=label)
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in axes[:count]:
        ax.set_xlabel("step")
        for start in (stage_starts or [])[1:]:  # curriculum stage boundaries
            ax.axvline(start, color="grey", linestyle=":", linewidth=0.8)
    for ax in axes[count:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
