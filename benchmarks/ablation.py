"""The paper's ablation (Table 2a) on real faces at CPU scale: UTKFace 64 px, TAEF2 latents, FD-MobileNetV2.

    python benchmarks/ablation.py                                   # ilct, slct, ldm; every stage; resumable
    python benchmarks/ablation.py --methods ladder                  # the whole Table 2a ladder + ldm
    python benchmarks/ablation.py --stage train --minutes 9         # one 9-minute slice of training, then stop
    python benchmarks/ablation.py --stage report                    # tables and figures from what is there
    python benchmarks/ablation.py --methods ilct slct --seeds 0 1 2 # three seeds each: mean +- sd per row

Every stage is a plain `slct` command (printed before it runs), so each number can be reproduced by hand:

1. data:  `slct encode` the zip's faces at 64 px with TAEF2, holding ``--holdout`` faces out (spread evenly);
2. ref:   `slct eval ref` of the held-out faces in MobileNetV2 feature space (the offline FD stand-in);
   (and `slct analyze` of the training latents: the kurtosis and outlier rate the recipe is about);
3. train: `slct train --preset METHOD --data-preset utkface64` for ``--steps`` steps and each of ``--seeds``, a
          snapshot every ``--curve-every`` steps (``--set`` passes overrides, ``--tag`` names such a variant);
          re-running continues where it stopped (``--minutes`` slices it);
4. eval:  `slct eval` of the last snapshot on ``--n-eval`` samples for each of ``--weights`` (EMAs by name, or
          `online`; 1 and 2 steps; ldm: its Heun sampler), and, for the ``--curves`` methods, of every earlier
          snapshot on ``--curve-n`` samples with the first of ``--weights`` (FD vs step);
5. report: ``benchmarks/results/ablation-utkface64-STEPSsteps[-TAG].{json,md}``: mean +- sd over the seeds per
          method, weights and NFE (final rows and curve points under their own keys in the JSON), whether sLCT's
          mean 1-NFE FD beats iLCT's by more than 2 pooled sd, the sample grids and the curves. A method named
          ``METHOD@TAG`` reads the runs of variant TAG, so variants share one report (``--compare slct@TAG:slct``).

Each stage skips what is already done. Runs live in ``--work``/runs/METHOD[-TAG]-STEPSsteps-seedS (default --work
/tmp/slct-ablation), outside the repo. Two single-threaded invocations with different ``--seeds`` side by side use
a 2-core machine best (``OMP_NUM_THREADS=1``). ``--archive REPORT.json ...`` names committed reports whose runs'
folders are gone: a run they hold counts as done (not trained or scored again) and its rows are read from there.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
LADDER = ["ilct", "ladder-cauchy", "ladder-diff", "ladder-ot", "ladder-adaptive-c", "slct"]
GROUPS = {"default": ["ilct", "slct", "ldm"], "ladder": [*LADDER, "ldm"],
          "few-step": ["slct", "ilct", "meanflow", "shortcut", "ldm"]}
STAGES = ["data", "ref", "train", "eval", "report"]
MIN_SEEDS_FOR_VERDICT = 3  # per method, for "beats by more than 2 pooled sd"


def sh(args: list[str], log: Path | None = None) -> None:
    """Run one `slct` command (as a user would type it), echoing it first."""
    shown = ["slct", *args[3:]] if args[:3] == slct() else args  # as a user types it
    print("$", shlex.join(shown), flush=True)
    with open(log, "a") if log is not None else contextlib.nullcontext() as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT if f else None)
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # the child got the same SIGINT: let a training run write its checkpoint (as
            proc.wait()            # subprocess.run would not: it kills the child), so re-running loses nothing
            raise
    if code:
        raise subprocess.CalledProcessError(code, args)


def slct(*args: str) -> list[str]:
    return [sys.executable, "-m", "slct", *args]


def run_dir(a, work: Path, method: str, seed: int = 0) -> Path:
    """Runs of different lengths are different runs (the curriculum is a function of --steps). ``METHOD@TAG``
    names another variant's runs (``--tag TAG``), so one report can set variants side by side."""
    method, _, tag = method.partition("@")
    tag = tag or getattr(a, "tag", "")
    return work / "runs" / f"{method}{'-' + tag if tag else ''}-{a.steps}steps-seed{seed}"


def snapshots(run: Path) -> list[Path]:
    return sorted(run.glob("snapshot-*.pt"))


def step_of(snapshot: Path) -> int:
    return int(snapshot.stem.split("-")[1])


def stage_data(a, work: Path) -> Path:
    data = work / f"utk{a.resolution}-train"
    sh(slct("encode", a.zip, "--out", str(data), "--codec", "taef2", "--resolution", str(a.resolution), "--holdout",
            str(a.holdout), "--split", "train", "--no-progress"))
    if not (analysis_dir(work, a) / "analysis.json").exists():  # the paper's premise: how impulsive are the latents
        sh(slct("analyze", str(data), "--out", str(analysis_dir(work, a)), "--normalization", "per-element",
                "--no-progress"))
    return data


def analysis_dir(work: Path, a) -> Path:
    return work / f"analysis-utk{a.resolution}"


def stage_ref(a, work: Path) -> Path:
    ref = work / f"ref-utk{a.resolution}-holdout{a.holdout}-mobilenetv2.npz"
    if not ref.exists():
        sh(slct("eval", "ref", a.zip, "--extractor", "mobilenetv2", "--resolution", str(a.resolution),
                "--holdout", str(a.holdout), "--out", str(ref), "--no-progress"))
    return ref


def stage_train(a, work: Path, data: Path, method: str, seed: int) -> bool:
    """One method's run for one seed (or its next slice); True when it has reached --steps."""
    run = run_dir(a, work, method, seed)
    if (run / f"snapshot-{a.steps:08d}.pt").exists():
        return True
    if "@" in method:  # its overrides are not known here: a variant trains under its own --tag and --set
        sys.exit(f"{method}: train a variant with --tag {method.partition('@')[2]} and its --set overrides")
    cmd = slct("train", "--preset", method, "--data-preset", "utkface64", "--data", str(data), "--out", str(run),
               "--steps", str(a.steps), "--seed", str(seed), "--set",
               f"checkpoint.snapshot_every_steps={a.curve_every}", "--set", "train.ema_power_every_steps=0",
               "--no-progress")
    for extra in a.sets:
        cmd += ["--set", extra]
    if a.minutes:
        cmd += ["--minutes", str(a.minutes)]
    run.mkdir(parents=True, exist_ok=True)
    sh(cmd, log=run / "train.log")
    return (run / f"snapshot-{a.steps:08d}.pt").exists()


def eval_file(run: Path, step: int, n: int, weights: str) -> Path:
    return run / f"eval-{step:08d}-n{n}-{weights}.json"


def stage_eval(a, work: Path, ref: Path, method: str, seed: int) -> None:
    run = run_dir(a, work, method, seed)
    # (snapshot, n, weights, is a final row): every curve point at --curve-n with the first weights, the last
    # snapshot also at --n-eval with every weights
    jobs = []
    for snap in snapshots(run):
        if method in a.curves:
            jobs.append((snap, a.curve_n, a.weights[0], False))
        if step_of(snap) == a.steps:
            jobs += [(snap, a.n_eval, w, True) for w in a.weights]
    for snap, n, weights, final in jobs:
        out = eval_file(run, step_of(snap), n, weights)
        if out.exists():
            continue
        cmd = slct("eval", "--snapshot", str(snap), "--ref", str(ref), "--n", str(n), "--out", str(out), "--no-progress",
                   "--ema", weights)
        if not final:
            cmd += ["--max-pr-samples", "0"]  # the curves plot FD only
        if method != "ldm":
            cmd += ["--nfe", "1", "2"] if final else ["--nfe", "1"]
        sh(cmd, log=run / "eval.log")


def training_time_s(run: Path) -> float:
    """Seconds of training: the logged windows' sec_per_step times their lengths (sample grids excluded)."""
    rows = [json.loads(line) for line in open(run / "metrics.jsonl") if '"sec_per_step"' in line]
    total, prev = 0.0, 0
    for r in rows:
        total += r["sec_per_step"] * (r["step"] - prev)
        prev = r["step"]
    return total


def archived(a, method: str, seed: int) -> tuple[list[dict], list[dict]]:
    """(final rows, curve points) of one run from the ``--archive`` reports of this length: the record of a run
    whose folder is gone (a wiped /tmp) stands in for it, so a study's finished runs need not train again."""
    def variant(method: str, tag: str) -> str:  # a run's full name: plain "ilct" in a --tag budget call is ilct@budget
        return method if "@" in method or not tag else f"{method}@{tag}"

    for path in a.archive:  # the first report of this length that has the run
        record = json.loads(Path(path).read_text())
        settings = record["meta"]["settings"]
        if settings["steps"] != a.steps:
            continue
        final, curves = ([{**r, "archived_in": str(path)} for r in record[key] if r["seed"] == seed
                          and variant(r["method"], settings["tag"]) == variant(method, a.tag)]
                         for key in ("final", "curves"))
        if final:
            return final, curves
    return [], []


def collect(a, work: Path, methods: list[str]) -> tuple[list[dict], list[dict]]:
    """(final rows, curve points): one row per method, seed, weights and NFE; a run with no eval files here is
    read from the ``--archive`` reports."""
    final, curves = [], []
    for method in methods:
        for seed in a.seeds:
            run = run_dir(a, work, method, seed)
            if not any(run.glob("eval-*.json")):
                old_final, old_curves = archived(a, method, seed)
                final += old_final
                curves += old_curves
                continue
            train_s = training_time_s(run) if (run / "metrics.jsonl").exists() else None
            for path in sorted(run.glob("eval-*.json")):
                record = json.loads(path.read_text())
                _, step, n, weights = path.stem.split("-", 3)
                step, n = int(step), int(n[1:])
                is_final = step == a.steps and n == a.n_eval
                for r in record["results"]:
                    row = dict(method=method, seed=seed, weights=weights, step=step, n=n, nfe=r["nfe"], fd=r["fd"],
                               precision=r.get("precision"), recall=r.get("recall"), train_s=train_s,
                               eval_file=str(path))
                    (final if is_final else curves).append(row)
                    if is_final and weights == a.weights[0] and method in a.curves:
                        curves.append({**row, "final_n": True})  # the last curve point, at the final n
    return final, curves


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return m, sd


def summarize(final: list[dict], methods: list[str], weights: list[str]) -> list[dict]:
    """Mean +- sd over seeds of FD, precision and recall per (method, weights, NFE)."""
    out = []
    for method in methods:
        for w in weights:
            for nfe in sorted({r["nfe"] for r in final if r["method"] == method and r["weights"] == w}):
                rows = [r for r in final if (r["method"], r["weights"], r["nfe"]) == (method, w, nfe)]
                entry = dict(method=method, weights=w, nfe=nfe, seeds=sorted(r["seed"] for r in rows))
                for key in ("fd", "precision", "recall"):
                    vals = [r[key] for r in rows if r[key] is not None]
                    if vals:
                        entry[key], entry[f"{key}_sd"] = mean_sd(vals)
                out.append(entry)
    return out


def beats(mine: dict, other: dict) -> tuple[float, float, bool | None]:
    """(FD difference other - mine, pooled sd, lower by more than 2 pooled sd?) of two summary rows; one or two
    seeds are an anecdote: the numbers are given, the verdict (None) waits for MIN_SEEDS_FOR_VERDICT a side."""
    pooled = ((mine["fd_sd"] ** 2 + other["fd_sd"] ** 2) / 2) ** 0.5
    enough = min(len(mine["seeds"]), len(other["seeds"])) >= MIN_SEEDS_FOR_VERDICT
    diff = other["fd"] - mine["fd"]
    return diff, pooled, (diff > 2 * pooled if enough else None)


def compare(summary: list[dict], a: str = "slct", b: str = "ilct", nfe: int = 1) -> list[dict]:
    """Per weights: does ``a``'s mean FD at ``nfe`` steps beat ``b``'s by more than 2 pooled sd?"""
    out = []
    for w in sorted({s["weights"] for s in summary}):
        pick = {s["method"]: s for s in summary if s["weights"] == w and s["nfe"] == nfe}
        if a in pick and b in pick and len(pick[a]["seeds"]) > 1 and len(pick[b]["seeds"]) > 1:
            diff, pooled, verdict = beats(pick[a], pick[b])
            out.append(dict(weights=w, nfe=nfe, better=a, than=b, fd_difference=diff, pooled_sd=pooled,
                            beats_by_2_pooled_sd=verdict))
    return out


def figure_grids(a, work: Path, methods: list[str], out: Path) -> None:
    """The same 32 seeds through every method's last snapshot: 1 step (and ldm with its sampler)."""
    named = [(method, run_dir(a, work, method, a.seeds[0]) / f"snapshot-{a.steps:08d}.pt") for method in methods]
    snapshot_grids([(name, path) for name, path in named if path.exists()], a.weights[0], out)


def snapshot_grids(named: list[tuple[str, Path]], weights: str, out: Path) -> None:
    """One row per (label, snapshot): the same 32 seeds at each of its default NFE (a consistency model's 1 and 2
    steps, ldm's sampler), from its ``weights`` EMA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slct.images import make_grid
    from slct.sampling import default_nfe, load_snapshot

    rows = []
    for label, snap_path in named:
        snap = load_snapshot(snap_path, ema=weights)
        panels = []
        for nfe in default_nfe(snap.config.objective, snap.config.sampling):
            with torch.no_grad():
                images = snap.generate(list(range(32)), nfe)
            panels.append((f"{label}, {nfe} NFE", make_grid(images, nrow=8)))
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
    # a .jpg grid (the leaderboard's: one row per entry) is a tenth of the PNG's size in the repository
    fig.savefig(out, dpi=110, **({"pil_kwargs": {"quality": 88}} if out.suffix == ".jpg" else {}))
    plt.close(fig)


def figure_curves(curves: list[dict], out: Path) -> None:
    """FD against the step: the mean over seeds (error bars: sd), 1 NFE (ldm: its sampler)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in curves})
    # the default cycle has 10 colours: a board with more entries would draw two methods alike
    palette = [f"C{i}" for i in range(10)] if len(methods) <= 10 else list(plt.get_cmap("tab20").colors)
    colors = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(6, 3.8) if len(methods) <= 6 else (9, 4.8))
    for (method, nfe) in sorted({(r["method"], r["nfe"]) for r in curves}):
        if nfe == 2 and method != "ldm":
            continue
        mine = [r for r in curves if r["method"] == method and r["nfe"] == nfe]
        # FD is biased upwards at small n: a line joins the curve points (smallest n), a star marks the final n
        n_curve, n_final = min(r["n"] for r in mine), max(r["n"] for r in mine)
        for n, style in [(n_curve, "-o"), *([(n_final, "*")] if n_final != n_curve else [])]:
            steps = sorted({r["step"] for r in mine if r["n"] == n})
            stats = [mean_sd([r["fd"] for r in mine if r["n"] == n and r["step"] == st]) for st in steps]
            ax.errorbar(steps, [m for m, _ in stats], yerr=[sd for _, sd in stats], fmt=style, capsize=3,
                        markersize=9 if style == "*" else 5, label=f"{method} ({nfe} NFE), n={n}",
                        color=colors[method])
    ax.set_xlabel("training step")
    ax.set_ylabel("FD-MobileNetV2 (lower is better)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if curves and len(methods) <= 6:  # (no curve points: empty axes, no legend to draw)
        ax.legend(fontsize=8)
    elif curves:  # beside the axes: inside, a long legend hides the curves
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def premise(work: Path, a) -> dict | None:
    """Excess kurtosis and outlier rates of the training latents (`slct analyze`, per-element normalisation)."""
    path = analysis_dir(work, a) / "analysis.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())["panels"]["latents data"]["all"]
    return dict(excess_kurtosis=data["excess_kurtosis"], beyond_inner=data["beyond_inner"],
                beyond_outer=data["beyond_outer"], min=data["min"], max=data["max"], analysis=str(path))


def stage_report(a, work: Path, methods: list[str], stem: str | None = None,
                 pairs: tuple[tuple[str, str], ...] = (("slct", "ilct"),), title: str = "Ablation",
                 nfes: tuple[int, ...] = (1,), script: str = "ablation.py") -> Path:
    """Write RESULTS/STEM.{md,json} and the figures; ``pairs`` (a, b): does a beat b by 2 pooled sd at each of
    ``nfes``? Returns the md."""
    final, curves = collect(a, work, methods)
    summary = summarize(final, methods, a.weights)
    comparisons = [c for nfe in nfes for pair in pairs for c in compare(summary, *pair, nfe=nfe)]
    RESULTS.mkdir(exist_ok=True)
    stem = stem or f"ablation-utkface{a.resolution}-{a.steps}steps" + (f"-{a.tag}" if a.tag else "")
    drawn = [m for m in methods if (run_dir(a, work, m, a.seeds[0]) / f"snapshot-{a.steps:08d}.pt").exists()]
    gone = sorted({r["method"] for r in final if "archived_in" in r})
    # an archived run has no snapshot left to draw: the figure of an earlier report stays, the runs that are here
    # get a figure of their own
    samples = [f"{stem}-samples.png"] if gone or drawn else []
    if gone and drawn:
        samples.append(f"{stem}-samples-added.png")
    if drawn:
        figure_grids(a, work, drawn, RESULTS / samples[-1])
    figure_curves(curves, RESULTS / f"{stem}-curves.png")
    info = machine("cpu")
    latents = premise(work, a)
    meta = dict(machine=info, command=shlex.join(["python", f"benchmarks/{script}", *sys.argv[1:]]),
                date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
                settings=dict(resolution=a.resolution, holdout=a.holdout, steps=a.steps, seeds=a.seeds,
                              weights=a.weights, n_eval=a.n_eval, curve_n=a.curve_n, curve_every=a.curve_every,
                              methods=methods, tag=a.tag, sets=a.sets))
    (RESULTS / f"{stem}.json").write_text(json.dumps(dict(meta=meta, premise=latents, summary=summary,
                                                          comparisons=comparisons, final=final, curves=curves),
                                                     indent=2) + "\n")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    pm = lambda e, key, spec: (f"{fmt(e.get(key), spec)} +- {fmt(e.get(key + '_sd'), spec)}"  # noqa: E731
                               if key in e else "-")
    lines = [f"# {title} on UTKFace {a.resolution} px (TAEF2 latents), CPU scale", "",
             f"- Machine: {info['cpu']}, {info['cpu_cores']} cores, torch {info['torch']}",
             f"- Command: `{meta['command']}` ({meta['date']})",
             f"- Data: {a.holdout} faces held out for the reference statistics, the rest trained on; network "
             f"`unet-small` (data preset `utkface64`), {a.steps} steps each, seeds {', '.join(map(str, a.seeds))}"
             + (f"; overrides {', '.join(a.sets)}" if a.sets else ""),
             f"- Score: FD in MobileNetV2 features against the held-out faces; precision/recall k = 3; "
             f"{a.n_eval} samples for the final rows, {a.curve_n} for the curves; weights: {', '.join(a.weights)}"]
    if latents:
        lines.append(f"- The premise: the training latents (per-element normalised) have excess kurtosis "
                     f"{latents['excess_kurtosis']:.2f}, {100 * latents['beyond_inner']:.2f}% of values beyond the "
                     f"1.5 IQR fences and {100 * latents['beyond_outer']:.3f}% beyond 3 IQR (range "
                     f"{latents['min']:.1f} to {latents['max']:.1f}); a Gaussian has 0, 0.70% and ~0.0002%")
    lines += ["", "| method | weights | NFE | FD (mean +- sd) | precision | recall | seeds |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for e in summary:
        lines.append(f"| {e['method']} | {e['weights']} | {e['nfe']} | {pm(e, 'fd', '.1f')} | "
                     f"{pm(e, 'precision', '.3f')} | {pm(e, 'recall', '.4f')} | {len(e['seeds'])} |")
    for c in comparisons:
        verdict = {True: "yes", False: "no", None: f"not decided (fewer than {MIN_SEEDS_FOR_VERDICT} seeds)"}[
            c["beats_by_2_pooled_sd"]]
        lines.append(f"\n{c['better']} vs {c['than']} ({c['weights']} weights, {c['nfe']} NFE): mean FD difference "
                     f"{c['fd_difference']:.1f} ({c['than']} minus {c['better']}; positive: {c['better']} is lower), "
                     f"2 pooled sd = {2 * c['pooled_sd']:.1f}: {c['better']} beats by more than 2 pooled sd: "
                     f"**{verdict}**")
    lines += ["", "Per-seed rows, training times and the eval files are in the JSON beside this file. FD depends on "
              "the number of samples (it is biased upwards at small n): compare rows at the same n."]
    if gone:
        archives = sorted({r["archived_in"] for r in final if "archived_in" in r})
        lines += ["", f"Rows of runs whose folders are gone, read from {', '.join(archives)}: {', '.join(gone)}"
                  + (f"; {samples[-1]} shows the runs trained since ({', '.join(drawn)})." if drawn else ".")]
    lines += ["", *([a.note, ""] if a.note else []), *(line for name in samples for line in (f"![samples]({name})", "")),
              f"![FD against training step]({stem}-curves.png)", ""]
    return write_report(RESULTS / f"{stem}.md", lines)


def parser(description: str = "", stages: tuple[str, ...] = STAGES) -> argparse.ArgumentParser:
    """The command line of this script (benchmarks/compare.py extends it)."""
    p = argparse.ArgumentParser(description=description or __doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["default"],
                   help="method presets, or a group: default (ilct slct ldm), ladder (Table 2a + ldm)")
    p.add_argument("--stage", nargs="+", choices=stages, default=list(stages))
    p.add_argument("--zip", default=str(REPO.parent / "shared" / "data" / "utkface-200px.zip"))
    p.add_argument("--work", default="/tmp/slct-ablation", help="latents, references and runs (not in the repo)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--holdout", type=int, default=5000, help="faces kept out of training for the reference")
    p.add_argument("--steps", type=int, default=1000, help="training steps per method (the same for all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (>= 3 for mean +- sd)")
    p.add_argument("--weights", nargs="+", default=["rampup", "online"],
                   help="weights scored at the last step: EMA names (rampup, 0.999, std=0.1) or online")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run (repeatable); name the variant with --tag")
    p.add_argument("--tag", default="", help="names runs and report of a variant (e.g. paper-settings)")
    p.add_argument("--minutes", type=float, default=None, help="train each unfinished run at most this long")
    p.add_argument("--n-eval", type=int, default=5000, help="samples scored at the last step")
    p.add_argument("--curve-every", type=int, default=250, help="snapshot (and curve point) every N steps")
    p.add_argument("--curves", nargs="*", default=GROUPS["default"], help="methods whose earlier snapshots are "
                   "evaluated for the FD-vs-step curves (each point costs --curve-n samples)")
    p.add_argument("--curve-n", type=int, default=1000, help="samples per curve point")
    p.add_argument("--note", default="", help="a paragraph for the report (e.g. how the runs shared the machine)")
    p.add_argument("--stem", default=None, help="the report's file name without suffix (default "
                   "ablation-utkface64-STEPSsteps[-TAG]; another keeps an earlier report of that length)")
    p.add_argument("--archive", nargs="+", default=[], metavar="REPORT.json",
                   help="earlier reports (benchmarks/results/*.json) whose runs' folders are gone: a run they hold "
                   "is done (not trained again) and reported from its archived rows")
    p.add_argument("--compare", nargs="+", default=["slct:ilct"], metavar="A:B",
                   help="report whether A's mean 1-NFE FD beats B's by more than 2 pooled sd, per weights")
    return p


def run_stages(a, methods: list[str]) -> None:
    """The data, ref, train and eval stages for ``methods`` (each skips what is done)."""
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = work / f"utk{a.resolution}-train"
    if "data" in a.stage:
        data = stage_data(a, work)
    ref = stage_ref(a, work) if "ref" in a.stage else work / f"ref-utk{a.resolution}-holdout{a.holdout}-mobilenetv2.npz"
    for seed in a.seeds:
        for method in methods:
            old_final = [] if run_dir(a, work, method, seed).exists() else archived(a, method, seed)[0]
            if old_final:
                print(f"{method} seed {seed}: done, in the archive ({old_final[0]['archived_in']})")
                continue
            done = stage_train(a, work, data, method, seed) if "train" in a.stage else True
            if done and "eval" in a.stage:
                stage_eval(a, work, ref, method, seed)
    print(f"stages done in {(time.time() - t0) / 60:.1f} min")


def check(p: argparse.ArgumentParser, a) -> None:
    """What the parser alone cannot say: overrides change the runs, so they need a variant name."""
    if a.sets and not a.tag:
        p.error("--set changes the runs: name the variant with --tag")


def main() -> None:
    p = parser()
    a = p.parse_args()
    check(p, a)
    methods = [m for name in a.methods for m in GROUPS.get(name, [name])]
    run_stages(a, methods)
    if "report" in a.stage:
        pairs = tuple(tuple(pair.split(":", 1)) for pair in a.compare)
        stage_report(a, Path(a.work), methods, stem=a.stem, pairs=pairs)


if __name__ == "__main__":
    main()
