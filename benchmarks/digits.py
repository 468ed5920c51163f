"""The `digits` preset (the demo's data) set by measurement: its run-length settings over seeds.

    python benchmarks/digits.py                          # train and score every run (resumable: re-run continues)
    python benchmarks/digits.py --stage report           # the table from the runs that are there
    python benchmarks/digits.py --methods slct --variants authors budget --seeds 0 1 2 --steps 700

Each run is `slct demo --preset METHOD --steps STEPS --seed S --set ...` (the built-in 8x8 digits, `unet-tiny`,
pixel space), scored as the demo scores itself: Frechet distance in pixel space of 1- and 2-step samples to the
data, beside a Gaussian with the data's per-pixel mean and variance (the noise baseline). Variants:

- ``authors``: eq. 10's seven stages of K/7 steps, eq. 11's c, RAdam's weight decay coupled to the learning rate on
  every tensor (the paper's settings);
- ``budget``: stages at least 125 steps long, decay decoupled and off for norms and biases;
- ``budget-n81``: ``budget`` with the doubling stopped at N = 81 (``objective.s1=80``: four stages of K/4 steps).
- ``boundary-0``, ``boundary-0.1``, ``boundary-0.25``: MeanFlow with that share of rows at (t, r) = (1, 0)
  (``objective.meanflow_boundary_fraction``; 0 is the paper's sampler):

    python benchmarks/digits.py --methods meanflow --variants boundary-0 boundary-0.1 boundary-0.25 \
        --baseline boundary-0 --steps 300 --n-eval 500 --report digits-meanflow-boundary

Report: benchmarks/results/digits-presets.{md,json}, mean +- sd over seeds, each variant against ``authors`` (beats
by more than 2 pooled sd only from 3 seeds a side). One single-threaded process (``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from common import SETTINGS, load_sibling, machine, overrides, write_report  # noqa: E402

VARIANTS = {name: overrides(name) for name in SETTINGS}  # common.SETTINGS: all four settings spelled out
# MeanFlow's time sampler for short runs (beyond the paper): the paper's logit-normal times against a share of rows
# given the whole interval (t, r) = (1, 0) that 1-step sampling takes
VARIANTS.update({f"boundary-{f:g}": [f"objective.meanflow_boundary_fraction={f:g}"] for f in (0.0, 0.1, 0.25)})
VARIANTS["preset"] = []  # the method preset as it is
# the stage-jump remedies (docs/training.md "Stage jumps"), on top of the preset
VARIANTS["stage-warmup"] = ["optim.stage_warmup_steps=50"]
VARIANTS["grad-scale"] = ["optim.grad_scale_beta=0.9"]

ablation = load_sibling("ablation")  # sh(), slct(), mean_sd() and the seed rule for verdicts


def run_dir(work: Path, method: str, variant: str, steps: int, seed: int) -> Path:
    return work / f"{method}-{variant}-{steps}steps-seed{seed}"


def demo_args(a, method: str, variant: str, seed: int) -> list[str]:
    sets = [x for s in VARIANTS[variant] for x in ("--set", s)]
    return ["demo", "--preset", method, "--steps", str(a.steps), "--seed", str(seed), "--n-eval", str(a.n_eval),
            "--out", str(run_dir(Path(a.work), method, variant, a.steps, seed)), *sets]


def runs(a):
    """(method, variant, seed, run directory) of every run the arguments name, in the order they train."""
    for method in a.methods:
        for variant in a.variants:
            for seed in a.seeds:
                yield method, variant, seed, run_dir(Path(a.work), method, variant, a.steps, seed)


def stage_train(a) -> None:
    """Every run not scored yet, one after another (a stopped run resumes from its checkpoint)."""
    for method, variant, seed, out in runs(a):
        if not (out / "demo-scores.json").is_file():
            ablation.sh(ablation.slct(*demo_args(a, method, variant, seed)))


def collect(a) -> list[dict]:
    return [dict(method=method, variant=variant, seed=seed, **json.loads((out / "demo-scores.json").read_text()))
            for method, variant, seed, out in runs(a) if (out / "demo-scores.json").is_file()]


def summarize(rows: list[dict]) -> list[dict]:
    """Mean +- sd over seeds of the 1- and 2-step FD (and the noise baseline) per (method, variant)."""
    out = []
    for key in dict.fromkeys((r["method"], r["variant"]) for r in rows):
        mine = [r for r in rows if (r["method"], r["variant"]) == key]
        entry = dict(method=key[0], variant=key[1], seeds=sorted(r["seed"] for r in mine))
        for name in ("fd_nfe1", "fd_nfe2", "fd_noise_baseline"):
            entry[name], entry[f"{name}_sd"] = ablation.mean_sd([r[name] for r in mine])
        out.append(entry)
    return out


def verdicts(summary: list[dict], baseline: str = "authors") -> list[dict]:
    """Each variant against ``baseline`` of the same method at 1 and 2 steps, by ablation.compare's rule."""
    # ablation.compare reads rows of (method, weights, nfe, seeds, fd, fd_sd): one method name per variant
    rows = [dict(method=f"{s['method']}@{s['variant']}", weights="demo", nfe=nfe, seeds=s["seeds"],
                 fd=s[f"fd_nfe{nfe}"], fd_sd=s[f"fd_nfe{nfe}_sd"]) for s in summary for nfe in (1, 2)]
    out = []
    for s in summary:
        if s["variant"] == baseline:
            continue
        for nfe in (1, 2):
            for c in ablation.compare(rows, f"{s['method']}@{s['variant']}", f"{s['method']}@{baseline}", nfe):
                out.append(dict(method=s["method"], variant=s["variant"], nfe=nfe, fd_difference=c["fd_difference"],
                                pooled_sd=c["pooled_sd"], beats_by_2_pooled_sd=c["beats_by_2_pooled_sd"]))
    return out


def stage_report(a) -> Path:
    rows = collect(a)
    if not rows and (RESULTS / f"{a.report}.json").exists():  # a new machine (no run folders): keep the committed one
        sys.exit(f"no run of {a.steps} steps is scored under {a.work}: {RESULTS / a.report}.md is kept; "
                 "`python benchmarks/digits.py` with the same options trains and scores them (minutes each on a CPU)")
    summary = summarize(rows)
    comparisons = verdicts(summary, a.baseline)
    command = shlex.join(["python", "benchmarks/digits.py", *sys.argv[1:]])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info = machine()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{a.report}.json").write_text(json.dumps(dict(
        meta=dict(command=command, date=date, machine=info, steps=a.steps, n_eval=a.n_eval,
                  variants={v: VARIANTS[v] for v in a.variants}),
        summary=summary, comparisons=comparisons, runs=rows), indent=2) + "\n")
    pm = lambda e, k: f"{e[k]:.2f}" + (f" +- {e[k + '_sd']:.2f}" if len(e["seeds"]) > 1 else "")  # noqa: E731
    lines = ["# The `digits` preset by measurement (`slct demo`, built-in 8x8 digits, pixel space)", "",
             f"- Machine: {info['cpu']}, {info['cpu_cores']} cores, torch {info['torch']}",
             f"- Command: `{command}` ({date})",
             f"- {a.steps} steps at batch 64 per run; FD in pixel space of {a.n_eval} samples to the 1,797 digits "
             f"(lower is better; the noise baseline is a Gaussian with the data's per-pixel mean and variance)",
             "- Variants: " + "; ".join(f"`{v}`: {', '.join(VARIANTS[v]) or 'the preset as it is'}" for v in a.variants), "",
             "| method | variant | FD, 1 step | FD, 2 steps | noise baseline | seeds |", "|---|---|---:|---:|---:|---:|"]
    for e in summary:
        lines.append(f"| {e['method']} | {e['variant']} | {pm(e, 'fd_nfe1')} | {pm(e, 'fd_nfe2')} | "
                     f"{e['fd_noise_baseline']:.2f} | {len(e['seeds'])} |")
    for c in comparisons:
        verdict = {True: "yes", False: "no", None: "not decided (fewer than 3 seeds)"}[c["beats_by_2_pooled_sd"]]
        lines.append(f"\n{c['method']} {c['variant']} vs {a.baseline} ({c['nfe']} NFE): mean FD difference "
                     f"{c['fd_difference']:.2f} ({a.baseline} minus {c['variant']}; positive: {c['variant']} is lower), "
                     f"2 pooled sd = {2 * c['pooled_sd']:.2f}: beats by more than 2 pooled sd: **{verdict}**")
    lines += ["", "Per-seed scores are in the JSON beside this file.", ""]
    return write_report(RESULTS / f"{a.report}.md", lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", default="/tmp/slct-digits", help="where the runs go")
    p.add_argument("--methods", nargs="+", default=["slct", "ilct"])
    p.add_argument("--variants", nargs="+", default=list(SETTINGS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=700, help="steps per run (the preset's train.total_steps)")
    p.add_argument("--n-eval", type=int, default=1000, help="samples scored per run")
    p.add_argument("--stage", nargs="+", default=["train", "report"], choices=["train", "report"])
    p.add_argument("--baseline", default="authors", choices=list(VARIANTS), help="the variant the others are judged by")
    p.add_argument("--report", default="digits-presets", help="results/NAME.{md,json}")
    return p


def main() -> None:
    a = parser().parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core a process: two side by side use a 2-core CPU best
    if "train" in a.stage:
        stage_train(a)
    if "report" in a.stage:
        stage_report(a)


if __name__ == "__main__":
    main()
