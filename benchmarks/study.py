"""Issue 13's multi-seed study at the budgets people run, in slices: every run `ablation.py` makes, in two lanes.

    python benchmarks/study.py --work /tmp/study           # run or continue both lanes; Ctrl-C stops, re-run continues
    python benchmarks/study.py --print                      # the ablation.py commands, lane by lane, nothing run
    python benchmarks/study.py --work /tmp/study --report   # the reports from the runs that are there

What it runs (UTKFace 64 px, TAEF2 latents, `unet-small`, 3 seeds each; priority order, each lane in turn):
1. ``ilct``, ``slct`` and ``slct-calibrated-c`` for 2,000 steps with the budget settings (``--tag budget``;
   at K = 2,000 eq. 11's c falls to 2.4e-4 at N = 641 and sLCT's losses sit deep in the Cauchy log regime, where
   the calibrated c is meant to help);
2. ``ldm`` for 2,000 steps with the budget settings;
3. the middle rungs of the Table 2a ladder (``ladder-cauchy`` ... ``ladder-adaptive-c``) for 500 steps with the
   budget settings, beside the 500-step ``ilct@budget`` / ``slct@budget`` runs already in the 500-step report;
4. ``ilct`` and ``slct`` for 2,000 steps with the authors' settings;
5. beyond the issue: ``ilct`` and ``slct`` for 2,000 steps with the budget settings and the curriculum stopped at
   N = 81 (``--tag budget-n81``, ``objective.s1=80``: four stages of 500 steps).

Each lane is one single-threaded process (``OMP_NUM_THREADS=1``): two side by side use a 2-core CPU best. A run is
one ``ablation.py --methods M --seeds S`` invocation; runs and evals already done are skipped, and a stopped run
resumes from its last checkpoint, so the study runs in slices of whatever length a session has. A run the
committed reports (``ARCHIVE``) hold is done even when its folder is gone (a wiped /tmp): it is not trained again
and the reports read its rows from there. One 2,000-step
run takes 16-60 min of one core (by machine; the reports' notes), a 500-step run 4-25 min, plus ~6 min of scoring.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import overrides  # noqa: E402


def sets(variant: str) -> list[str]:
    """common.SETTINGS' variant as ablation.py arguments (all four settings spelled out)."""
    return [x for s in overrides(variant) for x in ("--set", s)]


# the budget settings: eq. 10's stages at least 125 steps long (no change at K = 2,000, where they are 285), RAdam's
# weight decay decoupled from the learning rate and off for norm and bias parameters (docs/training.md)
BUDGET = ["--tag", "budget", *sets("budget")]
# the authors' settings spelled out (eq. 10's stages, RAdam's coupled decay on every tensor): a variant of its own,
# since the utkface64 preset now holds the budget settings
AUTHORS = ["--tag", "authors", *sets("authors")]
# ... and eq. 10's doubling stopped at N = 81 (s1 = 80: four stages of K/4 steps). In the 3-seed 2,000-step budget
# runs both methods' 1-step FD was lowest at step 1,000 (N = 81) or 500 and worse by step 2,000 (N = 641): does
# stopping the doubling there keep the gain, and would it suit the short-run presets?
N81 = ["--tag", "budget-n81", *sets("budget-n81")]
SCORING = ["--n-eval", "1000", "--curve-n", "500", "--weights", "rampup", "online"]
SEEDS = (0, 1, 2)
# the committed reports: a run they hold is done, even where its folder in --work is gone (rows are read from them)
ARCHIVE = ["--archive", "benchmarks/results/ablation-utkface64-2000steps-3seeds.json",
           "benchmarks/results/ablation-utkface64-500steps.json"]
RUNGS = ["ladder-cauchy", "ladder-diff", "ladder-ot", "ladder-adaptive-c"]


def run_args(method: str, seed: int, steps: int, variant: list[str]) -> list[str]:
    """One run's ablation.py arguments (train and score it); curve points every quarter of the run."""
    curve_every = steps // 4 if steps >= 2000 else steps // 2
    # FD-vs-step curves for the 2,000-step consistency models; the 500-step rungs and ldm (35 NFE a sample: ~4 min
    # a point) are scored at their last step only
    curves = [method] if steps >= 2000 and method != "ldm" else []
    return ["--methods", method, "--seeds", str(seed), "--steps", str(steps), "--curve-every", str(curve_every),
            "--curves", *curves, *SCORING, "--stage", "train", "eval", *ARCHIVE, *variant]


def lanes() -> tuple[list[list[str]], list[list[str]]]:
    """Two lanes of about equal length, each in priority order (one list of ablation.py arguments per run)."""
    a, b = [], []
    for seed in SEEDS:  # 1. the 2,000-step budget study
        a.append(run_args("ilct", seed, 2000, BUDGET))
        b.append(run_args("slct", seed, 2000, BUDGET))
    a.append(run_args("slct-calibrated-c", 0, 2000, BUDGET))
    b += [run_args("slct-calibrated-c", seed, 2000, BUDGET) for seed in (1, 2)]
    a += [run_args("ldm", seed, 2000, BUDGET) for seed in (0, 1)]  # 2. the diffusion baseline
    b.append(run_args("ldm", 2, 2000, BUDGET))
    for i, rung in enumerate(RUNGS):  # 3. the ladder's middle rungs at 500 steps
        (a if i % 2 == 0 else b).extend(run_args(rung, seed, 500, BUDGET) for seed in SEEDS)
    a += [run_args("ilct", seed, 2000, AUTHORS) for seed in SEEDS]  # 4. the authors' settings at 2,000 steps
    b += [run_args("slct", seed, 2000, AUTHORS) for seed in SEEDS]
    for seed in SEEDS:  # 5. the budget settings with the curriculum stopped at N = 81
        a.append(run_args("slct", seed, 2000, N81))
        b.append(run_args("ilct", seed, 2000, N81))
    return a, b


HOW_RUN = ("Each run trained in one single-threaded process (OMP_NUM_THREADS=1), two side by side on the 2-core "
           "CPU (benchmarks/study.py, in slices over several sessions; a stopped run resumes bitwise from its "
           "checkpoint). Training times are per machine: the later rows (the 500-step ladder-ot and ladder-adaptive-c, "
           "the 2,000-step @authors rows) trained on a 2-core Intel Xeon at ~0.5 s per sLCT step, the earlier ones "
           "on a 2-core AMD EPYC at ~1.4 s. ")
NOTE_2000 = (HOW_RUN + "16-21 min (Xeon) or 47-60 min (EPYC; ldm ~40) of training per 2,000-step run. 2,000 "
             "steps at batch 64 are 128,000 images (7 epochs). At K = 2,000 eq. 10 already gives stages of 285 "
             "steps, so min_stage_steps=125 changes nothing and the @budget rows differ from the authors' settings "
             "(the @authors rows) in weight decay only: decoupled from the learning rate, none on norms and biases. "
             "Rows with fewer than 3 seeds are still being trained by python benchmarks/study.py --work /tmp/study "
             "(re-running continues, --report rewrites this file).")
NOTE_500 = (HOW_RUN + "4-25 min of training per run (the first rows beside development work). 500 steps at batch "
            "64 are 32,000 images (1.7 epochs), about 0.08% of the paper's training images. The plain ilct/slct "
            "rows keep eq. 10's stages (71 steps each at K = 500), eq. 11's c and RAdam's coupled weight decay on "
            "every tensor (the authors' settings, then the utkface64 preset's; lr 1e-3 and the ramp-up EMA are "
            "the only short-run changes; the preset now holds the budget settings, so training them again takes "
            "--tag authors and benchmarks/common.py's SETTINGS['authors']); the @budget rows (the ladder's middle "
            "rungs among them) train with --tag budget --set objective.min_stage_steps=125 --set "
            "optim.decoupled_weight_decay=true --set optim.decay_norms_and_biases=false (4 stages of 125 steps "
            "ending at N = 81, decay decoupled and off for norms and biases). Only ilct and slct were scored with "
            "the 0.999 EMA; ldm's online weights with seed 1 only, with its 35-NFE Heun sampler.")


def reports(work: str) -> list[list[str]]:
    """The two reports' ablation.py arguments: the 2,000-step one and the 500-step one (with the rungs)."""
    at2000 = ["ilct@budget", "slct@budget", "slct-calibrated-c@budget", "ilct@budget-n81", "slct@budget-n81",
              "ldm@budget", "ilct@authors", "slct@authors"]
    at500 = ["ilct", "slct", "slct-calibrated-c", "ldm", "ilct@budget", *(f"{r}@budget" for r in RUNGS),
             "slct@budget"]
    # the 2,000-step report beside (not over) the single-seed one of an earlier commit
    return [["--work", work, "--stem", "ablation-utkface64-2000steps-3seeds", "--methods", *at2000, "--seeds",
             *map(str, SEEDS), "--steps", "2000",
             "--curve-every", "500", "--curves", "ilct@budget", "slct@budget", "slct-calibrated-c@budget",
             "slct@budget-n81", "ilct@authors", "slct@authors", *SCORING,
             "--stage", "report", "--compare", "slct@budget:ilct@budget", "slct-calibrated-c@budget:slct@budget",
             "slct-calibrated-c@budget:ilct@budget", "slct@budget-n81:slct@budget", "ilct@budget-n81:ilct@budget",
             "slct@budget-n81:ilct@budget-n81", "slct@authors:ilct@authors", "ilct@authors:slct@authors",
             "ilct@budget:slct@budget", "ilct@budget:ilct@authors", "slct@budget:slct@authors",
             *ARCHIVE, "--note", NOTE_2000],
            ["--work", work, "--methods", *at500, "--seeds", *map(str, SEEDS), "--steps", "500", "--curve-every",
             "250", "--curves", "ilct", "slct", "--n-eval", "1000", "--curve-n", "500", "--weights", "rampup",
             "0.999", "online", "--stage", "report", "--compare", "slct:ilct", "slct-calibrated-c:slct", "ilct@budget:ilct",
             "slct@budget:slct", "slct@budget:ilct@budget",
             *(f"{r}@budget:{p}@budget" for r, p in zip(RUNGS, ["ilct", *RUNGS[:-1]])),
             f"slct@budget:{RUNGS[-1]}@budget", *ARCHIVE, "--note", NOTE_500]]


def command(args: list[str]) -> list[str]:
    return [sys.executable, str(HERE / "ablation.py"), *args]  # run in the repo root: ARCHIVE's paths


def run_lane(runs: list[list[str]], work: str, log: Path) -> subprocess.Popen:
    """One lane as one shell process running its runs one after another (stops at the first failure)."""
    script = " && ".join(shlex.join(command(["--work", work, *r])) for r in runs)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(["bash", "-c", script], env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=HERE.parent)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/study", help="latents, references and runs (as ablation.py --work)")
    p.add_argument("--print", action="store_true", help="print the commands, run nothing")
    p.add_argument("--report", action="store_true", help="write the reports from the runs that are there")
    a = p.parse_args()
    if a.print:
        for name, runs in zip("AB", lanes()):
            print(f"# lane {name}")
            for r in runs:
                print(shlex.join(["python", "benchmarks/ablation.py", "--work", a.work, *r]))
        return
    if a.report:
        for r in reports(a.work):
            subprocess.run(command(r), check=True, cwd=HERE.parent)
        return
    # the latents, the reference statistics and the latents' analysis first (skipped when there), then the lanes
    subprocess.run(command(["--work", a.work, "--methods", "ilct", "--stage", "data", "ref"]), check=True,
                   cwd=HERE.parent)
    # started in the background (nohup ... &) a process inherits SIGINT ignored: take it back, so `kill -INT` stops
    # the study as Ctrl-C does
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logs = Path(a.work) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = [run_lane(runs, a.work, logs / f"study-lane-{name}.log") for name, runs in zip("AB", lanes())]
    print(f"two lanes running; logs in {logs}/study-lane-{{A,B}}.log; Ctrl-C stops both (re-run continues)")
    try:
        codes = [proc.wait() for proc in procs]
    except KeyboardInterrupt:  # a training run checkpoints on SIGTERM/SIGINT and resumes when re-run
        for proc in procs:
            os.killpg(proc.pid, signal.SIGINT)
        codes = [proc.wait() for proc in procs]
    sys.exit(max(codes))


if __name__ == "__main__":
    main()
