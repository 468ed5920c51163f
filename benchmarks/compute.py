"""What one training step of each leaderboard entry costs, counted rather than timed: network passes and training
FLOPs per image, so the leaderboard can match compute as well as images (benchmarks/leaderboard.py reads the result).

    python benchmarks/compute.py                 # every leaderboard entry -> results/compute-utkface64.{json,md}
    python benchmarks/compute.py --entries ldm soflow soflow:objective.soflow_target_rows=all --time 7

For each entry (its preset and overrides on the utkface64 data preset: unet-small, batch 64, 32x8x8 latents), one
objective call and its backward pass run on random latents at the middle of the run (where the consistency models'
curriculum is; the cost does not depend on N) under ``torch.utils.flop_counter.FlopCounterMode``, with a hook on
the backbone that counts the rows each forward pass takes, with and without autograd. The distilled entries' teacher
is a fresh ldm network of the same size (its cost, not its weights, matters here). Reported per entry: forward rows
per image with gradient (1 = one full pass over the batch that is back-propagated), without gradient (target or
teacher passes), and GFLOP per training image (forward + backward + no-grad passes), and the ratio to ldm's.
``NAME:KEY=VALUE`` measures a variant of an entry (SoFlow's old full-batch target pass, say). ``--time ROUNDS`` also
times one step (objective + backward) of every entry, the entries in turn within each round so that a change of the
machine's load hits them alike, and reports the median: a fair comparison of the rows on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI: spinning OpenMP threads on a shared CPU (README)

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import load_sibling, machine  # noqa: E402

leaderboard = load_sibling("leaderboard")
LATENT_SHAPE = (32, 8, 8)  # TAEF2 at 64 px


def entry_config(name: str, budget: int = 2000, teacher_steps: int = 1500):
    """An entry's config; ``NAME:KEY=VALUE:...`` is the entry with overrides (a variant to compare)."""
    from slct.config import load_config

    name, *extra = name.split(":")
    entry = leaderboard.ENTRIES[name]
    steps = entry.own_steps(budget, teacher_steps)
    teacher = ["objective.teacher=a-fresh-ldm-network"] if entry.distil else []  # measure() builds the teacher
    return load_config(entry.preset, "utkface64", sets=[*entry.sets, f"train.total_steps={steps}", *teacher, *extra]), \
        steps


def step_function(name: str, seed: int = 0):
    """(one training step of entry ``name`` as a function of nothing, the rows counter, the batch): the objective
    and its backward on fixed random latents, with every target network the entry needs."""
    from slct.config import load_config
    from slct.model import build_model
    from slct.objectives import build_objective

    cfg, steps = entry_config(name)
    torch.manual_seed(seed)
    model = build_model(cfg, LATENT_SHAPE, 0)
    rows = {"grad": 0, "no_grad": 0}

    def count(module, args):
        rows["grad" if torch.is_grad_enabled() else "no_grad"] += args[0].shape[0]

    objective = build_objective(cfg.objective, steps)
    handles = []  # hooks go on after the copies below are made (a deep copy would carry them along)
    kwargs = {}
    if objective.target_weights == "teacher":
        teacher = build_model(load_config("ldm", "utkface64"), LATENT_SHAPE, 0).eval().requires_grad_(False)
        handles.append(teacher.net.register_forward_pre_hook(count))
        kwargs["target_model"] = teacher
    elif objective.target_weights == "ema":
        import copy

        target = copy.deepcopy(model).eval().requires_grad_(False)
        handles.append(target.net.register_forward_pre_hook(count))
        kwargs["target_model"] = target
    if cfg.objective.target_ema > 0:  # the EMA target network: another copy of the student
        import copy

        ema_target = copy.deepcopy(model).requires_grad_(False)
        handles.append(ema_target.net.register_forward_pre_hook(count))
        kwargs["ema_target"] = ema_target
    handles.append(model.net.register_forward_pre_hook(count))
    batch = cfg.train.batch_size
    x0 = torch.randn(batch, *LATENT_SHAPE)

    def step():
        model.zero_grad(set_to_none=True)
        objective(model, x0, steps // 2, generator=torch.Generator().manual_seed(seed), **kwargs).total.mean().backward()

    return step, rows, batch, cfg, handles


def measure(name: str, seed: int = 0) -> dict:
    """Passes and FLOPs of one training step of entry ``name`` (see the module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    step, rows, batch, cfg, handles = step_function(name, seed)
    with FlopCounterMode(display=False) as counter:
        step()
    for h in handles:
        h.remove()
    return dict(entry=name, preset=cfg.preset, batch=batch, grad_rows_per_image=rows["grad"] / batch,
                no_grad_rows_per_image=rows["no_grad"] / batch,
                gflop_per_image=float(counter.get_total_flops()) / batch / 1e9)


def time_steps(names: list[str], rounds: int) -> dict:
    """Median seconds of one step (objective + backward) per entry, the entries timed in turn within each round so
    that a change in the machine's load hits them alike (a shared machine: compare them, not other days)."""
    import statistics
    import time

    steps = {name: step_function(name)[0] for name in names}
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list] = {name: [] for name in names}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def markdown(rows: list[dict], meta: dict) -> str:
    base = next((r["gflop_per_image"] for r in rows if r["entry"] == "ldm"), None)
    timed = any("sec_per_step" in r for r in rows)
    m = meta["machine"]
    lines = ["# Training cost per step: UTKFace 64 px, unet-small, batch 64", "",
             f"- Command: `{meta['command']}`; {meta['date']}",
             "- Counted: network rows per image through the backbone (with gradient / without) and FLOPs "
             "(forward + backward) from torch.utils.flop_counter on one step at mid-run; the machine does not matter",
             *([f"- Timed (the ms column): the median of the rounds, the entries in turn within each round (objective "
                f"+ backward, no optimiser step) on {m['cpu']}, {m['cpu_cores']} cores, {m['torch_threads']} "
                f"threads, 1-min load {m['load_average_1min']} at the end: compare the rows, not other machines"]
               if timed else []),
             "", "| entry | rows with grad / image | rows without grad / image | GFLOP / image | x ldm |"
             + (" ms / step |" if timed else ""), "|---|---:|---:|---:|---:|" + ("---:|" if timed else "")]
    for r in rows:
        ratio = f"{r['gflop_per_image'] / base:.2f}" if base else "-"
        ms = f" {1000 * r['sec_per_step']:.0f} |" if "sec_per_step" in r else (" - |" if timed else "")
        lines.append(f"| `{r['entry']}` | {r['grad_rows_per_image']:.2f} | {r['no_grad_rows_per_image']:.2f} | "
                     f"{r['gflop_per_image']:.3f} | {ratio} |" + ms)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", nargs="+", default=list(leaderboard.ENTRIES),
                   help="leaderboard entries; NAME:KEY=VALUE:... for a variant (e.g. soflow:objective."
                   "soflow_target_rows=all)")
    p.add_argument("--time", type=int, default=0, metavar="ROUNDS",
                   help="also time one step of each entry, in turn, ROUNDS times (median; this machine, its load)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "compute-utkface64")
    a = p.parse_args(argv)
    for name in a.entries:
        if name.split(":")[0] not in leaderboard.ENTRIES:
            p.error(f"unknown entry {name.split(':')[0]!r}; known: {', '.join(leaderboard.ENTRIES)}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for name in a.entries:
        rows.append(measure(name))
        print(f"{name}: {rows[-1]['grad_rows_per_image']:.2f} + {rows[-1]['no_grad_rows_per_image']:.2f} rows, "
              f"{rows[-1]['gflop_per_image']:.3f} GFLOP per image", flush=True)
    if a.time:
        for name, sec in time_steps(a.entries, a.time).items():
            next(r for r in rows if r["entry"] == name)["sec_per_step"] = sec
            print(f"{name}: {sec * 1000:.0f} ms per step (median of {a.time})", flush=True)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=machine(),
                command=" ".join(["python", "benchmarks/compute.py", *(argv if argv is not None else sys.argv[1:])]))
    a.out.with_suffix(".json").write_text(json.dumps(dict(**meta, rows=rows), indent=1) + "\n")
    a.out.with_suffix(".md").write_text(markdown(rows, meta))
    print(f"-> {a.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
