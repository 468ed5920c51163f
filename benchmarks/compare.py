"""Few-step objectives compared fairly: sLCT, iLCT, MeanFlow, Shortcut and the ldm baseline on UTKFace + TAEF2.

    python benchmarks/compare.py --seeds 0 1 2 --steps 2000            # every stage; re-run to continue
    python benchmarks/compare.py --stage speed                          # seconds per step and peak memory only
    python benchmarks/compare.py --stage report --seeds 0 1 2 --steps 2000

Every method trains the same network preset (the utkface64 data preset's unet-small; the flow objectives add
their second time input) on the same latents, for the same number of steps at the same batch, i.e. on equal
training images; each is scored in the same way at 1 and 2 NFE (ldm: its Heun sampler) with FD, precision
and recall in MobileNetV2 space against held-out faces, >= 3 seeds, mean +- sd. The stages data, ref, train
and eval are benchmarks/ablation.py's (runs live in --work/runs/METHOD-STEPSsteps-seedS and resume by
re-running); ``speed`` times each method's training step (``--speed-steps`` steps in a fresh process, the
last half timed, as benchmarks/training.py does) and records its peak memory; ``report`` writes
results/compare-utkface64-STEPSsteps.{md,json} and the figures, with every method against sLCT (does it beat
it by more than 2 pooled sd?) and the speed table with MeanFlow's step time over sLCT's (target: <= 1.6x).
"""

from __future__ import annotations

import datetime
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = ("data", "ref", "train", "eval", "speed", "report")
SPEED_TARGET = 1.6  # a MeanFlow step may cost at most this many sLCT steps (issue: "More few-step objectives")
sys.path.insert(0, str(HERE))
from common import load_sibling, machine  # noqa: E402

ablation = load_sibling("ablation")


def stage_speed(a, methods: list[str]) -> list[dict]:
    """Each method's training step time and peak memory (one fresh process per method, fp32, --batch)."""
    work = Path(a.work) / "speed"
    data = Path(a.work) / f"utk{a.resolution}-train"
    rows = []
    for method in methods:
        shutil.rmtree(work / method, ignore_errors=True)  # a fresh run each time: the timing is of new steps
        cmd = [sys.executable, str(HERE / "training.py"), "--one", f"{method}:fp32", "--work", str(work / method),
               "--data", str(data), "--batch", str(a.speed_batch), "--steps", str(a.speed_steps), "--device", "cpu"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"speed of {method} failed:\n{out.stderr[-3000:]}")
        row = json.loads(next(line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")))
        rows.append({k: row[k] for k in ("method", "network", "batch", "sec_per_step", "images_per_s",
                                         "peak_mem_gib", "peak_kind", "step_gflop")})
        print(f"{method}: {1000 * row['sec_per_step']:.0f} ms/step, peak {row['peak_mem_gib']:.2f} GiB", flush=True)
    speed = dict(rows=rows, command=shlex.join(["python", "benchmarks/compare.py", *sys.argv[1:]]),
                 steps=a.speed_steps, batch=a.speed_batch, machine=machine("cpu"),
                 date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    ablation.RESULTS.mkdir(exist_ok=True)
    (ablation.RESULTS / "compare-speed-cpu.json").write_text(json.dumps(speed, indent=2) + "\n")
    m = speed["machine"]
    (ablation.RESULTS / "compare-speed-cpu.md").write_text("\n".join([
        "# Few-step objectives: training step time and peak memory (CPU)", "",
        f"- Command: `{speed['command']}` ({speed['date']})",
        f"- Machine: {m['cpu']}, {m['cpu_cores']} cores, torch {m['torch']}; 1-min load average "
        f"{m['load_average_1min']} at the end",
        f"- Data: `{data}`; batch {a.speed_batch}; each method trains {a.speed_steps} steps in a fresh process, the last "
        f"{a.speed_steps // 2} timed (benchmarks/training.py's --one)", "", *speed_lines(rows)[2:]]) + "\n")
    return rows


def speed_lines(rows: list[dict]) -> list[str]:
    by = {r["method"]: r for r in rows}
    lines = ["## Speed (training step, fp32, same batch)", "",
             "| method | step (ms) | vs sLCT | images/s | peak memory (GiB) | GFLOP/step |", "|---|---:|---:|---:|---:|---:|"]
    base = by.get("slct", {}).get("sec_per_step")
    for r in rows:
        ratio = f"{r['sec_per_step'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['method']} | {1000 * r['sec_per_step']:.0f} | {ratio} | {r['images_per_s']:.1f} | "
                     f"{r['peak_mem_gib']:.2f} ({r['peak_kind']}) | {r['step_gflop']:.1f} |")
    if base and "meanflow" in by:
        ratio = by["meanflow"]["sec_per_step"] / base
        lines += ["", f"MeanFlow step / sLCT step: {ratio:.2f}x (target <= {SPEED_TARGET}x): "
                      f"**{'met' if ratio <= SPEED_TARGET else 'not met'}**"]
    return lines


def main() -> None:
    p = ablation.parser(__doc__.split("\n")[0], stages=STAGES)
    p.set_defaults(methods=["few-step"], curves=["slct", "meanflow", "shortcut"])
    p.add_argument("--speed-steps", type=int, default=16, help="steps per method for the speed stage")
    p.add_argument("--speed-batch", type=int, default=64, help="batch of the speed stage")
    a = p.parse_args()
    ablation.check(p, a)
    methods = [m for name in a.methods for m in ablation.GROUPS.get(name, [name])]
    ablation.run_stages(a, methods)
    speed_file = ablation.RESULTS / "compare-speed-cpu.json"
    if "speed" in a.stage:
        stage_speed(a, methods)
    if "report" in a.stage:
        stem = a.stem or f"compare-utkface{a.resolution}-{a.steps}steps" + (f"-{a.tag}" if a.tag else "")
        md = ablation.stage_report(a, Path(a.work), methods, stem=stem, title="Few-step objectives",
                                   pairs=tuple((m, "slct") for m in methods if m != "slct"), nfes=(1, 2),
                                   script="compare.py")
        if speed_file.exists():
            speed = json.loads(speed_file.read_text())
            m = speed.get("machine", {})
            text = md.read_text() + "\n" + "\n".join(speed_lines(speed["rows"])) + \
                f"\n\nSpeed command: `{speed['command']}` ({speed['steps']} steps per method, the last half timed; " \
                f"{speed.get('date', '')}; {m.get('cpu', '?')}, {m.get('cpu_cores', '?')} cores, 1-min load " \
                f"{m.get('load_average_1min', '?')}).\n"
            md.write_text(text)


if __name__ == "__main__":
    main()
