"""`slct demo`: the embedded default. Trains the sLCT recipe on built-in digits in minutes on a CPU, no downloads."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

HELP = "train the sLCT recipe on built-in digits for ~3 minutes on a CPU; writes sample grids, curves and a report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps (overrides --minutes)")
    p.add_argument("--minutes", type=float, default=3.0, help="training budget; the step count is calibrated to it")
    p.add_argument("--preset", default="slct", help="method preset to train: slct (default), or e.g. ilct, meanflow, shortcut (1- and 2-step samples are scored)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (as in slct train)")
    p.add_argument("--n-eval", type=int, default=1000, help="samples scored against the data")


def demo_config(steps: int, seed: int, device: str, sets=(), preset: str = "slct"):
    from slct.config import load_config

    return load_config(preset, "digits", sets=list(sets),
                       overrides={"train": {"total_steps": steps, "seed": seed, "device": device}})


def calibrate_steps(minutes: float, seed: int, device: str, sets=(), preset: str = "slct") -> tuple[int, float]:
    """Steps that fit in ``minutes``, from timing a few real training steps of the same config."""
    from slct.training import train

    probe_steps = 12
    cfg = demo_config(10_000, seed, device, sets, preset)
    cfg.logging.log_every_steps = probe_steps // 2
    cfg.logging.sample_every_steps = 0
    cfg.checkpoint.every_steps = 10_000
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, tmp, until_step=probe_steps, progress=False)
        rows = [json.loads(line) for line in open(Path(tmp) / "metrics.jsonl") if '"step"' in line]
    sec = rows[-1]["sec_per_step"]  # the second window: past start-up costs
    return max(50, int(minutes * 60 / sec)), sec


def run(args) -> int:
    from slct.training import train

    out = Path(args.out)
    saved = previous_steps(out)
    if saved is not None and args.steps is not None and args.steps != saved:
        raise ValueError(f"{out} holds a demo run of {saved} steps; drop --steps to continue or redo it, or use "
                         f"--out elsewhere for a {args.steps}-step run")
    if saved is not None:  # the same command again: continue (or just re-report) that run, whatever it was timed at
        steps = saved
        print(f"demo: continuing the {steps}-step run in {out} (--out elsewhere starts a new one)")
    elif args.steps is None:
        steps, sec = calibrate_steps(args.minutes, args.seed, args.device, args.sets, args.preset)
        print(f"demo: {sec * 1000:.0f} ms per step here -> {steps} steps for ~{args.minutes:g} minutes")
    else:
        steps = args.steps
    cfg = demo_config(steps, args.seed, args.device, args.sets, args.preset)
    # the step count is fixed at the start (the curriculum is a function of it): if the machine gets busier later,
    # the run takes longer than the estimate; it stops (with a checkpoint) at 3x the budget instead of running on
    limit = 3 * args.minutes if args.steps is None and saved is None else None
    result = train(cfg, out, resume="auto", max_minutes=limit)
    if result.stopped_by == "minutes":
        per_step = result.state.wall_seconds / max(result.state.step, 1)
        print(f"demo: stopped at step {result.state.step} of {steps} after {limit:g} minutes: the machine got slower "
              f"after the calibration ({per_step * 1000:.0f} ms per step now); `slct demo` again continues the run")
        return 0
    if not result.finished:
        return 130
    if args.steps is None and saved is None and result.state.wall_seconds > 1.5 * 60 * args.minutes:
        print(f"demo: training took {result.state.wall_seconds / 60:.1f} minutes, not ~{args.minutes:g}: the machine "
              "got busier after the step time was measured")
    # the run's own training time, summed over every session that trained it (a re-run that only re-reports a
    # finished run took seconds, not the training time)
    report = write_report(out, cfg, result.state.wall_seconds, args.n_eval)
    print(f"\nsample grids: {out / 'demo-nfe1.png'} and {out / 'demo-nfe2.png'} (training data: {out / 'demo-data.png'})")
    print(f"loss curve:   {out / 'training.png'}")
    print(f"report:       {report}")
    return 0


def previous_steps(out: Path) -> int | None:
    """The step count of a demo run already in ``out`` (its calibration is not repeated), or None."""
    from slct.checkpoint import latest_checkpoint
    from slct.config import read_yaml

    config = out / "config.yaml"
    if latest_checkpoint(out) is None or not config.is_file():
        return None
    return int((read_yaml(config.read_text()) or {}).get("train", {}).get("total_steps"))


def score(snapshot, n: int, nfes=(1, 2)) -> dict:
    """Frechet distance in pixel space (flattened 8x8 images) of samples at each of ``nfes`` (1 and 2 steps for the
    demo) to the built-in data, and of a Gaussian "noise baseline" with the data's per-pixel mean and variance (no
    learned structure) for comparison."""
    import warnings

    import numpy as np
    import torch

    from slct.data import LatentDataset
    from slct.eval import frechet_distance

    ds = LatentDataset(snapshot.config.data.path, normalization="none")
    real = torch.as_tensor(ds.get_batch(np.arange(len(ds)))[0]).flatten(1).double().numpy()
    mu, cov = real.mean(0), np.cov(real, rowvar=False)

    def fd(x):
        x = x.flatten(1).double().cpu().numpy()
        with warnings.catch_warnings():  # the digits' border pixels are always 0: singular covariances by design
            warnings.filterwarnings("ignore", "frechet_distance: the covariance product is singular")
            return float(frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu, cov))

    g = torch.Generator().manual_seed(1)
    noise = torch.randn(n, real.shape[1], generator=g, dtype=torch.float64) * torch.as_tensor(real.std(0)) \
        + torch.as_tensor(mu)
    out = {"n": n, "fd_noise_baseline": fd(noise.clamp(-1, 1))}
    seeds = list(range(10_000, 10_000 + n))
    for nfe in nfes:
        out[f"fd_nfe{nfe}"] = fd(snapshot.generate(seeds, nfe))
    return out


def write_report(out: Path, cfg, seconds: float, n_eval: int) -> Path:
    import numpy as np
    import torch

    from slct.data import LatentDataset
    from slct.images import save_grid
    from slct.sampling import load_snapshot

    snap = load_snapshot(out)
    seeds = list(range(100))
    for nfe in (1, 2):
        save_grid(snap.generate(seeds, nfe), out / f"demo-nfe{nfe}.png", nrow=10)
    ds = LatentDataset(cfg.data.path, normalization="none")
    real = torch.as_tensor(ds.get_batch(np.arange(100))[0])
    save_grid(real, out / "demo-data.png", nrow=10)
    scores = score(snap, n_eval)
    (out / "demo-scores.json").write_text(json.dumps(scores, indent=2))
    lines = [
        "# slct demo", "",
        f"The sLCT recipe (`--preset slct --data-preset digits`) trained for {cfg.train.total_steps} steps at batch "
        f"{cfg.train.batch_size} on scikit-learn's 8x8 digits (pixel space) in {seconds / 60:.1f} minutes of training.",
        "",
        "| samples | Frechet distance to the data (pixels, lower is better) |", "|---|---|",
        f"| 1 step | {scores['fd_nfe1']:.2f} |", f"| 2 steps | {scores['fd_nfe2']:.2f} |",
        f"| noise baseline (Gaussian with the data's per-pixel mean and variance) | {scores['fd_noise_baseline']:.2f} |",
        "", f"{scores['n']} samples each. Files: `demo-nfe1.png`, `demo-nfe2.png` (samples), `demo-data.png` (data), "
        "`training.png` (loss, c and N against the step), `metrics.jsonl`, `config.yaml`, snapshots and checkpoints.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[2:9]))
    return path
