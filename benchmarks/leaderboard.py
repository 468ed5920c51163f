"""One equal-budget leaderboard: every few-step method against the `ldm` diffusion baseline at the same total number
of training steps, teacher steps included, on UTKFace 64 px through TAEF2 (`unet-small`, the utkface64 preset).

    python benchmarks/leaderboard.py --print                 # the slct commands, in the order they run
    python benchmarks/leaderboard.py --seeds 0 1 2           # every stage; re-run to continue (runs resume)
    python benchmarks/leaderboard.py --stage report          # the table from what has been evaluated

Entries (``ENTRIES``; K = --budget steps in all, T = --teacher-steps of them spent on the teacher):

- ``ldm``: the EDM diffusion baseline, K steps, scored at its Heun sampler's 35 NFE: the bar to clear;
- ``ilct``, ``slct``, ``meanflow``, ``shortcut``, ``soflow``: K steps from scratch;
- ``slct-stage-robust``: sLCT with the stage-jump remedies (docs/training.md "Stage jumps");
- ``ilct-tuned``: an ``ldm`` teacher trained T steps, then iLCT (the same GroupNorm network) for K - T steps from
  its weights (``slct train --init``, consistency tuning);
- ``ilcd``: iLCT's consistency distillation from the same teacher for K - T steps (``--teacher``).

The teacher of a seed is one ``ldm`` run of T steps shared by the two entries that use it; its steps count in both
budgets. Each entry's final snapshot is scored with ``slct eval`` (MobileNetV2 features, --n-eval samples against
the held-out faces, the ramp-up EMA) at 1 and 2 NFE (ldm: 35); the report gives FD, precision and recall, mean +- sd
over seeds, seconds per training step, images seen (teacher included), and for every few-step row whether its FD
beats ``ldm``'s 35-NFE FD by more than 2 pooled sd (a verdict only from 3 seeds a side). Data, reference and
evaluation are benchmarks/ablation.py's stages; results go to results/leaderboard-utkface64-KSTEPS.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import load_sibling, machine  # noqa: E402

ablation = load_sibling("ablation")  # sh(), slct(), the data and reference stages, mean_sd(), the seed rule
GROUP_NORMS = ["network.block_norm=group", "network.out_norm=group"]  # the ldm preset's: a tuned run must match


@dataclass(frozen=True)
class Entry:
    preset: str
    sets: tuple = ()
    source: str = ""  # "init" (start from the teacher's weights) | "teacher" (distil from it) | ""

    def own_steps(self, budget: int, teacher_steps: int) -> int:
        return budget - teacher_steps if self.source else budget


ENTRIES: dict[str, Entry] = {
    "ldm": Entry("ldm"),
    "ilct": Entry("ilct"),
    "slct": Entry("slct"),
    "slct-stage-robust": Entry("slct", ("optim.stage_warmup_steps=50", "optim.grad_scale_beta=0.9")),
    "ilct-tuned": Entry("ilct", tuple(GROUP_NORMS), source="init"),
    "ilcd": Entry("ilcd", source="teacher"),
    "meanflow": Entry("meanflow"),
    "shortcut": Entry("shortcut"),
    "soflow": Entry("soflow"),
}


@dataclass
class Plan:
    """Where everything of one leaderboard lives, and the commands that make it."""

    work: Path
    budget: int
    teacher_steps: int
    seeds: list = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.work / f"leaderboard-{self.budget}steps"

    def teacher(self, seed: int) -> Path:
        return self.root / f"teacher-ldm-{self.teacher_steps}steps-seed{seed}"

    def run(self, name: str, seed: int) -> Path:
        return self.root / f"{name}-seed{seed}"


def train_command(plan: Plan, a, name: str, seed: int, data: Path) -> list[str]:
    entry = ENTRIES[name]
    steps = entry.own_steps(plan.budget, plan.teacher_steps)
    cmd = ["train", "--preset", entry.preset, "--data-preset", "utkface64", "--data", str(data),
           "--out", str(plan.run(name, seed)), "--steps", str(steps), "--seed", str(seed), "--no-progress",
           "--set", "train.ema_power_every_steps=0"]
    for extra in entry.sets:
        cmd += ["--set", extra]
    if entry.source == "init":
        cmd += ["--init", str(plan.teacher(seed))]
    elif entry.source == "teacher":
        cmd += ["--teacher", str(plan.teacher(seed))]
    return cmd


def teacher_command(plan: Plan, seed: int, data: Path) -> list[str]:
    return ["train", "--preset", "ldm", "--data-preset", "utkface64", "--data", str(data), "--out",
            str(plan.teacher(seed)), "--steps", str(plan.teacher_steps), "--seed", str(seed), "--no-progress",
            "--set", "train.ema_power_every_steps=0"]


def eval_command(run: Path, step: int, ref: Path, n: int) -> list[str]:
    return ["eval", "--snapshot", str(run / f"snapshot-{step:08d}.pt"), "--ref", str(ref), "--n", str(n),
            "--out", str(run / f"eval-final-n{n}.json"), "--no-progress", "--ema", "rampup"]


def commands(plan: Plan, a, data: Path, ref: Path) -> list[tuple[str, Path, list[str]]]:
    """(what, its output, slct arguments) in the order they run: per seed, the teacher, then every entry and its
    evaluation. A step whose output exists is done."""
    out = []
    for seed in plan.seeds:
        uses_teacher = any(ENTRIES[name].source for name in a.entries)
        if uses_teacher:
            done = plan.teacher(seed) / f"snapshot-{plan.teacher_steps:08d}.pt"
            out.append((f"teacher seed {seed}", done, teacher_command(plan, seed, data)))
        for name in a.entries:
            steps = ENTRIES[name].own_steps(plan.budget, plan.teacher_steps)
            run = plan.run(name, seed)
            out.append((f"{name} seed {seed}", run / f"snapshot-{steps:08d}.pt",
                        train_command(plan, a, name, seed, data)))
            out.append((f"{name} seed {seed}: eval", run / f"eval-final-n{a.n_eval}.json",
                        eval_command(run, steps, ref, a.n_eval)))
    return out


def seconds_per_step(run: Path) -> float | None:
    rows = [json.loads(line) for line in open(run / "metrics.jsonl") if '"sec_per_step"' in line] \
        if (run / "metrics.jsonl").exists() else []
    return sum(r["sec_per_step"] for r in rows) / len(rows) if rows else None


def collect(plan: Plan, a) -> list[dict]:
    rows = []
    for name in a.entries:
        entry = ENTRIES[name]
        own = entry.own_steps(plan.budget, plan.teacher_steps)
        for seed in plan.seeds:
            path = plan.run(name, seed) / f"eval-final-n{a.n_eval}.json"
            if not path.exists():
                continue
            record = json.loads(path.read_text())
            teacher = plan.teacher_steps if entry.source else 0
            for r in record["results"]:
                rows.append(dict(entry=name, seed=seed, nfe=r["nfe"], fd=r["fd"], precision=r.get("precision"),
                                 recall=r.get("recall"), own_steps=own, teacher_steps=teacher,
                                 images=(own + teacher) * a.batch, sec_per_step=seconds_per_step(plan.run(name, seed))))
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["entry"], r["nfe"]) for r in rows):
        mine = [r for r in rows if (r["entry"], r["nfe"]) == key]
        entry = dict(entry=key[0], nfe=key[1], seeds=sorted(r["seed"] for r in mine), own_steps=mine[0]["own_steps"],
                     teacher_steps=mine[0]["teacher_steps"], images=mine[0]["images"])
        for k in ("fd", "precision", "recall", "sec_per_step"):
            vals = [r[k] for r in mine if r[k] is not None]
            if vals:
                entry[k], entry[f"{k}_sd"] = ablation.mean_sd(vals)
        out.append(entry)
    return out


def verdicts(summary: list[dict]) -> list[dict]:
    """Each few-step row against ldm's FD at its own sampler: lower by more than 2 pooled sd (3 seeds a side)?"""
    bars = [s for s in summary if s["entry"] == "ldm"]
    if not bars:
        return []
    bar = bars[0]
    out = []
    for s in summary:
        if s["entry"] == "ldm" or "fd" not in s:
            continue
        pooled = ((s["fd_sd"] ** 2 + bar["fd_sd"] ** 2) / 2) ** 0.5
        enough = min(len(s["seeds"]), len(bar["seeds"])) >= ablation.MIN_SEEDS_FOR_VERDICT
        diff = bar["fd"] - s["fd"]
        out.append(dict(entry=s["entry"], nfe=s["nfe"], fd_difference=diff, pooled_sd=pooled, ldm_nfe=bar["nfe"],
                        beats_ldm_by_2_pooled_sd=diff > 2 * pooled if enough else None))
    return out


def report(plan: Plan, a, results: Path) -> Path:
    rows = collect(plan, a)
    summary = summarize(rows)
    judged = verdicts(summary)
    stem = f"leaderboard-utkface64-{plan.budget}steps"
    command = shlex.join(["python", "benchmarks/leaderboard.py", *sys.argv[1:]])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info = machine()
    results.mkdir(exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(dict(
        meta=dict(command=command, date=date, machine=info, budget=plan.budget, teacher_steps=plan.teacher_steps,
                  n_eval=a.n_eval, entries={k: vars(ENTRIES[k]) for k in a.entries}),
        summary=summary, verdicts=judged, runs=rows), indent=2, default=list) + "\n")
    pm = lambda e, k, f: (f"{e[k]:{f}}" + (f" +- {e[k + '_sd']:{f}}" if len(e["seeds"]) > 1 else "")  # noqa: E731
                          if k in e else "-")
    lines = [f"# Equal-budget leaderboard: UTKFace 64 px, TAEF2, unet-small, {plan.budget} steps in all", "",
             f"- Machine: {info['cpu']}, {info['cpu_cores']} cores, torch {info['torch']}",
             f"- Command: `{command}` ({date})",
             f"- FD-MobileNetV2 of {a.n_eval} samples against the held-out faces, ramp-up EMA; teacher: ldm for "
             f"{plan.teacher_steps} steps, counted in the budget of the entries that use it", "",
             "| entry | NFE | FD | precision | recall | own + teacher steps | images | s/step | seeds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in summary:
        lines.append(f"| {e['entry']} | {e['nfe']} | {pm(e, 'fd', '.1f')} | {pm(e, 'precision', '.3f')} | "
                     f"{pm(e, 'recall', '.4f')} | {e['own_steps']} + {e['teacher_steps']} | {e['images']:,} | "
                     f"{pm(e, 'sec_per_step', '.2f')} | {len(e['seeds'])} |")
    lines.append("")
    for v in judged:
        verdict = {True: "yes", False: "no", None: "not decided (fewer than 3 seeds a side)"}[
            v["beats_ldm_by_2_pooled_sd"]]
        lines.append(f"- {v['entry']} at {v['nfe']} NFE vs ldm at {v['ldm_nfe']}: FD lower by {v['fd_difference']:.1f} "
                     f"(2 pooled sd {2 * v['pooled_sd']:.1f}): beats it by more than 2 pooled sd: **{verdict}**")
    (results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results / f"{stem}.md"


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
    p.add_argument("--entries", nargs="+", default=list(ENTRIES), choices=list(ENTRIES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--stage", nargs="+", default=["data", "train", "report"], choices=["data", "train", "report"])
    p.add_argument("--print", action="store_true", help="list the commands (done ones marked) and exit")
    return p


def main(argv=None) -> None:
    a = parser().parse_args(argv)
    if not 0 < a.teacher_steps < a.budget:
        sys.exit("--teacher-steps must lie between 0 and --budget")
    plan = Plan(Path(a.work), a.budget, a.teacher_steps, a.seeds)
    work = Path(a.work)
    a.steps, a.minutes = a.budget, None  # what ablation's data and reference stages read
    data = work / f"utk{a.resolution}-train"
    ref = work / f"ref-utk{a.resolution}-holdout{a.holdout}-mobilenetv2.npz"
    todo = commands(plan, a, data, ref)
    if a.print:
        for what, done, args in todo:
            print(f"{'[done] ' if done.exists() else ''}slct {shlex.join(args)}")
        return
    if "data" in a.stage:
        work.mkdir(parents=True, exist_ok=True)
        ablation.stage_data(a, work)
        ablation.stage_ref(a, work)
    if "train" in a.stage:
        for what, done, args in todo:
            if not done.exists():
                print(f"== {what}", flush=True)
                done.parent.mkdir(parents=True, exist_ok=True)
                ablation.sh(ablation.slct(*args), log=done.parent / "leaderboard.log")
    if "report" in a.stage:
        report(plan, a, ablation.RESULTS)


if __name__ == "__main__":
    main()
