"""The paper's ablation (Table 2a) on real faces at CPU scale: UTKFace 64 px, TAEF2 latents, FD-MobileNetV2.

    python benchmarks/ablation.py                                   # ilct, slct, ldm; every stage; resumable
    python benchmarks/ablation.py --methods ladder                  # the whole Table 2a ladder + ldm
    python benchmarks/ablation.py --stage train --minutes 9         # one 9-minute slice of training, then stop
    python benchmarks/ablation.py --stage report                    # tables and figures from what is there

Every stage is a plain `slct` command (printed before it runs), so each number can be reproduced by hand:

1. data:  `slct encode` the zip's faces at 64 px with TAEF2, holding ``--holdout`` faces out (spread evenly);
2. ref:   `slct eval ref` of the held-out faces in MobileNetV2 feature space (the offline FD stand-in);
3. train: `slct train --preset METHOD --data-preset utkface64` for ``--steps`` steps, a snapshot every
          ``--curve-every`` steps; re-running continues where it stopped (``--minutes`` slices it);
4. eval:  `slct eval` of the last snapshot on ``--n-eval`` samples (1 and 2 steps; ldm: its Heun sampler),
          and, for the ``--curves`` methods, of every earlier snapshot on ``--curve-n`` samples (FD vs step);
5. report: ``benchmarks/results/ablation-utkface64-STEPSsteps.{json,md}``, the sample grids side by side and the curves.

Each stage skips what is already done. Runs live in ``--work``/runs/METHOD-STEPSsteps (default --work
/tmp/slct-ablation), outside the repo.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
LADDER = ["ilct", "ladder-cauchy", "ladder-diff", "ladder-ot", "ladder-adaptive-c", "slct"]
GROUPS = {"default": ["ilct", "slct", "ldm"], "ladder": [*LADDER, "ldm"]}
STAGES = ["data", "ref", "train", "eval", "report"]


def sh(args: list[str], log: Path | None = None) -> None:
    """Run one `slct` command (as a user would type it), echoing it first."""
    shown = ["slct", *args[3:]] if args[:3] == slct() else args  # as a user types it
    print("$", shlex.join(shown), flush=True)
    if log is None:
        subprocess.run(args, check=True)
    else:
        with open(log, "a") as f:
            subprocess.run(args, check=True, stdout=f, stderr=subprocess.STDOUT)


def slct(*args: str) -> list[str]:
    return [sys.executable, "-m", "slct", *args]


def run_dir(a, work: Path, method: str) -> Path:
    """Runs of different lengths are different runs (the curriculum is a function of --steps)."""
    return work / "runs" / f"{method}-{a.steps}steps"


def snapshots(run: Path) -> list[Path]:
    return sorted(run.glob("snapshot-*.pt"))


def step_of(snapshot: Path) -> int:
    return int(snapshot.stem.split("-")[1])


def stage_data(a, work: Path) -> Path:
    data = work / f"utk{a.resolution}-train"
    sh(slct("encode", a.zip, str(data), "--codec", "taef2", "--resolution", str(a.resolution), "--holdout",
            str(a.holdout), "--split", "train", "--no-progress"))
    return data


def stage_ref(a, work: Path) -> Path:
    ref = work / f"ref-utk{a.resolution}-holdout{a.holdout}-mobilenetv2.npz"
    if not ref.exists():
        sh(slct("eval", "ref", a.zip, "--extractor", "mobilenetv2", "--resolution", str(a.resolution),
                "--holdout", str(a.holdout), "--out", str(ref), "--no-progress"))
    return ref


def stage_train(a, work: Path, data: Path, method: str) -> bool:
    """One method's run (or its next slice); True when it has reached --steps."""
    run = run_dir(a, work, method)
    if (run / f"snapshot-{a.steps:08d}.pt").exists():
        return True
    cmd = slct("train", "--preset", method, "--data-preset", "utkface64", "--data", str(data), "--out", str(run),
               "--steps", str(a.steps), "--seed", str(a.seed), "--set",
               f"checkpoint.snapshot_every_steps={a.curve_every}", "--no-progress")
    if a.minutes:
        cmd += ["--minutes", str(a.minutes)]
    run.mkdir(parents=True, exist_ok=True)
    sh(cmd, log=run / "train.log")
    return (run / f"snapshot-{a.steps:08d}.pt").exists()


def stage_eval(a, work: Path, ref: Path, method: str) -> None:
    run = run_dir(a, work, method)
    jobs = []  # (snapshot, n, is the table's row): every curve point at --curve-n, the last one also at --n-eval
    for snap in snapshots(run):
        final = step_of(snap) == a.steps
        if method in a.curves:
            jobs.append((snap, a.curve_n, False))
        if final:
            jobs.append((snap, a.n_eval, True))
    for snap, n, row in jobs:
        out = run / f"eval-{step_of(snap):08d}-n{n}.json"
        if out.exists():
            continue
        cmd = slct("eval", "--snapshot", str(snap), "--ref", str(ref), "--n", str(n), "--out", str(out), "--no-progress")
        if not row:
            cmd += ["--max-pr-samples", "0"]  # the curves plot FD only
        if method != "ldm":
            cmd += ["--nfe", "1", "2"] if row else ["--nfe", "1"]
        sh(cmd, log=run / "eval.log")


def training_time_s(run: Path) -> float:
    """Seconds of training: the logged windows' sec_per_step times their lengths (sample grids excluded)."""
    rows = [json.loads(line) for line in open(run / "metrics.jsonl") if '"sec_per_step"' in line]
    total, prev = 0.0, 0
    for r in rows:
        total += r["sec_per_step"] * (r["step"] - prev)
        prev = r["step"]
    return total


def collect(a, work: Path, methods: list[str]) -> list[dict]:
    rows = []
    for method in methods:
        run = run_dir(a, work, method)
        train_s = training_time_s(run) if (run / "metrics.jsonl").exists() else None
        for path in sorted(run.glob("eval-*.json")):
            record = json.loads(path.read_text())
            step = int(path.stem.split("-")[1])
            for r in record["results"]:
                rows.append(dict(method=method, step=step, n=record["n"], nfe=r["nfe"], fd=r["fd"],
                                 precision=r.get("precision"), recall=r.get("recall"),
                                 final=step == a.steps and record["n"] == a.n_eval,
                                 train_s=train_s,
                                 eval_file=str(path)))
    return rows


def figure_grids(a, work: Path, methods: list[str], out: Path) -> None:
    """The same 32 seeds through every method's last snapshot: 1 step (and ldm with its sampler)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slct.images import make_grid
    from slct.sampling import default_nfe, load_snapshot

    rows = []
    for method in methods:
        snap_path = run_dir(a, work, method) / f"snapshot-{a.steps:08d}.pt"
        if not snap_path.exists():
            continue
        snap = load_snapshot(snap_path)
        panels = []
        for nfe in default_nfe(snap.config.objective, snap.config.sampling):
            with torch.no_grad():
                images = snap.generate(list(range(32)), nfe)
            panels.append((f"{method}, {nfe} NFE", make_grid(images, nrow=8)))
        rows.append(panels)
    if not rows:
        return
    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(4.2 * cols, 2.4 * len(rows)), squeeze=False)
    for ax_row, panels in zip(axes, rows):
        for ax in ax_row:
            ax.axis("off")
        for ax, (label, grid) in zip(ax_row, panels):
            ax.imshow(grid)
            ax.set_title(label, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def figure_curves(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    colors = {m: f"C{i}" for i, m in enumerate(sorted({r["method"] for r in rows}))}
    for (method, nfe) in sorted({(r["method"], r["nfe"]) for r in rows}):
        if nfe == 2 and method != "ldm":
            continue
        mine = [r for r in rows if r["method"] == method and r["nfe"] == nfe]
        # FD is biased upwards at small n: a line joins the curve points (smallest n), a star marks the final n
        n_curve, n_final = min(r["n"] for r in mine), max(r["n"] for r in mine)
        for n, style in [(n_curve, "-o"), *([(n_final, "*")] if n_final != n_curve else [])]:
            pts = sorted((r["step"], r["fd"]) for r in mine if r["n"] == n)
            ax.plot(*zip(*pts), style, markersize=9 if style == "*" else 5, label=f"{method} ({nfe} NFE), n={n}",
                    color=colors[method])
    ax.set_xlabel("training step")
    ax.set_ylabel("FD-MobileNetV2 (lower is better)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def stage_report(a, work: Path, methods: list[str]) -> None:
    rows = collect(a, work, methods)
    RESULTS.mkdir(exist_ok=True)
    stem = f"ablation-utkface{a.resolution}-{a.steps}steps"
    figure_grids(a, work, methods, RESULTS / f"{stem}-samples.png")
    figure_curves(rows, RESULTS / f"{stem}-curves.png")
    info = machine("cpu")
    meta = dict(machine=info, command=shlex.join(["python", "benchmarks/ablation.py", *sys.argv[1:]]),
                date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
                settings=dict(resolution=a.resolution, holdout=a.holdout, steps=a.steps, seed=a.seed,
                              n_eval=a.n_eval, curve_n=a.curve_n, curve_every=a.curve_every, methods=methods))
    (RESULTS / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    final = [r for r in rows if r["final"]]
    lines = [f"# Ablation on UTKFace {a.resolution} px (TAEF2 latents), CPU scale", "",
             f"- Machine: {info['cpu']}, {info['cpu_cores']} cores, torch {info['torch']}",
             f"- Command: `{meta['command']}` ({meta['date']})",
             f"- Data: {a.holdout} faces held out for the reference statistics, the rest trained on; network "
             f"`unet-small` (data preset `utkface64`), seed {a.seed}, {a.steps} steps each",
             f"- Score: FD in MobileNetV2 features against the held-out faces; precision/recall k = 3; "
             f"{a.n_eval} samples for the final rows, {a.curve_n} for the curves", "",
             "| method | NFE | FD | precision | recall | steps | training time |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(final, key=lambda r: (methods.index(r["method"]), r["nfe"])):
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        minutes = None if r["train_s"] is None else r["train_s"] / 60
        lines.append(f"| {r['method']} | {r['nfe']} | {r['fd']:.2f} | {fmt(r['precision'], '.3f')} | "
                     f"{fmt(r['recall'], '.4f')} | {r['step']} | {fmt(minutes, '.1f')} min |")
    lines += ["", "FD depends on the number of samples (it is biased upwards at small n): compare rows at the same n. "
              "Training time is the wall time of the logged steps, as the runs were scheduled (see --note)."]
    lines += ["", *([a.note, ""] if a.note else []), f"![samples]({stem}-samples.png)", "",
              f"![FD against training step]({stem}-curves.png)", ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["default"],
                   help="method presets, or a group: default (ilct slct ldm), ladder (Table 2a + ldm)")
    p.add_argument("--stage", nargs="+", choices=STAGES, default=STAGES)
    p.add_argument("--zip", default=str(REPO.parent / "shared" / "data" / "utkface-200px.zip"))
    p.add_argument("--work", default="/tmp/slct-ablation", help="latents, references and runs (not in the repo)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--holdout", type=int, default=5000, help="faces kept out of training for the reference")
    p.add_argument("--steps", type=int, default=1000, help="training steps per method (the same for all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=None, help="train each unfinished run at most this long")
    p.add_argument("--n-eval", type=int, default=5000, help="samples scored at the last step")
    p.add_argument("--curve-every", type=int, default=250, help="snapshot (and curve point) every N steps")
    p.add_argument("--curves", nargs="*", default=GROUPS["default"], help="methods whose earlier snapshots are "
                   "evaluated for the FD-vs-step curves (each point costs --curve-n samples)")
    p.add_argument("--curve-n", type=int, default=1000, help="samples per curve point")
    p.add_argument("--note", default="", help="a paragraph for the report (e.g. how the runs shared the machine)")
    a = p.parse_args()
    methods = [m for name in a.methods for m in GROUPS.get(name, [name])]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = work / f"utk{a.resolution}-train"
    if "data" in a.stage:
        data = stage_data(a, work)
    ref = stage_ref(a, work) if "ref" in a.stage else work / f"ref-utk{a.resolution}-holdout{a.holdout}-mobilenetv2.npz"
    for method in methods:
        done = stage_train(a, work, data, method) if "train" in a.stage else True
        if done and "eval" in a.stage:
            stage_eval(a, work, ref, method)
    if "report" in a.stage:
        stage_report(a, work, methods)
    print(f"done in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
