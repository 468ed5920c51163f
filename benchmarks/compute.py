"""What one training step of each leaderboard entry costs, counted rather than timed: network passes and training
FLOPs per image, so the leaderboard can match compute as well as images (benchmarks/leaderboard.py reads the result).

    python benchmarks/compute.py                 # every leaderboard entry -> results/compute-utkface64.{json,md}
    python benchmarks/compute.py --entries ldm soflow

For each entry (its preset and overrides on the utkface64 data preset: unet-small, batch 64, 32x8x8 latents), one
objective call and its backward pass run on random latents at the middle of the run (where the consistency models'
curriculum is; the cost does not depend on N) under ``torch.utils.flop_counter.FlopCounterMode``, with a hook on
the backbone that counts the rows each forward pass takes, with and without autograd. The distilled entries' teacher
is a fresh ldm network of the same size (its cost, not its weights, matters here). Reported per entry: forward rows
per image with gradient (1 = one full pass over the batch that is back-propagated), without gradient (target or
teacher passes), and GFLOP per training image (forward + backward + no-grad passes), and the ratio to ldm's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import load_sibling, machine  # noqa: E402

leaderboard = load_sibling("leaderboard")
LATENT_SHAPE = (32, 8, 8)  # TAEF2 at 64 px


def entry_config(name: str, budget: int = 2000, teacher_steps: int = 1500):
    from slct.config import load_config

    entry = leaderboard.ENTRIES[name]
    steps = entry.own_steps(budget, teacher_steps)
    teacher = ["objective.teacher=a-fresh-ldm-network"] if entry.distil else []  # measure() builds the teacher
    return load_config(entry.preset, "utkface64", sets=[*entry.sets, f"train.total_steps={steps}", *teacher]), steps


def measure(name: str, seed: int = 0) -> dict:
    """Passes and FLOPs of one training step of entry ``name`` (see the module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

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
    with FlopCounterMode(display=False) as counter:
        objective(model, x0, steps // 2, generator=torch.Generator().manual_seed(seed), **kwargs).total.mean().backward()
    for h in handles:
        h.remove()
    return dict(entry=name, preset=cfg.preset, batch=batch, grad_rows_per_image=rows["grad"] / batch,
                no_grad_rows_per_image=rows["no_grad"] / batch,
                gflop_per_image=float(counter.get_total_flops()) / batch / 1e9)


def markdown(rows: list[dict], meta: dict) -> str:
    base = next((r["gflop_per_image"] for r in rows if r["entry"] == "ldm"), None)
    lines = ["# Training cost per step: UTKFace 64 px, unet-small, batch 64", "",
             f"- Command: `python benchmarks/compute.py`; {meta['date']}",
             "- Counted, not timed: network rows per image through the backbone (with gradient / without) and FLOPs "
             "(forward + backward) from torch.utils.flop_counter on one step at mid-run; the machine does not matter",
             "", "| entry | rows with grad / image | rows without grad / image | GFLOP / image | x ldm |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['gflop_per_image'] / base:.2f}" if base else "-"
        lines.append(f"| `{r['entry']}` | {r['grad_rows_per_image']:.2f} | {r['no_grad_rows_per_image']:.2f} | "
                     f"{r['gflop_per_image']:.3f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", nargs="+", default=list(leaderboard.ENTRIES), choices=list(leaderboard.ENTRIES))
    p.add_argument("--out", type=Path, default=HERE / "results" / "compute-utkface64")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for name in a.entries:
        rows.append(measure(name))
        print(f"{name}: {rows[-1]['grad_rows_per_image']:.2f} + {rows[-1]['no_grad_rows_per_image']:.2f} rows, "
              f"{rows[-1]['gflop_per_image']:.3f} GFLOP per image", flush=True)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=machine(),
                command="python benchmarks/compute.py")
    a.out.with_suffix(".json").write_text(json.dumps(dict(**meta, rows=rows), indent=1) + "\n")
    a.out.with_suffix(".md").write_text(markdown(rows, meta))
    print(f"-> {a.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
