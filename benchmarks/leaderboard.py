"""One equal-budget leaderboard: every few-step method against the `ldm` diffusion baseline at the same total number
of training steps, teacher steps included, on UTKFace 64 px through TAEF2 (`unet-small`, the utkface64 preset).

    python benchmarks/leaderboard.py --print                 # the slct commands, in the order they run
    python benchmarks/leaderboard.py --seeds 0 1 2           # every stage; re-run to continue (runs resume)
    python benchmarks/leaderboard.py --stage report          # the table from what has been evaluated

Entries (``ENTRIES``; K = --budget steps in all, T = --teacher-steps of them spent on the teacher):

- ``ldm``: the EDM diffusion baseline, K steps, scored at its Heun sampler's 35 NFE: the bar to clear;
- ``ilct``, ``slct``, ``meanflow``, ``shortcut``, ``soflow``: K steps from scratch with the preset (the consistency
  models: eq. 10's doubling stopped at N = 81 and the stage-jump remedies, docs/training.md "Stage jumps");
- ``slct-no-remedies``: sLCT with the preset's curriculum and without the remedies; ``slct-n641``: without them and
  with the paper's curriculum end (N up to 641), where its FD declines late; ``slct-n641-stage-robust``: N up to
  641 with the remedies;
- ``ladder-cauchy``, ``ladder-diff``, ``ladder-ot``, ``ladder-adaptive-c``: the paper's Table 2a ladder from iLCT to
  sLCT (each rung adds one part; ``slct`` adds Non-scaling LayerNorm last) with the same preset, rung against rung in
  the report's comparisons: which part costs or gains FD at this budget;
- ``soflow`` is also scored at 4 and 8 NFE (``Entry.more_nfe``): whether its few-step FD comes from the flow
  objective or from the few-step sampler;
- ``norm-layer``: sLCT with a LayerNorm that learns its scale (the paper's Table 2d row): between ``ladder-adaptive-c``
  (GroupNorm) and ``slct`` (the scale fixed at 1), which half of the norm rung costs FD;
- ``meanflow-boundary``: MeanFlow with 10% of its rows at r = 0, t = 1 (``objective.meanflow_boundary_fraction``);
- ``ilct-tuned``: the ``ldm`` run's step-T snapshot as teacher, then iLCT (the same GroupNorm network) for K - T steps from
  its weights (``slct train --init``, consistency tuning); ``slct-tuned``: the same with sLCT's objective (Cauchy
  loss, diffusion loss, OT, adaptive c) on the teacher's GroupNorm network;
- ``ilcd``: iLCT's consistency distillation from the same teacher for K - T steps (``--teacher``), the student from
  scratch; ``ilcd-init``: the same with the student starting as the teacher (``--init`` too), as consistency
  distillation is usually run. They train without the stage-jump remedies (measured before the preset had them).
  Their K - T = 500 steps walk the same four stages (N = 11 ... 81, 125 steps each)
  whether the curriculum ends at N = 81 or 641 (tests/test_curriculum.py), so the preset's cap leaves them unchanged.

The teacher of a seed is the ``ldm`` entry's own snapshot at step T (that run writes one every gcd(T, K/2) steps):
an ``ldm`` run's first T steps do not depend on its length (no curriculum, a step-only learning rate, the ramp-up
EMA counts images), so a separate T-step run would be the same weights, bitwise (tests/test_benchmarks.py checks it on
the digits), and its steps count in the budget of the entries that use it. Each entry's final snapshot is scored
with ``slct eval`` (MobileNetV2 features, --n-eval samples against the held-out faces, the ramp-up EMA) at 1 and 2
NFE (ldm: 35), and every entry trained from scratch also at step K/2, for the curve target (no rise between K/2 and
K beyond the seeds' sd). The report gives FD, precision and recall, mean +- sd over seeds, seconds per training
step, images seen (teacher included), and for every row whether its FD beats the bar's by more than 2 pooled sd (a
verdict only from 3 seeds a side). The bar is the best of the many-step baselines (``ldm``, ``ldm-edm``, ``fm``) at
<= 35 NFE among those scored on 3 seeds (``the_bar``): ``ldm`` at 35 NFE until the tuned baselines have 3 seeds.

Commands run --jobs at a time (default 2: one per core of a 2-core CPU, each with OMP_NUM_THREADS = cores / jobs),
in the order of --entries (the default: the bar and the likeliest winners first), each as soon as what it needs
exists; a stopped leaderboard (Ctrl-C, SIGTERM, a session's end) continues where its runs' checkpoints are. Data,
reference and evaluation are benchmarks/ablation.py's stages; results go to results/leaderboard-utkface64-KSTEPS.*.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import load_sibling, machine, write_report  # noqa: E402

ablation = load_sibling("ablation")  # slct(), the data and reference stages, mean_sd(), the seed rule, figures
GROUP_NORMS = ["network.block_norm=group", "network.out_norm=group"]  # the ldm preset's: a tuned run must match
PAPER_S1 = "objective.s1=640"  # the paper's curriculum end, N = 641 (the utkface64 preset stops at N = 81)
# the stage-jump remedies off (docs/training.md "Stage jumps"; the utkface64 preset has them): for the entries
# measured without them, so their commands stay the runs they were
NO_REMEDIES = ("optim.stage_warmup_steps=0", "optim.grad_scale_beta=0")


@dataclass(frozen=True)
class Entry:
    preset: str
    sets: tuple = ()
    init: bool = False  # start from the teacher's weights (slct train --init)
    distil: bool = False  # distil from the teacher (--teacher)
    more_nfe: tuple = ()  # the final snapshot also at these NFE (beyond the run's own 1 and 2)
    # ... and with an ODE solver of its instantaneous velocity: (solver, NFEs) pairs, rows "NAME@SOLVER"
    ode: tuple = ()
    # a point of benchmarks/sweep.py (its name): the entry's image-matched runs live in the sweep's folder, so the
    # sweep's seed-0 run, the same command, is the entry's seed 0 and seeds 1, 2 lie beside it
    sweep: str = ""

    @property
    def source(self) -> bool:
        """Uses the teacher: its steps count in this entry's budget."""
        return self.init or self.distil

    def own_steps(self, budget: int, teacher_steps: int) -> int:
        return budget - teacher_steps if self.source else budget


# in the order they run: the bar, the likeliest winners (from the bar's own weights), the paper's pair, the rest
ENTRIES: dict[str, Entry] = {
    "ldm": Entry("ldm", more_nfe=(3, 5, 9, 17)),  # the bar, also along its NFE curve (35 NFE: the run's default)
    "ilct-tuned": Entry("ilct", (*GROUP_NORMS, *NO_REMEDIES), init=True),
    "ilcd": Entry("ilcd", NO_REMEDIES, distil=True),  # the student from scratch
    "slct-tuned": Entry("slct", (*GROUP_NORMS, *NO_REMEDIES), init=True),  # the paper's technique, tuning from ldm
    "ilcd-init": Entry("ilcd", NO_REMEDIES, distil=True, init=True),  # the student starts as the teacher
    "slct-n641": Entry("slct", (PAPER_S1, *NO_REMEDIES)),  # eq. 10's doubling up to N = 641: the late decline
    "slct-n641-stage-robust": Entry("slct", (PAPER_S1,)),  # the same with the preset's remedies
    "slct-no-remedies": Entry("slct", NO_REMEDIES),  # the preset's curriculum (N up to 81) without the remedies
    "slct": Entry("slct"),  # the preset: N up to 81 and the remedies
    # also at 4 and 8 NFE: whether its few-step FD is the flow objective's or the few-step sampler's
    "soflow": Entry("soflow", more_nfe=(4, 8), ode=(("heun", (2, 4, 8, 17, 35)),)),
    "ilct": Entry("ilct"),
    # Table 2a's ladder from ilct to slct with the preset (N up to 81, the remedies): which of sLCT's parts costs FD
    # at this budget (target 2; ladder-adaptive-c is slct with iLCT's GroupNorm)
    **{name: Entry(name) for name in ("ladder-cauchy", "ladder-diff", "ladder-ot", "ladder-adaptive-c")},
    "meanflow": Entry("meanflow"),
    "shortcut": Entry("shortcut"),
    # slct with LayerNorm that learns its scale: does NsLN's cost (target 2) come from LayerNorm or its fixed scale?
    "norm-layer": Entry("norm-layer"),
    # MeanFlow with 10% of its rows at the widest interval (r = 0, t = 1): the 1-step sampler's own case
    "meanflow-boundary": Entry("meanflow", ("objective.meanflow_boundary_fraction=0.1",)),
    # the many-step baselines at their best (issue: baselines at their best): EDM's own recipe and flow matching,
    # each at its preset (the sweep's centre point: benchmarks/sweep.py) and scored along an NFE curve
    # consistency distillation as published (Song et al. 2023's CD): the student starts as the teacher, an EMA target
    # network (mu = 0.95, openai's), a fixed N = 18 (their ImageNet/LSUN setting), lr 1e-4 (their 8e-6..4e-4 at
    # batch 2,048..512); without the stage-jump remedies, as ilct-tuned and the other distilled entries
    "ilcd-published": Entry("ilcd", (*NO_REMEDIES, "objective.target_ema=0.95", "objective.s0=17",
                                     "objective.s1=17", "optim.lr=1e-4"), distil=True, init=True),
    "ldm-edm": Entry("ldm-edm", more_nfe=(3, 5, 9, 17)),
    "fm": Entry("fm", more_nfe=(3, 5, 9, 17)),
    # the sweep's best point of each (benchmarks/sweep.py, chosen on seed 0) confirmed on 3 seeds; its sets in the
    # sweep's order so the command is the sweep's (a test holds them equal)
    "ldm-edm-tuned": Entry("ldm-edm", ("optim.lr=0.002", "optim.betas=[0.9, 0.999]", "network.dropout=0.0"),
                           more_nfe=(3, 5, 9, 17), sweep="ldm-edm-lr0.002-b0.999-do0"),
    # (fm also at 2 and 4 NFE: against the few-step models at their own NFE; its FD is lowest near 5 NFE here; and
    # with Euler, whose 2-4 NFE beat Heun's: fm's best few-NFE sampler)
    "fm-tuned": Entry("fm", ("optim.lr=0.002", "optim.betas=[0.9, 0.999]", "network.dropout=0.0"),
                      more_nfe=(2, 3, 4, 5, 9, 17), ode=(("euler", (2, 3, 4, 5)),), sweep="fm-lr0.002-b0.999-do0"),
}


@dataclass
class Plan:
    """Where everything of one leaderboard lives, and the commands that make it."""

    work: Path
    budget: int
    teacher_steps: int
    seeds: list = field(default_factory=list)
    # --match seconds: entry -> seconds per step measured in the image-matched board (the same machine and jobs side
    # by side); each entry then trains for the seconds ldm's budget took instead of the same number of images
    seconds: dict | None = None

    @property
    def root(self) -> Path:
        return self.work / f"leaderboard-{self.budget}steps{'-seconds' if self.seconds else ''}"

    @property
    def stem(self) -> str:
        return f"leaderboard-utkface64-{self.budget}steps{'-seconds' if self.seconds else ''}"

    def own_steps(self, name: str) -> int:
        """The entry's own training steps: the budget less the teacher's (image-matched), or with ``seconds`` the
        steps that fit in ldm's budget time, the teacher's time taken out first (wall-clock-matched). The many-step
        baselines keep their budget either way: they are the clock (their steps cost ldm's to within 4%, compute.py),
        so the wall-clock board judges the few-step models against the same bar runs as the image-matched one."""
        entry = ENTRIES[name]
        if self.seconds is None or name in BASELINES:
            return entry.own_steps(self.budget, self.teacher_steps)
        bar = self.seconds["ldm"]
        left = (self.budget - (self.teacher_steps if entry.source else 0)) * bar
        return max(1, round(left / self.seconds[name]))

    @property
    def mid(self) -> int:
        """The curve's middle point (the target: no rise from here to the budget beyond the seeds' sd)."""
        return self.budget // 2

    def run(self, name: str, seed: int) -> Path:
        """The run's folder; a wall-clock-matched run of as many steps as the image-matched one is that run, and an
        image-matched run of a sweep point is the sweep's run (``Entry.sweep``)."""
        entry = ENTRIES[name]
        if self.seconds is None or self.own_steps(name) == entry.own_steps(self.budget, self.teacher_steps):
            if entry.sweep:
                return self.work / f"sweep-{self.budget}steps" / f"{entry.sweep}-seed{seed}"
            return self.work / f"leaderboard-{self.budget}steps" / f"{name}-seed{seed}"
        return self.root / f"{name}-seed{seed}"

    def teacher(self, seed: int) -> Path:
        """The ldm entry's snapshot at the teacher's step (its first T steps are a T-step ldm run's)."""
        return self.run("ldm", seed) / f"snapshot-{self.teacher_steps:08d}.pt"


@dataclass
class Task:
    """One slct command: done when ``done`` exists, ready when every path in ``needs`` does."""

    what: str
    done: Path
    args: list
    needs: tuple = ()

    @property
    def log(self) -> Path:
        return self.done.parent / "leaderboard.log"


def train_command(plan: Plan, name: str, seed: int, data: Path) -> list[str]:
    entry = ENTRIES[name]
    steps = plan.own_steps(name)
    cmd = ["train", "--preset", entry.preset, "--data-preset", "utkface64", "--data", str(data),
           "--out", str(plan.run(name, seed)), "--steps", str(steps), "--seed", str(seed), "--no-progress",
           "--set", "train.ema_power_every_steps=0"]
    if name == "ldm":  # the teacher's snapshot and the curve's middle point
        cmd += ["--set", f"checkpoint.snapshot_every_steps={math.gcd(plan.teacher_steps, plan.mid)}"]
    for extra in entry.sets:
        cmd += ["--set", extra]
    if entry.init:
        cmd += ["--init", str(plan.teacher(seed))]
    if entry.distil:
        cmd += ["--teacher", str(plan.teacher(seed))]
    return cmd


def eval_file(run: Path, step: int, n: int, final: bool, nfe: tuple = (), solver: str | None = None) -> Path:
    more = "".join(f"-nfe{k}" for k in nfe) + (f"-{solver}" if solver else "")  # beyond the run's own NFE, sampler
    return run / (f"eval-final-n{n}{more}.json" if final else f"eval-step{step:08d}-n{n}{more}.json")


def eval_command(run: Path, step: int, ref: Path, n: int, final: bool = True, nfe: tuple = (),
                 solver: str | None = None) -> list[str]:
    return ["eval", "--snapshot", str(run / f"snapshot-{step:08d}.pt"), "--ref", str(ref), "--n", str(n),
            "--out", str(eval_file(run, step, n, final, nfe, solver)), "--no-progress", "--ema", "rampup",
            *(["--nfe", *map(str, nfe)] if nfe else []), *(["--solver", solver] if solver else [])]


def tasks(plan: Plan, a, data: Path, ref: Path) -> list[Task]:
    """Every command, in the order they start: entry by entry (--entries' order), seed by seed, a run then its
    evaluations (with --seed-first: seed by seed, entry by entry, so a board stopped early has every entry's first
    seed). The teacher is the ldm run: listed first whenever an entry needs it."""
    names = list(a.entries)
    if any(ENTRIES[n].source for n in names) and "ldm" not in names:
        names.insert(0, "ldm")
    # runs trained on a machine that is gone and reported from the archive (collect): neither retrained nor rescored,
    # except a teacher that a run still to train needs
    archived = {(r["entry"].split("@")[0], r["seed"], r.get("own_steps")) for r in archived_rows(a)}
    gone = {(name, seed) for name in names for seed in plan.seeds if not plan.run(name, seed).exists()
            and {(name, seed, plan.own_steps(name)), (name, seed, None)} & archived}
    gone -= {("ldm", seed) for seed in plan.seeds
             if any(ENTRIES[n].source and (n, seed) not in gone for n in names)}
    groups = []  # (seed, the run's tasks)
    for name in names:
        steps = plan.own_steps(name)
        for seed in plan.seeds:
            if (name, seed) in gone:
                continue
            run = plan.run(name, seed)
            final = run / f"snapshot-{steps:08d}.pt"
            needs = (plan.teacher(seed),) if ENTRIES[name].source else ()
            group = [Task(f"{name} seed {seed}", final, train_command(plan, name, seed, data), needs)]
            groups.append((seed, group))
            if name not in a.entries:  # only the teacher's run
                continue
            group.append(Task(f"{name} seed {seed}: eval", eval_file(run, steps, a.n_eval, True),
                              eval_command(run, steps, ref, a.n_eval), (final,)))
            more = ENTRIES[name].more_nfe
            if more:
                group.append(Task(f"{name} seed {seed}: eval at {', '.join(map(str, more))} NFE",
                                  eval_file(run, steps, a.n_eval, True, more),
                                  eval_command(run, steps, ref, a.n_eval, nfe=more), (final,)))
            for solver, ode in ENTRIES[name].ode:
                group.append(Task(f"{name} seed {seed}: eval with {solver.capitalize()} at {', '.join(map(str, ode))}"
                                  " NFE", eval_file(run, steps, a.n_eval, True, ode, solver),
                                  eval_command(run, steps, ref, a.n_eval, nfe=ode, solver=solver), (final,)))
            # after the run: its middle snapshot is there by then; ldm also where it serves as the teacher
            middles = [plan.mid] if steps == plan.budget else []
            if name == "ldm" and any(ENTRIES[n].source for n in names):
                middles.append(plan.teacher_steps)
            for step in middles:
                group.append(Task(f"{name} seed {seed}: eval at step {step}", eval_file(run, step, a.n_eval, False),
                                  eval_command(run, step, ref, a.n_eval, final=False), (final,)))
    if a.seed_first:
        groups.sort(key=lambda g: plan.seeds.index(g[0]))  # stable: entries keep their order within a seed
    return [task for _, group in groups for task in group]


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_tasks(todo: list[Task], jobs: int, threads: int) -> int:
    """Run the tasks not done yet, ``jobs`` at a time, each as soon as its needs exist; a failed run's dependents
    never start. Ctrl-C or SIGTERM stops the running commands the way they stop alone (a training run writes its
    checkpoint first), so re-running continues. Returns the number of tasks that failed or could not start."""
    pending = [t for t in todo if not t.done.exists()]
    running: dict[subprocess.Popen, Task] = {}
    failed: list[Task] = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    signal.signal(signal.SIGTERM, _interrupt)  # a session's end stops the runs as Ctrl-C does
    try:
        while pending or running:
            for task in [t for t in pending if all(n.exists() for n in t.needs)]:
                if task.done.exists():  # made meanwhile (a board sharing the run, or by hand): not run twice
                    pending.remove(task)
                    print(f"== {task.what}: done meanwhile", flush=True)
                    continue
                if len(running) >= jobs:
                    break
                pending.remove(task)
                task.log.parent.mkdir(parents=True, exist_ok=True)
                print(f"== {task.what}: $ slct {shlex.join(task.args)}", flush=True)
                with open(task.log, "a") as log:
                    running[subprocess.Popen(ablation.slct(*task.args), stdout=log, stderr=subprocess.STDOUT,
                                             env=env)] = task
            if not running:  # nothing runs and nothing can start: what is left waits on a failed task
                failed += pending
                for task in pending:
                    print(f"!! {task.what}: not started (needs {', '.join(map(str, task.needs))})", flush=True)
                break
            time.sleep(2)
            for proc in [p for p in running if p.poll() is not None]:
                task = running.pop(proc)
                if proc.returncode or not task.done.exists():
                    failed.append(task)
                    print(f"!! {task.what}: exit {proc.returncode}; see {task.log}", flush=True)
                else:
                    print(f"ok {task.what}", flush=True)
    except KeyboardInterrupt:
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        for proc in running:
            proc.wait()
        print("stopped; re-run the same command to continue", flush=True)
        raise SystemExit(130)
    return len(failed)


def add_runner_arguments(p: argparse.ArgumentParser) -> None:
    """The options of every board that scores its runs and runs them through run_tasks (this one, sweep.py,
    premise.py): one definition, so --jobs or --stage mean the same in each."""
    p.add_argument("--n-eval", type=int, default=1000, help="samples scored per evaluation")
    p.add_argument("--jobs", type=int, default=2, help="commands side by side")
    p.add_argument("--threads", type=int, default=0, help="threads per command (0: the cores / --jobs)")
    p.add_argument("--stage", nargs="+", default=["data", "train", "report"], choices=["data", "train", "report"])
    p.add_argument("--print", action="store_true", help="list the commands (done ones marked) and exit")


def seconds_per_step(run: Path) -> float | None:
    """The median over the run's logging windows: a window that held a pause (SIGSTOP, a stop and resume, a
    machine shared for a while) is an outlier the mean would carry (the 8,000-step fm-tuned run: mean 1.26, median
    0.97 s/step); windows of an undisturbed run agree within a few percent, so there median and mean coincide."""
    rows = [json.loads(line) for line in open(run / "metrics.jsonl") if '"sec_per_step"' in line] \
        if (run / "metrics.jsonl").exists() else []
    return statistics.median(r["sec_per_step"] for r in rows) if rows else None


def collect(plan: Plan, a, here: str = "this machine") -> list[dict]:
    """One row per (entry, seed, NFE, step) evaluated: the final step and, for runs from scratch, the middle one
    (and for ldm the teacher's step). ``here`` ("CPU, date") is where the runs in --work trained: each row says where,
    so a report that later archives them still times them on their own machine."""
    rows = []
    archive = archived_rows(a)
    for name in a.entries:
        entry = ENTRIES[name]
        own = plan.own_steps(name)
        for seed in plan.seeds:
            run = plan.run(name, seed)
            if not run.exists():  # trained on a machine that is gone: its rows as the --archive report holds them
                rows += [{**r, "archived": True} for r in archive  # (a run of as many steps: the same run)
                         if r["entry"].split("@")[0] == name and r["seed"] == seed
                         and r.get("own_steps", own) == own]
                continue
            teacher = plan.teacher_steps if entry.source else 0
            speed = seconds_per_step(run)  # once per run, not per evaluated row
            evaluated = [(step, step == own, eval_file(run, step, a.n_eval, step == own), name)
                         for step in dict.fromkeys((own, plan.mid, plan.teacher_steps))]
            if entry.more_nfe:
                evaluated.append((own, True, eval_file(run, own, a.n_eval, True, entry.more_nfe), name))
            for solver, ode in entry.ode:
                evaluated.append((own, True, eval_file(run, own, a.n_eval, True, ode, solver), f"{name}@{solver}"))
            for step, final, path, label in evaluated:
                if not path.exists():
                    continue
                for r in json.loads(path.read_text())["results"]:
                    rows.append(dict(entry=label, seed=seed, nfe=r["nfe"], step=step, final=final, fd=r["fd"],
                                     precision=r.get("precision"), recall=r.get("recall"), own_steps=own,
                                     teacher_steps=teacher, images=(own + teacher) * a.batch,
                                     sec_per_step=speed, trained_on=here))
    return rows


def archive_note(rows: list[dict], a) -> list[str]:
    """Which rows come from an archived report, and on what machine those runs trained (their s/step is its)."""
    entries = sorted({r["entry"] for r in rows if r.get("archived")})
    if not entries:
        return []
    where = "; ".join(sorted({r["trained_on"] for r in rows if r.get("archived")}))
    return [f"- Runs whose folders are gone are reported from the archived report ({where}): "
            f"{', '.join(entries)}; their s/step is that machine's"]


def archives(a) -> list[Path]:
    """The default: this board's committed report; the wall-clock board's also reads the image-matched one, whose
    runs of as many steps (the baselines') are its runs too."""
    default = [ablation.RESULTS / f"leaderboard-utkface64-{a.budget}steps.json"]
    if getattr(a, "match", "images") == "seconds":
        default.insert(0, ablation.RESULTS / f"leaderboard-utkface64-{a.budget}steps-seconds.json")
    return [Path(p) for p in (default if getattr(a, "archive", None) is None else a.archive)]


def archived_rows(a) -> list[dict]:
    """The run rows of the ``--archive`` reports (committed leaderboard JSONs of this budget), the first report
    that holds a run winning: a run whose folder is gone (a new machine) is reported from there, not dropped."""
    out, seen = [], set()
    for path in archives(a):
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        meta = report.get("meta", {})
        origin = f"{meta.get('machine', {}).get('cpu', 'an earlier machine')}, {meta.get('date', 'earlier')}"
        for r in report.get("runs", []):
            if (r["entry"], r["seed"], r["nfe"], r["step"]) not in seen:
                out.append({"trained_on": origin, **r})  # a row archived twice keeps where it first ran
        seen |= {(r["entry"], r["seed"], r["nfe"], r["step"]) for r in out}
    return out


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["entry"], r["nfe"], r["step"]) for r in rows):
        mine = [r for r in rows if (r["entry"], r["nfe"], r["step"]) == key]
        entry = dict(entry=key[0], nfe=key[1], step=key[2], final=mine[0]["final"],
                     seeds=sorted(r["seed"] for r in mine), own_steps=mine[0]["own_steps"],
                     teacher_steps=mine[0]["teacher_steps"], images=mine[0]["images"])
        for k in ("fd", "precision", "recall"):
            vals = [r[k] for r in mine if r[k] is not None]
            if vals:
                entry[k], entry[f"{k}_sd"] = ablation.mean_sd(vals)
        entry.update(seconds_by_machine(mine))
        out.append(entry)
    return out


def cpu_of(row: dict) -> str:
    return row.get("trained_on", "an earlier machine").split(", ")[0]  # "CPU, date" -> CPU


def seconds_by_machine(rows: list[dict]) -> dict:
    """s/step is a property of the run AND its machine: seeds trained on different CPUs are averaged per CPU, never
    together (`sec_per_step_by_machine`: CPU -> [mean, sd, seeds]). `sec_per_step` (+ `_sd`) is that of the CPU that
    timed the most seeds, for the readers that want one number (the wall-clock board's fallback)."""
    by_cpu: dict[str, list[float]] = {}
    for r in rows:
        if r.get("sec_per_step") is not None:
            by_cpu.setdefault(cpu_of(r), []).append(r["sec_per_step"])
    if not by_cpu:
        return {}
    table = {cpu: [*ablation.mean_sd(v), len(v)] for cpu, v in by_cpu.items()}
    mean, sd, _ = max(table.values(), key=lambda m: m[2])
    return dict(sec_per_step=mean, sec_per_step_sd=sd, sec_per_step_by_machine=table)


def machine_tags(summary: list[dict]) -> dict[str, str]:
    """A short tag per CPU that timed a row of the table (its initial, or a number where two share one)."""
    tags: dict[str, str] = {}
    for e in summary:
        for cpu in e.get("sec_per_step_by_machine", {}):
            if cpu not in tags:
                tag = cpu[:1].upper() or "?"
                tags[cpu] = tag if tag not in tags.values() else str(len(tags) + 1)
    return tags


def seconds_cell(e: dict, tags: dict[str, str]) -> str:
    """e.g. `0.38 +- 0.01 (I)`, or `0.65 (I) / 0.88 +- 0.00 (A)` for an entry whose seeds trained on two CPUs."""
    cells = [f"{m:.2f}" + (f" +- {sd:.2f}" if n > 1 else "") + (f" ({tags[cpu]})" if len(tags) > 1 else "")
             for cpu, (m, sd, n) in e.get("sec_per_step_by_machine", {}).items()]
    return " / ".join(cells) or "-"


# the questions the board answers besides "does it beat ldm": (better?, than), each at every NFE both were scored at
PAIRS = [("slct-n641-stage-robust", "slct-n641"), ("slct-no-remedies", "slct-n641"), ("slct", "slct-no-remedies"),
         ("slct", "slct-n641-stage-robust"), ("slct", "ilct"), ("meanflow-boundary", "meanflow"),
         # the ladder, rung by rung (a negative difference: the rung costs FD)
         ("ladder-cauchy", "ilct"), ("ladder-diff", "ladder-cauchy"), ("ladder-ot", "ladder-diff"),
         ("ladder-adaptive-c", "ladder-ot"), ("slct", "ladder-adaptive-c"),
         # every loss-side part of sLCT at once, without NsLN; and those after the Cauchy loss
         ("ladder-adaptive-c", "ilct"), ("ladder-adaptive-c", "ladder-cauchy"),
         # the norm rung split in two: GroupNorm -> LayerNorm over (C, H, W) -> its scale fixed at 1 (NsLN)
         ("norm-layer", "ladder-adaptive-c"), ("slct", "norm-layer"),
         # the objectives beyond the paper, from scratch on the same network and latents
         ("soflow", "meanflow"), ("soflow", "shortcut"), ("meanflow", "shortcut"), ("meanflow", "slct"),
         # distillation as published against tuning and the earlier distillation settings
         ("ilcd-published", "ilct-tuned"), ("ilcd-published", "ilcd-init"),
         # the baselines at their best against the bar as it was
         ("ldm-edm", "ldm"), ("fm", "ldm"), ("fm", "ldm-edm"),
         ("ldm-edm-tuned", "ldm-edm"), ("fm-tuned", "fm"), ("fm-tuned", "ldm-edm-tuned"),
         # fm's two solvers at its few NFE, and SoFlow's 2 steps against fm's best at as many NFE
         ("fm-tuned@euler", "fm-tuned"), ("soflow", "fm-tuned@euler"), ("soflow", "fm-tuned")]


VERDICT = {True: "yes", False: "no", None: "not decided (fewer than 3 seeds a side)"}


# the many-step baselines; the bar is the best of them (below)
BASELINES = ("ldm", "ldm-edm", "fm", "ldm-edm-tuned", "fm-tuned")


def the_bar(final: list[dict]) -> tuple[dict | None, list[dict]]:
    """(the bar, its NFE curve): of the baselines' final rows at <= 35 NFE scored on 3 seeds, the lowest mean FD; with
    none of them on 3 seeds yet, ldm at its own sampler's 35 NFE (the board's bar before the tuned baselines)."""
    rows = [s for s in final if s["entry"] in BASELINES and s["nfe"] <= 35 and "fd" in s]
    ready = [s for s in rows if len(s["seeds"]) >= ablation.MIN_SEEDS_FOR_VERDICT]
    ldm = sorted((s for s in rows if s["entry"] == "ldm"), key=lambda s: s["nfe"])
    bar = min(ready, key=lambda s: s["fd"]) if ready else (ldm[-1] if ldm else None)
    curve = sorted((s for s in rows if bar is not None and s["entry"] == bar["entry"]), key=lambda s: s["nfe"])
    return bar, curve


def verdicts(summary: list[dict]) -> list[dict]:
    """Each row against the bar (``the_bar``): lower by more than 2 pooled sd (3 seeds a side)? The baselines' own
    rows are judged too except the bar's entry."""
    final = [s for s in summary if s["final"]]
    bar, curve = the_bar(final)
    if bar is None:
        return []
    out = []
    for s in final:
        if s["entry"] == bar["entry"] or "fd" not in s:
            continue
        diff, pooled, verdict = ablation.beats(s, bar)
        worse = ablation.beats(bar, s)[2]  # the other side of the same rule: a tie is neither
        out.append(dict(entry=s["entry"], nfe=s["nfe"], fd_difference=diff, pooled_sd=pooled, bar=bar["entry"],
                        ldm_nfe=bar["nfe"], seeds=min(len(s["seeds"]), len(bar["seeds"])),
                        beats_ldm_by_2_pooled_sd=verdict, worse_than_ldm_by_2_pooled_sd=worse,
                        # the fewest NFE of the bar's curve at which its mean FD is as low as this row's (None: lower
                        # than the bar's at every NFE scored)
                        ldm_nfe_matched=next((b["nfe"] for b in curve if b["fd"] <= s["fd"]), None),
                        bar_nfe_fewest=curve[0]["nfe"] if curve else None))
    return out


def comparisons(summary: list[dict]) -> list[dict]:
    """The PAIRS at their final steps, NFE by NFE, where both entries have been scored."""
    final = {(s["entry"], s["nfe"]): s for s in summary if s["final"] and "fd" in s}
    out = []
    for better, than in PAIRS:
        for nfe in sorted({n for e, n in final if e == better}):
            if (than, nfe) in final:
                diff, pooled, verdict = ablation.beats(final[(better, nfe)], final[(than, nfe)])
                out.append(dict(better=better, than=than, nfe=nfe, fd_difference=diff, pooled_sd=pooled,
                                seeds=min(len(final[(better, nfe)]["seeds"]), len(final[(than, nfe)]["seeds"])),
                                beats_by_2_pooled_sd=verdict))
    return out


def curve_checks(plan: Plan, summary: list[dict]) -> list[dict]:
    """The curve target for every entry evaluated at both points: does the mean FD rise from the middle step to the
    last by more than the seeds' sd at the last step (3 seeds at both points)?"""
    out = []
    for last in [s for s in summary if s["final"] and "fd" in s]:
        middle = [s for s in summary if (s["entry"], s["nfe"], s["step"]) == (last["entry"], last["nfe"], plan.mid)]
        if not middle or "fd" not in middle[0]:
            continue
        mid = middle[0]
        enough = min(len(mid["seeds"]), len(last["seeds"])) >= ablation.MIN_SEEDS_FOR_VERDICT
        rise = last["fd"] - mid["fd"]
        out.append(dict(entry=last["entry"], nfe=last["nfe"], mid_step=mid["step"], step=last["step"],
                        fd_mid=mid["fd"], fd_last=last["fd"], rise=rise, sd=last["fd_sd"],
                        rises_beyond_sd=rise > last["fd_sd"] if enough else None))
    return out


def stage_rows(plan: Plan, a) -> list[dict]:
    """The runs' per-stage diagnostics (metrics.jsonl ``stage`` rows, one per curriculum stage N): the median
    gradient norm of the loss as the objective gives it and the largest logged Adam step, averaged over the seeds
    that logged that stage (a run stopped and resumed logs the part of the stage after the resume)."""
    out = []
    for name in a.entries:
        by_n: dict[int, list[dict]] = {}
        for seed in plan.seeds:
            metrics = plan.run(name, seed) / "metrics.jsonl"
            if not metrics.exists():
                continue
            mine = {}  # N -> the run's last row for it
            for line in open(metrics):
                if '"stage_n_scales"' in line:
                    row = json.loads(line)
                    mine[int(row["stage_n_scales"])] = row
            for n, row in mine.items():
                by_n.setdefault(n, []).append(row)
        for n, rows in sorted(by_n.items()):
            adam = [r["adam_step_rms_max"] for r in rows if "adam_step_rms_max" in r]
            out.append(dict(entry=name, n_scales=n, seeds=len(rows),
                            grad_norm_median=sum(r["grad_norm_median"] for r in rows) / len(rows),
                            adam_step_rms_max=sum(adam) / len(adam) if adam else None))
    have = {r["entry"] for r in out}
    for path in archives(a):  # entries without a run here: their stage rows as archived
        if path.exists():
            old_rows = [r for r in json.loads(path.read_text()).get("stages", [])
                        if r["entry"] in a.entries and r["entry"] not in have]
            out += old_rows
            have |= {r["entry"] for r in old_rows}
    return out


def figures(plan: Plan, a, rows: list[dict], results: Path, stem: str, shown: list[str]) -> list[str]:
    """The sample grids of every entry's first seed and the FD curves (steps counted with the teacher's). ``shown``:
    the entries the committed grid holds; it is redrawn only when this machine has the snapshots of more of them
    (a board filled in over several sessions, or several machines, keeps its fullest grid). Returns the entries the
    grid now holds."""
    named = [(name, plan.run(name, plan.seeds[0]) /
              f"snapshot-{plan.own_steps(name):08d}.pt") for name in a.entries]
    have = [(n, p) for n, p in named if p.exists()]
    grid = results / f"{stem}-samples.jpg"
    if have and (not grid.exists() or {n for n, _ in have} > set(shown) or len(have) == len(named)):
        ablation.snapshot_grids(have, "rampup", grid)
        shown = [n for n, _ in have]
    ablation.figure_curves([dict(method=r["entry"], nfe=r["nfe"], n=a.n_eval, step=r["teacher_steps"] + r["step"],
                                 fd=r["fd"]) for r in rows if r["nfe"] in (1, 35)], results / f"{stem}-curves.png")
    return shown


def two_sd(v: dict) -> str:
    """2 pooled sd of a verdict, where both sides have an sd (one seed has none)."""
    return f"2 pooled sd {2 * v['pooled_sd']:.1f}" if v["seeds"] > 1 else "one seed: no sd"


def pm(e: dict, k: str, f: str) -> str:
    if k not in e:
        return "-"
    return f"{e[k]:{f}}" + (f" +- {e[k + '_sd']:{f}}" if len(e["seeds"]) > 1 else "")


def compute_lines(path: Path, entries) -> list[str]:
    """The counted cost per step of the board's entries (benchmarks/compute.py's result), if it has been made."""
    if not path.exists():
        return []
    rows = {r["entry"]: r for r in json.loads(path.read_text())["rows"]}
    base = rows.get("ldm", {}).get("gflop_per_image")
    timed = any("sec_per_step" in r for r in rows.values())
    out = ["Cost per training step (`python benchmarks/compute.py`, [its report](compute-utkface64.md)): backbone "
           "rows per image with and without gradient, GFLOP per image (forward + backward), the ratio to ldm's"
           + (", and the median step time of the entries timed in turn on one machine" if timed else "") + ":", "",
           "| entry | rows with grad | rows without grad | GFLOP / image | x ldm |" + (" ms / step |" if timed else ""),
           "|---|---:|---:|---:|---:|" + ("---:|" if timed else "")]
    for name in (e for e in entries if e in rows):
        r = rows[name]
        ratio = f"{r['gflop_per_image'] / base:.2f}" if base else "-"
        ms = (f" {1000 * r['sec_per_step']:.0f} |" if "sec_per_step" in r else " - |") if timed else ""
        out.append(f"| {name} | {r['grad_rows_per_image']:.2f} | {r['no_grad_rows_per_image']:.2f} | "
                   f"{r['gflop_per_image']:.3f} | {ratio} |" + ms)
    return out + [""]


def report(plan: Plan, a, results: Path) -> Path:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info = machine()
    rows = collect(plan, a, here=f"{info['cpu']}, {date}")
    summary = summarize(rows)
    tags = machine_tags([e for e in summary if e["final"]])
    judged, curves, stages = verdicts(summary), curve_checks(plan, summary), stage_rows(plan, a)
    pairs = comparisons(summary)
    stem = plan.stem
    command = shlex.join(["python", "benchmarks/leaderboard.py", *sys.argv[1:]])
    results.mkdir(exist_ok=True)
    before = json.loads((results / f"{stem}.json").read_text())["meta"] if (results / f"{stem}.json").exists() else {}
    # a report from before the grid's entries were recorded drew its grid only once it had every entry
    shown = figures(plan, a, rows, results, stem, before.get("sample_grid", list(before.get("entries", {}))))
    (results / f"{stem}.json").write_text(json.dumps(dict(
        meta=dict(command=command, date=date, machine=info, budget=plan.budget, teacher_steps=plan.teacher_steps,
                  n_eval=a.n_eval, jobs=a.jobs, entries={k: vars(ENTRIES[k]) for k in a.entries},
                  sample_grid=shown),
        summary=summary, verdicts=judged, curves=curves, comparisons=pairs, stages=stages, runs=rows), indent=2,
        default=list) + "\n")
    title = (f"# Equal-budget leaderboard: UTKFace 64 px, TAEF2, unet-small, {plan.budget} steps in all"
             if plan.seconds is None else
             f"# Wall-clock-matched leaderboard: UTKFace 64 px, TAEF2, unet-small, each entry trained for the seconds "
             f"ldm's {plan.budget} steps took ({plan.budget * plan.seconds['ldm'] / 60:.0f} min at "
             f"{plan.seconds['ldm']:.2f} s/step, the teacher's share included)")
    lines = [title, "",
             f"- Machine: {info['cpu']}, {info['cpu_cores']} cores, torch {info['torch']}; {a.jobs} runs side by "
             "side, each on its share of the cores (s/step is per run: the median over its logging windows, so a pause "
             "does not inflate it)",
             f"- Command: `{command}` ({date})",
             f"- FD-MobileNetV2 of {a.n_eval} samples against the held-out faces, ramp-up EMA; teacher: the ldm run at "
             f"step {plan.teacher_steps}, counted in the budget of the entries that use it",
             *archive_note(rows, a), "",
             "| entry | NFE | FD | precision | recall | own + teacher steps | images | s/step | seeds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in (s for s in summary if s["final"]):
        lines.append(f"| {e['entry']} | {e['nfe']} | {pm(e, 'fd', '.1f')} | {pm(e, 'precision', '.3f')} | "
                     f"{pm(e, 'recall', '.4f')} | {e['own_steps']} + {e['teacher_steps']} | {e['images']:,} | "
                     f"{seconds_cell(e, tags)} | {len(e['seeds'])} |")
    lines.append("")
    if len(tags) > 1:
        lines += ["s/step per machine, averaged over the seeds each timed: "
                  + ", ".join(f"({t}) {cpu}" for cpu, t in tags.items())
                  + ". Step times from different machines are not comparable; the cost table below times the "
                    "entries in turn on one machine.", ""]
    lines += compute_lines(results / "compute-utkface64.json", a.entries)
    for t in (s for s in summary if s["entry"] == "ldm" and s["step"] == plan.teacher_steps and "fd" in s):
        lines += [f"- The teacher itself (ldm at step {t['step']}, {t['nfe']} NFE): FD {pm(t, 'fd', '.1f')} "
                  f"({len(t['seeds'])} seeds)"]
    for v in judged:
        verdict = VERDICT[v["beats_ldm_by_2_pooled_sd"]]
        tie = " (within 2 pooled sd either way: at the bar's FD)" if v["worse_than_ldm_by_2_pooled_sd"] is False \
            and v["beats_ldm_by_2_pooled_sd"] is False else ""
        k, bar = v.get("ldm_nfe_matched"), v.get("bar", "ldm")
        fewest = " (the fewest scored)" if k is not None and k == v.get("bar_nfe_fewest") else ""
        matched = "" if k == v["ldm_nfe"] else (f"; {bar} reaches its FD at {k} NFE{fewest}" if k else
                                                 f"; lower than {bar}'s at every NFE scored")
        lines.append(f"- {v['entry']} at {v['nfe']} NFE vs {bar} at {v['ldm_nfe']}: FD lower by "
                     f"{v['fd_difference']:.1f} ({two_sd(v)}): beats it by more than 2 pooled sd: **{verdict}**{tie}"
                     f"{matched}")
    if pairs:
        lines += ["", "Between entries (final steps, the same NFE):", ""]
    for c in pairs:
        verdict = VERDICT[c["beats_by_2_pooled_sd"]]
        lines.append(f"- {c['better']} vs {c['than']} at {c['nfe']} NFE: FD lower by {c['fd_difference']:.1f} "
                     f"({two_sd(c)}): lower by more than 2 pooled sd: **{verdict}**")
    if curves:
        lines += ["", f"The curve target: FD at step {plan.mid} and at step {plan.budget} (runs from scratch); a rise "
                  "beyond the seeds' sd at the last step fails it.", "",
                  "| entry | NFE | FD at the middle | FD at the end | rise | sd at the end | rises beyond sd |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for c in curves:
            verdict = {True: "**yes**", False: "no", None: "not decided"}[c["rises_beyond_sd"]]
            lines.append(f"| {c['entry']} | {c['nfe']} | {c['fd_mid']:.1f} | {c['fd_last']:.1f} | {c['rise']:+.1f} | "
                         f"{c['sd']:.1f} | {verdict} |")
    if stages:
        lines += ["", "The stage jumps (docs/training.md): per curriculum stage N, the median gradient norm of the "
                  "loss (before any optim.grad_scale_beta division) and the largest logged Adam step RMS (1: a "
                  "steady gradient), each averaged over the seeds that logged the stage.", "",
                  "| entry | N | gradient norm (median) | largest Adam step | seeds |", "|---|---:|---:|---:|---:|"]
        for r in stages:
            adam = "-" if r["adam_step_rms_max"] is None else f"{r['adam_step_rms_max']:.2f}"
            lines.append(f"| {r['entry']} | {r['n_scales']} | {r['grad_norm_median']:.3g} | {adam} | {r['seeds']} |")
    partial = f": {', '.join(shown)} (the others' snapshots are not here yet)" if set(shown) < set(a.entries) else ""
    if (results / f"{stem}-samples.jpg").exists():
        lines += ["", f"![samples]({stem}-samples.jpg)", "", f"The same 32 seeds through each entry's final "
                  f"snapshot (seed {plan.seeds[0]}, ramp-up EMA){partial}."]
    lines += ["",
              f"![curves]({stem}-curves.png)", "",
              "FD against the step, teacher steps included (mean +- sd over seeds; 1 NFE, ldm at 35)."]
    return write_report(results / f"{stem}.md", lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", default="/tmp/slct-leaderboard", help="latents, reference and runs (not in the repo)")
    p.add_argument("--zip", default=str(HERE.parent.parent / "shared" / "data" / "utkface-200px.zip"))
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--holdout", type=int, default=5000)
    p.add_argument("--budget", type=int, default=2000, help="training steps per entry, teacher steps included")
    p.add_argument("--teacher-steps", type=int, default=1500, help="of the budget, the ldm teacher's share")
    p.add_argument("--batch", type=int, default=64, help="the utkface64 preset's batch (for the images column)")
    p.add_argument("--entries", nargs="+", default=list(ENTRIES), choices=list(ENTRIES), help="in the order they run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--match", choices=["images", "seconds"], default="images",
                   help="images: every entry sees the budget's images (teacher's included); seconds: every entry "
                   "trains for the seconds ldm's budget took, from the step times of benchmarks/compute.py --time "
                   "(else the image-matched report's s/step), in its own folder and report (-seconds)")
    p.add_argument("--archive", nargs="*", default=None,
                   help="committed reports whose runs' folders are gone: their rows are reported from there and "
                   "those runs are not trained again (default: results/leaderboard-utkface64-BUDGETsteps.json; give "
                   "none for only the runs here)")
    p.add_argument("--seed-first", action="store_true",
                   help="run every entry's first seed before any second seed (a partial board covers every entry)")
    add_runner_arguments(p)
    return p


def measured_seconds(a) -> dict:
    """Seconds per step of every entry on the board: what --match seconds divides ldm's budget time by. From
    benchmarks/compute.py's timing (results/compute-utkface64.json: every entry's step timed in turn on one machine
    with the current code) where it has the entry, else from the image-matched report of this budget (its runs ran
    side by side on one machine)."""
    speeds = {}
    timed = ablation.RESULTS / "compute-utkface64.json"
    if timed.exists():
        speeds = {r["entry"]: r["sec_per_step"] for r in json.loads(timed.read_text())["rows"] if "sec_per_step" in r}
    path = ablation.RESULTS / f"leaderboard-utkface64-{a.budget}steps.json"
    if path.exists() and "ldm" not in speeds:  # one source for all: mixing two machines' timings would not be fair
        speeds = {}
        for s in json.loads(path.read_text())["summary"]:
            if s["final"] and s.get("sec_per_step") and s["entry"] in ENTRIES:
                speeds.setdefault(s["entry"], s["sec_per_step"])
    if not speeds:
        sys.exit(f"--match seconds needs step times: run `python benchmarks/compute.py --time 5` or the image-matched "
                 f"board ({path})")
    missing = [e for e in ("ldm", *a.entries) if e not in speeds and (e == "ldm" or e not in BASELINES)]
    if missing:
        sys.exit(f"--match seconds: no measured s/step for {', '.join(dict.fromkeys(missing))}; time them with "
                 "`python benchmarks/compute.py --time 5`")
    return speeds


def main(argv=None) -> None:
    a = parser().parse_args(argv)
    if not 0 < a.teacher_steps < a.budget:
        sys.exit("--teacher-steps must lie between 0 and --budget")
    if a.jobs < 1:
        sys.exit("--jobs must be at least 1")
    seconds = None if a.match == "images" else measured_seconds(a)
    plan = Plan(Path(a.work), a.budget, a.teacher_steps, a.seeds, seconds)
    work = Path(a.work)
    a.steps, a.minutes = a.budget, None  # what ablation's data and reference stages read
    data = work / f"utk{a.resolution}-train"
    ref = work / f"ref-utk{a.resolution}-holdout{a.holdout}-mobilenetv2.npz"
    todo = tasks(plan, a, data, ref)
    if a.print:
        for task in todo:
            print(f"{'[done] ' if task.done.exists() else ''}slct {shlex.join(task.args)}")
        return
    if "data" in a.stage:
        work.mkdir(parents=True, exist_ok=True)
        ablation.stage_data(a, work)
        ablation.stage_ref(a, work)
    if "train" in a.stage:
        threads = a.threads or max(1, (os.cpu_count() or 1) // a.jobs)
        if run_tasks(todo, a.jobs, threads):
            print("some commands failed or could not start (above); the report holds what is done", flush=True)
    if "report" in a.stage:
        report(plan, a, ablation.RESULTS)


if __name__ == "__main__":
    main()
