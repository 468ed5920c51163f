"""GPU readiness in one run: the CUDA tests, the paper UNet at batch 128 in fp32 / bf16 / bf16 + compile, a torchrun
launch, 1- and 2-step sampling with decode; one results file. Called by ``benchmarks/gpu_check.sh``.

On a CPU (``--toy``, or no CUDA) every step runs the same code at toy size (unet-tiny, batch 8, two steps, no
compile), so ``tests/test_benchmarks.py`` keeps the script from rotting where no GPU is ever lent. The data are
synthetic (random 3x32x32 "latents" through the identity codec): this measures speed and that the paths run, not
quality; it needs nothing from ../shared, so it runs on a bare GPU machine with only the checkout.

    python benchmarks/gpu_check.py                  # on a GPU: ~5 minutes, writes results/gpu-check-cuda.{json,md}
    python benchmarks/gpu_check.py --toy --out DIR  # anywhere: ~1 minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from common import machine  # noqa: E402


def run(name: str, cmd: list[str], log: list, timeout: int, env: dict | None = None) -> dict:
    """Run one step; record its command, status, seconds and output tail (a failing step does not stop the rest)."""
    t0 = time.time()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
        status, text = ("ok" if out.returncode == 0 else f"failed (exit {out.returncode})"), out.stdout + out.stderr
    except subprocess.TimeoutExpired as e:
        status, text = f"timed out after {timeout} s", (e.stdout or b"").decode(errors="replace") if isinstance(
            e.stdout, bytes) else (e.stdout or "")
    row = {"step": name, "command": shlex.join(cmd), "status": status, "seconds": round(time.time() - t0, 1),
           "tail": text[-1500:]}
    log.append(row)
    print(f"[{row['status']}] {name} ({row['seconds']} s)", flush=True)
    return row


def synthetic_latents(path: Path, n: int, resolution: int) -> Path:
    from slct.data import encode_dataset
    from slct.data.sources import ArraySource

    images = np.random.default_rng(0).integers(0, 256, (n, resolution, resolution, 3), dtype=np.uint8)
    encode_dataset(ArraySource(images, name="synthetic"), path, {"name": "identity", "channels": 3}, resolution,
                   num_workers=0, progress=False)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--toy", action="store_true", help="toy sizes on the CPU (the default without CUDA)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for the MFU column (H100/H200)")
    a = p.parse_args()
    cuda = torch.cuda.is_available() and not a.toy
    device = "cuda" if cuda else "cpu"
    size = dict(network="unet-paper", batch=128, steps=12, n=1024, sample_n=512) if cuda else \
        dict(network="unet-tiny", batch=8, steps=2, n=64, sample_n=16)
    cases = ["slct:fp32", "slct:bf16", "slct:bf16:compile"] if cuda else ["slct:fp32", "slct:bf16"]
    py, log = sys.executable, []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = synthetic_latents(work / "latents", size["n"], 32 if cuda else 8)
        # 1. the CUDA tests (they skip on a CPU; the count says so)
        # (toy: collected only, from the files that mention CUDA - on a CPU they skip or already run in the suite)
        tests = [str(HERE.parent / "tests")] if cuda else sorted(
            str(f) for f in (HERE.parent / "tests").glob("test_*.py") if "cuda" in f.read_text())
        run("CUDA tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests,
                           "-k", "cuda or bf16 or compile", "-o", "addopts=", *([] if cuda else ["--collect-only"])],
            log, 300, env={"SLCT_SLOW": "1"} if cuda else None)
        # 2. training throughput: fp32, bf16, bf16 + compile (the compile case on a GPU only)
        bench = run("training throughput", [py, str(HERE / "training.py"), "--data", str(data), "--device", device,
                                            "--network", size["network"], "--batch", str(size["batch"]),
                                            "--steps", str(size["steps"]), "--cases", *cases,
                                            "--sample-n", str(size["sample_n"]), "--out", str(work / "bench"),
                                            "--work", str(work / "bench-runs"),
                                            *(["--peak-tflops", str(a.peak_tflops)] if cuda else [])], log, 420)
        # 3. a torchrun launch (NCCL on a GPU, gloo on a CPU)
        run_dir = work / "torchrun"
        run("torchrun --nproc_per_node=1", [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                                            "-m", "slct", "train", "--preset", "slct", "--data-preset", "utkface64",
                                            "--data", str(data), "--network", size["network"], "--batch",
                                            str(size["batch"]), "--steps", "4", "--device", device, "--out",
                                            str(run_dir), "--no-progress", "--set", "logging.log_every_steps=2",
                                            "--set", "train.ema_power_every_steps=0"], log, 300)
        # 4. 1- and 2-step sampling with decode from that run
        sample = run("sampling 1 and 2 steps", [py, "-m", "slct", "sample", str(run_dir), "--n", str(size["sample_n"]),
                                                "--nfe", "1", "2", "--device", device, "--format", "npz",
                                                "--out", str(work / "samples")], log, 300)
        if sample["status"] == "ok":
            for nfe in (1, 2):
                with np.load(work / "samples" / f"samples-nfe{nfe}.npz") as z:
                    sample[f"images_nfe{nfe}"] = list(z["images"].shape)
        throughput = None
        if bench["status"] == "ok":
            throughput = json.loads((work / "bench" / f"training-{device}.json").read_text())
    record = {"kind": "cuda" if cuda else "cpu-toy", "machine": machine(device), "size": size, "cases": cases,
              "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
              "command": shlex.join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]]), "steps": log,
              "throughput": throughput, "all_ok": all(r["status"] == "ok" for r in log)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"gpu-check-{record['kind']}"
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# GPU readiness check ({record['kind']})", "", f"- Command: `{record['command']}` ({record['date']})",
             "- Machine: " + ", ".join(f"{k} {v}" for k, v in record["machine"].items()), "",
             "| step | status | seconds |", "|---|---|---:|"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']} |" for r in log]
    if throughput:
        lines += ["", "| case | step (ms) | images/s | peak memory (GiB) | TFLOP/s |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['case']} | {1000 * r['sec_per_step']:.1f} | {r['images_per_s']:.0f} | {r['peak_mem_gib']:.2f} "
                  f"| {r['achieved_tflops']:.2f} |" for r in throughput["rows"]]
        lines += [f"- sampling {s['method']} {s['nfe']} NFE: {s['images_per_s']:.1f} images/s (incl. decode)"
                  for s in throughput["sampling"]]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"results -> {out / name}.json ({'all steps ok' if record['all_ok'] else 'SOME STEPS FAILED'})")
    return 0 if record["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
