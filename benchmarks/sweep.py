"""The tuning sweep at the leaderboard's budget (UTKFace 64 px, TAEF2, `unet-small`, 2,000 steps):
learning rate x beta2 x dropout for each many-step baseline, on one seed, so that the leaderboard's bar is the
baseline at its best and not at settings chosen for the consistency models; and for SoFlow, so that the few-step
method gets the same tuning effort as its bar.

    python benchmarks/sweep.py --print                   # the slct commands, done ones marked
    python benchmarks/sweep.py                           # train and score every point; re-run to continue
    python benchmarks/sweep.py --stage report            # the table from what has been scored

Baselines (``BASELINES``): ``ldm-edm`` (the EDM diffusion baseline with EDM's own recipe: Adam, a 5% learning-rate
ramp-up, no weight decay; scored with its Heun sampler at 35 NFE) and ``fm`` (conditional flow matching, scored with
Heun at 35 NFE as well); and ``soflow``, the few-step method closest to the bar, given the same tuning effort
(scored with its flow map at 2 NFE and ranked there: the NFE its comparison with the bar is made at; its centre is
its preset's point, lr 1e-3, beta2 0.99, dropout 0, whose run is the leaderboard's `soflow` run: one command).
Grid (``GRID``): lr {5e-4, 1e-3, 2e-3, 4e-3} x beta2
{0.99, 0.999} x dropout {0, 0.1}, 16 points a baseline (4e-3 added when 2e-3 won: the best lr must lie inside the
grid), run in ``order()``: the
preset's own point first, then its one-factor neighbours, then the rest, so a sweep stopped early has the most
informative points. Every point is one `slct train` + two `slct eval` (MobileNetV2 FD on --n-eval samples against
the held-out faces, the ramp-up EMA: at 35 NFE, then along the leaderboard's NFE curve 3-17, since at this budget FD
need not fall with NFE and the bar is a baseline's best FD at <= 35 NFE), the same harness as
benchmarks/leaderboard.py (whose data, reference and task runner it uses), so its runs' FD are the leaderboard's.

The best point of each baseline (lowest FD at any NFE scored) is then confirmed on 3 seeds as a leaderboard entry
(``ldm-edm-tuned``, ``fm-tuned`` in benchmarks/leaderboard.py, whose runs are this sweep's: `python
benchmarks/leaderboard.py --entries fm-tuned` reuses seed 0 and trains seeds 1 and 2 beside it); the report says
which point won and by how much over the next. ``--only POINT...`` trains just the named points (a coordinate search instead of the whole grid).
Results: results/sweep-utkface64-KSTEPS.{md,json}. On a new machine (no run folders) the points the committed
report scored at this budget and seed are read from it: neither retrained nor dropped from the table.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import load_sibling, machine  # noqa: E402

ablation = load_sibling("ablation")
leaderboard = load_sibling("leaderboard")

# what is swept: its preset, the NFE it is scored at, and whether it is ranked by its best FD along its NFE curve
# (the bar's rule: a baseline's best FD at <= 35 NFE) or at its scoring NFE alone (a few-step method: the NFE its
# comparisons with the bar are made at); its centre is its preset's own point (``centre``)
BASELINES = {"ldm-edm": dict(preset="ldm-edm", nfe=35, rank_by_best=True),
             "fm": dict(preset="fm", nfe=35, rank_by_best=True),
             # the few-step method given the baselines' tuning effort (its preset: the authors' ImageNet settings);
             # its centre is the leaderboard's `soflow` entry, the same command: that entry's runs are the centre's
             "soflow": dict(preset="soflow", nfe=2, rank_by_best=False, centre_entry="soflow")}
# every point also along an NFE curve: the leaderboard's for the baselines (FD need not fall with NFE at this
# budget; the same file as the leaderboard's tuned entries: scored once), SoFlow's flow map at 1, 4 and 8 steps
CURVE = {"ldm-edm": leaderboard.ENTRIES["ldm-edm"].more_nfe, "fm": leaderboard.ENTRIES["fm"].more_nfe,
         "soflow": (1, *leaderboard.ENTRIES["soflow"].more_nfe)}
GRID = {"lr": [1e-3, 5e-4, 2e-3, 4e-3], "beta2": [0.999, 0.99], "dropout": [0.1, 0.0]}


@dataclass(frozen=True)
class Point:
    baseline: str
    lr: float
    beta2: float
    dropout: float

    @property
    def name(self) -> str:
        return f"{self.baseline}-lr{self.lr:g}-b{self.beta2:g}-do{self.dropout:g}"

    def sets(self) -> list[str]:
        return [f"optim.lr={self.lr!r}", f"optim.betas=[0.9, {self.beta2!r}]", f"network.dropout={self.dropout!r}"]


def centre(baseline: str) -> dict[str, float]:
    """The preset's own point on the grid's axes, read from its resolved config (with the utkface64 data preset)."""
    from slct.config import load_config

    cfg = load_config(BASELINES[baseline]["preset"], "utkface64")
    point = dict(lr=cfg.optim.lr, beta2=cfg.optim.betas[1], dropout=cfg.network.dropout or 0.0)  # None: the net's 0
    assert all(point[k] in GRID[k] for k in GRID), f"{baseline}'s preset point {point} is off the grid"
    return point


def order(baseline: str) -> list[Point]:
    """The grid's points, the centre (the preset's own point) first, then those differing from it in one factor,
    then two, then three."""
    centre_ = centre(baseline)
    points = [Point(baseline, *combo) for combo in itertools.product(*GRID.values())]
    distance = lambda p: sum(getattr(p, k) != centre_[k] for k in GRID)  # noqa: E731
    return sorted(points, key=distance)  # stable: itertools' order within a distance


def run_dir(work: Path, budget: int, point: Point, seed: int) -> Path:
    """The point's run; the centre of a baseline with a ``centre_entry`` is that leaderboard entry's run (trained
    once: its resolved config is the centre's, asserted in the tests)."""
    entry = BASELINES[point.baseline].get("centre_entry")
    if entry and dict(lr=point.lr, beta2=point.beta2, dropout=point.dropout) == centre(point.baseline):
        return work / f"leaderboard-{budget}steps" / f"{entry}-seed{seed}"
    return work / f"sweep-{budget}steps" / f"{point.name}-seed{seed}"


def archived(a) -> dict:
    """Point name -> its row in the committed report of this budget and seed (results/sweep-utkface64-KSTEPS.json):
    a point trained on a machine that is gone is reported from there, neither retrained nor dropped."""
    path = ablation.RESULTS / f"sweep-utkface64-{a.budget}steps.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    if report.get("seed", a.seed) != a.seed:
        return {}
    return {Point(r["baseline"], r["lr"], r["beta2"], r["dropout"]).name: r for r in report.get("rows", [])}


def tasks(a, data: Path, ref: Path) -> list:
    out = []
    points = [[p for p in order(b) if not a.only or p.name in a.only] for b in a.baselines]
    old = archived(a)
    for group in itertools.zip_longest(*points):  # the baselines' points interleaved: both sweeps advance
        for point in filter(None, group):
            run = run_dir(a.work, a.budget, point, a.seed)
            if point.name in old and not run.exists():
                continue
            final = run / f"snapshot-{a.budget:08d}.pt"
            cmd = ["train", "--preset", BASELINES[point.baseline]["preset"], "--data-preset", "utkface64",
                   "--data", str(data), "--out", str(run), "--steps", str(a.budget), "--seed", str(a.seed),
                   "--no-progress", "--set", "train.ema_power_every_steps=0"]
            for s in point.sets():
                cmd += ["--set", s]
            nfe = (BASELINES[point.baseline]["nfe"],)
            out.append(leaderboard.Task(f"{point.name} seed {a.seed}", final, cmd))
            out.append(leaderboard.Task(f"{point.name} seed {a.seed}: eval",
                                        leaderboard.eval_file(run, a.budget, a.n_eval, True, nfe),
                                        leaderboard.eval_command(run, a.budget, ref, a.n_eval, nfe=nfe), (final,)))
            curve = CURVE[point.baseline]
            out.append(leaderboard.Task(f"{point.name} seed {a.seed}: eval at {', '.join(map(str, curve))} NFE",
                                        leaderboard.eval_file(run, a.budget, a.n_eval, True, curve),
                                        leaderboard.eval_command(run, a.budget, ref, a.n_eval, nfe=curve), (final,)))
    return out


def collect(a) -> list[dict]:
    rows = []
    old = archived(a)
    for baseline in a.baselines:
        nfe = BASELINES[baseline]["nfe"]
        for point in order(baseline):
            run = run_dir(a.work, a.budget, point, a.seed)
            path = leaderboard.eval_file(run, a.budget, a.n_eval, True, (nfe,))
            if not run.exists() and point.name in old:
                rows.append({**old[point.name], "curve": {int(k): v for k, v in old[point.name]["curve"].items()}})
                continue
            if not path.exists():
                continue
            result = next(r for r in json.loads(path.read_text())["results"] if r["nfe"] == nfe)
            curve = {nfe: result["fd"]}
            more = leaderboard.eval_file(run, a.budget, a.n_eval, True, CURVE[baseline])
            if more.exists():
                curve.update({r["nfe"]: r["fd"] for r in json.loads(more.read_text())["results"]})
            best_nfe = min(curve, key=curve.get) if BASELINES[baseline]["rank_by_best"] else nfe
            rows.append(dict(baseline=baseline, lr=point.lr, beta2=point.beta2, dropout=point.dropout, nfe=nfe,
                             seed=a.seed, fd=result["fd"], precision=result.get("precision"),
                             recall=result.get("recall"), sec_per_step=leaderboard.seconds_per_step(run),
                             curve=curve, best_fd=curve[best_nfe], best_nfe=best_nfe))
    return rows


def ranked(rows: list[dict], baseline: str) -> list[dict]:
    """The baseline's points, lowest FD first: at any NFE scored (<= 35: the bar's rule), or at its scoring NFE."""
    return sorted((r for r in rows if r["baseline"] == baseline), key=lambda r: r["best_fd"])


def best(rows: list[dict], baseline: str) -> dict | None:
    mine = ranked(rows, baseline)
    return mine[0] if mine else None


def report(a, results: Path) -> Path:
    rows = collect(a)
    stem = f"sweep-utkface64-{a.budget}steps"
    data = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                machine=machine(), budget=a.budget, seed=a.seed, n_eval=a.n_eval, grid=GRID,
                command="python benchmarks/sweep.py", rows=rows,
                best={b: best(rows, b) for b in a.baselines})
    (results / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    m = data["machine"]
    lines = [f"# Tuning sweep (the baselines, and SoFlow given as much): UTKFace 64 px, TAEF2, unet-small, "
             f"{a.budget} steps, seed {a.seed}", "",
             f"- Command: `python benchmarks/sweep.py` (report: `--stage report`); {data['date']}",
             f"- Machine: {m['cpu']}, {m['cpu_cores']} cores, torch {m['torch']}; two runs side by side",
             f"- FD-MobileNetV2 on {a.n_eval} samples against the 5,000 held-out faces, ramp-up EMA, each entry "
             "scored at its NFE (the baselines' Heun samplers at 35, SoFlow's flow map at 2) and along an NFE curve; "
             "one seed (the best point is confirmed on 3 seeds in the leaderboard)",
             f"- Grid: lr {GRID['lr']} x beta2 {GRID['beta2']} x dropout {GRID['dropout']}; "
             f"{len(rows)} of {sum(len(order(b)) for b in a.baselines)} points scored: a coordinate search (the "
             "preset's point, its one-factor neighbours, then the better direction of lr at the better dropout, "
             "`--only`); the points not listed were not run",
             "- s/step is the runs' wall time per step beside other work on a shared machine, not a speed "
             "measurement (benchmarks/compute.py times the steps)", ""]
    for baseline in a.baselines:
        mine = ranked(rows, baseline)
        if not mine:
            lines += [f"## `{baseline}`: no point scored yet (`python benchmarks/sweep.py --baselines {baseline}`)", ""]
            continue
        curve, nfe = CURVE[baseline], BASELINES[baseline]["nfe"]
        point = ", ".join(f"{k} {v:g}" for k, v in centre(baseline).items())
        lines += [f"## `{baseline}` (`--preset {BASELINES[baseline]['preset']}`: {point})", ""]
        if entry := BASELINES[baseline].get("centre_entry"):
            lines += [f"The centre's run is the leaderboard's `{entry}` seed {a.seed} (the same command).", ""]
        lines += [f"| lr | beta2 | dropout | FD at {nfe} NFE | " + " | ".join(f"FD at {k}" for k in curve)
                  + " | best FD (NFE) | precision | recall | s/step |", "|---:" * (8 + len(curve)) + "|"]
        for r in mine:
            sps = f"{r['sec_per_step']:.2f}" if r["sec_per_step"] else "-"
            at = " | ".join(f"{r['curve'][k]:.1f}" if k in r["curve"] else "-" for k in curve)
            lines.append(f"| {r['lr']:g} | {r['beta2']:g} | {r['dropout']:g} | {r['fd']:.1f} | {at} | "
                         f"{r['best_fd']:.1f} ({r['best_nfe']}) | {r['precision']:.3f} | {r['recall']:.3f} | {sps} |")
        if len(mine) >= 2:
            rule = ("best FD at <= 35 NFE, the bar's rule, where their curve is scored, else at 35 NFE)."
                    if BASELINES[baseline]["rank_by_best"] else f"FD at {nfe} NFE).")
            lines += ["", f"Best: lr {mine[0]['lr']:g}, beta2 {mine[0]['beta2']:g}, dropout {mine[0]['dropout']:g} "
                      f"(FD {mine[0]['best_fd']:.1f} at {mine[0]['best_nfe']} NFE; the next point "
                      f"{mine[1]['best_fd'] - mine[0]['best_fd']:.1f} higher; one seed; the points ranked by their "
                      + rule]
        lines.append("")
    out = results / f"{stem}.md"
    out.write_text("\n".join(lines))
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/slct-leaderboard"),
                   help="latents, reference and runs (the leaderboard's: the same data and reference)")
    p.add_argument("--zip", default=str(HERE.parent.parent / "shared" / "data" / "utkface-200px.zip"))
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--holdout", type=int, default=5000)
    p.add_argument("--budget", type=int, default=2000, help="training steps per point (the leaderboard's)")
    p.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=list(BASELINES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", default=[], metavar="POINT",
                   help="train only these points (names as --print shows them, e.g. fm-lr0.0005-b0.999-do0)")
    leaderboard.add_runner_arguments(p)
    return p


def main(argv=None) -> None:
    a = parser().parse_args(argv)
    import os

    names = {p.name for b in a.baselines for p in order(b)}
    if set(a.only) - names:
        sys.exit(f"--only: no such point(s): {', '.join(sorted(set(a.only) - names))} (see --print)")

    threads = a.threads or max(1, (os.cpu_count() or 1) // a.jobs)
    data = a.work / f"utk{a.resolution}-train"
    ref = a.work / f"ref-utk{a.resolution}-holdout{a.holdout}-mobilenetv2.npz"
    if a.print:
        for t in tasks(a, data, ref):
            print(("[done] " if t.done.exists() else "") + "slct " + " ".join(t.args))
        return
    if "data" in a.stage:
        ablation.stage_data(a, a.work)
        ablation.stage_ref(a, a.work)
    failed = leaderboard.run_tasks(tasks(a, data, ref), a.jobs, threads) if "train" in a.stage else 0
    if "report" in a.stage:
        print(f"report: {report(a, ablation.RESULTS)}")
    if failed:
        sys.exit(f"{failed} task(s) failed or could not start (see their logs)")


if __name__ == "__main__":
    main()
