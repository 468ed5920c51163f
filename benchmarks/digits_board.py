"""The leaderboard on a second data set: the built-in 8x8 digits (pixel space, `unet-tiny`, the `digits` preset),
so a verdict on UTKFace can be checked where the data, codec and network differ.

    python benchmarks/digits_board.py                      # every entry x seed; re-run to continue
    python benchmarks/digits_board.py --stage report       # the table from what is there

Each entry trains ``--steps`` steps from scratch with its method preset on the `digits` data preset (`slct train
--preset METHOD --data-preset digits`; the same for every entry, as the UTKFace board), then its final snapshot
(ramp-up EMA) is scored as `slct demo` scores itself: the Frechet distance in pixel space of ``--n-eval`` samples to
the 1,797 digits (slct.commands.demo.score), at the entry's NFE (the many-step baselines along their NFE curve).
The report gives mean +- sd over ``--seeds`` and, for every few-step row, whether it beats the best many-step
baseline at <= 35 NFE by more than 2 pooled sd (benchmarks/ablation.beats: a verdict only from 3 seeds a side).
Results: results/digits-board-STEPSsteps.{md,json}. One process, the runs one after another (`OMP_NUM_THREADS=1`
beside other work).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import load_sibling, machine, write_report  # noqa: E402

ablation = load_sibling("ablation")

# entry -> (method preset, extra --set, NFE scored); the many-step baselines first (the bar is their best)
ENTRIES = {
    "ldm": ("ldm", [], (5, 9, 17, 35)),
    "ldm-edm": ("ldm-edm", [], (5, 9, 17, 35)),
    "fm": ("fm", [], (2, 5, 9, 17, 35)),
    "soflow": ("soflow", [], (1, 2, 4)),
    "meanflow": ("meanflow", [], (1, 2)),
    "shortcut": ("shortcut", [], (1, 2, 4)),
    "ilct": ("ilct", [], (1, 2)),
    "slct": ("slct", [], (1, 2)),
}
BASELINES = ("ldm", "ldm-edm", "fm")


def run_dir(a, name: str, seed: int) -> Path:
    return Path(a.work) / f"{name}-{a.steps}steps-seed{seed}"


def train_and_score(a, name: str, seed: int) -> Path:
    """Train one run (resuming if it was stopped) and score it; returns its scores file."""
    run = run_dir(a, name, seed)
    scores = run / f"scores-n{a.n_eval}.json"
    if scores.exists():
        return scores
    preset, sets, nfes = ENTRIES[name]
    if not (run / f"snapshot-{a.steps:08d}.pt").exists():
        cmd = ["train", "--preset", preset, "--data-preset", "digits", "--steps", str(a.steps), "--seed", str(seed),
               "--out", str(run), "--no-progress", "--set", "logging.sample_every_steps=0",
               *[x for s in sets for x in ("--set", s)]]
        run.mkdir(parents=True, exist_ok=True)
        ablation.sh(ablation.slct(*cmd), log=run / "train.log")
    from slct.commands.demo import score
    from slct.sampling import load_snapshot

    snap = load_snapshot(run / f"snapshot-{a.steps:08d}.pt", ema="rampup")
    result = score(snap, a.n_eval, nfes)
    scores.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k.startswith("fd")),
          flush=True)
    return scores


def summarize(a) -> list[dict]:
    out = []
    for name in a.entries:
        per_nfe: dict[int, list] = {}
        for seed in a.seeds:
            path = run_dir(a, name, seed) / f"scores-n{a.n_eval}.json"
            if path.exists():
                result = json.loads(path.read_text())
                for nfe in ENTRIES[name][2]:
                    if f"fd_nfe{nfe}" in result:
                        per_nfe.setdefault(nfe, []).append((seed, result[f"fd_nfe{nfe}"]))
        for nfe, values in sorted(per_nfe.items()):
            fd, sd = ablation.mean_sd([v for _, v in values])
            out.append(dict(entry=name, nfe=nfe, fd=fd, fd_sd=sd, seeds=[s for s, _ in values]))
    return out


def verdicts(summary: list[dict]) -> tuple[dict | None, list[dict]]:
    """The bar (the baseline row at <= 35 NFE with the lowest mean FD) and every few-step row against it."""
    bars = [s for s in summary if s["entry"] in BASELINES and s["nfe"] <= 35]
    if not bars:
        return None, []
    bar = min(bars, key=lambda s: s["fd"])
    out = []
    for s in summary:
        if s["entry"] in BASELINES:
            continue
        diff, pooled, verdict = ablation.beats(s, bar)
        worse = ablation.beats(bar, s)[2]
        out.append(dict(entry=s["entry"], nfe=s["nfe"], fd_difference=diff, pooled_sd=pooled, beats=verdict,
                        worse=worse))
    return bar, out


def report(a) -> Path:
    summary = summarize(a)
    bar, judged = verdicts(summary)
    stem = f"digits-board-{a.steps}steps"
    committed = ablation.RESULTS / f"{stem}.json"
    if not summary and committed.exists():  # a new machine (no run folders): never replace a report by an empty one
        sys.exit(f"no run of {a.steps} steps is scored under {a.work}: {committed} is kept; "
                 "`python benchmarks/digits_board.py` trains and scores them (minutes on a CPU)")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info = machine()
    (ablation.RESULTS / f"{stem}.json").write_text(json.dumps(dict(
        meta=dict(command="python benchmarks/digits_board.py", date=date, machine=info, steps=a.steps,
                  n_eval=a.n_eval, seeds=a.seeds), summary=summary, bar=bar, verdicts=judged), indent=1) + "\n")
    lines = [f"# Leaderboard on the built-in digits: 8x8 pixels, unet-tiny, {a.steps} steps, the `digits` preset", "",
             f"- Command: `python benchmarks/digits_board.py --steps {a.steps} --seeds "
             f"{' '.join(map(str, a.seeds))}` ({date}); {info['cpu']}, {info['cpu_cores']} cores",
             f"- FD in pixel space of {a.n_eval} samples to the 1,797 digits (as `slct demo` scores), ramp-up EMA; "
             "mean +- sd over seeds", "", "| entry | NFE | FD | seeds |", "|---|---:|---:|---:|"]
    for s in summary:
        sd = f" +- {s['fd_sd']:.3f}" if len(s["seeds"]) > 1 else ""
        lines.append(f"| {s['entry']} | {s['nfe']} | {s['fd']:.3f}{sd} | {len(s['seeds'])} |")
    if bar:
        lines += ["", f"The bar: {bar['entry']} at {bar['nfe']} NFE, FD {bar['fd']:.3f} (the best many-step "
                  "baseline at <= 35 NFE).", ""]
        for v in judged:
            verdict = {True: "**yes**", False: "no", None: "not decided (fewer than 3 seeds a side)"}[v["beats"]]
            tie = (" (within 2 pooled sd either way)" if v["beats"] is False and v["worse"] is False else
                   " (worse beyond 2 pooled sd)" if v["worse"] else "")
            lines.append(f"- {v['entry']} at {v['nfe']} NFE: FD lower by {v['fd_difference']:.3f} (2 pooled sd "
                         f"{2 * v['pooled_sd']:.3f}): beats the bar by more than 2 pooled sd: {verdict}{tie}")
    return write_report(ablation.RESULTS / f"{stem}.md", lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/slct-digits-board", help="runs (not in the repo)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--entries", nargs="+", default=list(ENTRIES), choices=list(ENTRIES))
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--stage", nargs="+", default=["train", "report"], choices=["train", "report"])
    return p


def main(argv=None) -> None:
    a = parser().parse_args(argv)  # (the caller's environment is left alone: tests call this in-process)
    if "train" in a.stage:
        for seed in a.seeds:  # every entry's first seed before any second: a board stopped early is comparable
            for name in a.entries:
                train_and_score(a, name, seed)
    if "report" in a.stage:
        report(a)


if __name__ == "__main__":
    main()
