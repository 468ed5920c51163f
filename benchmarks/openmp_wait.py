"""Time one CPU training step of unet-tiny under OpenMP's active (spin) and passive (sleep) wait policies.

Why slct's CLI defaults OMP_WAIT_POLICY to PASSIVE: `python benchmarks/openmp_wait.py`. Each policy runs in a fresh
process, since OpenMP reads the variable once when torch loads it.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

CHILD = r"""
import time, torch
from slct.nn import build_network
from slct.precond import Precond, PrecondModel
torch.manual_seed(0)
m = PrecondModel(build_network("unet-tiny", in_channels=1, resolution=8, attn_resolutions=(4,)), Precond())
x = torch.randn(128, 1, 8, 8)
times = []
for _ in range(5):
    t = time.perf_counter()
    m(x, torch.full((128,), 1.0)).square().mean().backward()
    times.append(time.perf_counter() - t)
print(sorted(times)[2])
"""


def main() -> None:
    rows = {}
    load_before = os.getloadavg()[0]
    for policy in ("ACTIVE", "PASSIVE"):
        env = {**os.environ, "OMP_WAIT_POLICY": policy}
        out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
        rows[policy] = float(out.stdout.strip())
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from common import cpu_model

    machine = (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; "
               f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    lines = ["# OpenMP wait policy and CPU step time", "",
             f"- Machine: {machine}",
             "- What: unet-tiny forward+backward, batch 128, 1x8x8, median of 5, each policy in a fresh process",
             "- Command: `python benchmarks/openmp_wait.py`",
             f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             "| OMP_WAIT_POLICY | ms per step |", "|---|---:|"]
    lines += [f"| {policy} | {sec * 1000:.0f} |" for policy, sec in rows.items()]
    lines += ["", f"ACTIVE / PASSIVE = {rows['ACTIVE'] / rows['PASSIVE']:.1f}x. The slowdown of spinning grows with "
              "other load on the cores (a busy shared VM); `slct` sets PASSIVE unless OMP_WAIT_POLICY is set."]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "openmp-wait-cpu.json").write_text(json.dumps({"machine": machine, "seconds": rows}, indent=2) + "\n")
    (RESULTS / "openmp-wait-cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
