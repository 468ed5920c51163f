"""Training and sampling speed: images/s, step time, peak memory, FLOP utilisation, the OT coupling's share.

    python benchmarks/training.py --data /tmp/slct-ablation/utk64-train          # CPU, the utkface64 preset
    python benchmarks/training.py --data LATENTS --device cuda --network unet-paper --batch 128 \\
        --cases slct:fp32 slct:bf16 slct:bf16:compile ilct:fp32 ldm:fp32            # a GPU, the paper's UNet

Each case is one `slct.train` run of ``--steps`` steps in a fresh process (so peak memory is its own), timed on
its last ``--steps // 2`` steps (``sec_per_step`` of ``metrics.jsonl``). A case is ``METHOD:PRECISION[:compile]
[:inline][:KEY=VALUE...]`` (config overrides, e.g. ``soflow:fp32:objective.soflow_target_rows=all``); ``inline`` prepares each batch (data, noise, OT coupling, timesteps) in the step instead of in the
background thread, which shows what the coupling costs on the critical path. The OT share is the coupling's
compute time over the step time (the paper: 0.93%).

FLOPs of one training step (the no-grad target pass plus the online pass with its backward) are counted with
``torch.utils.flop_counter`` and divided by the step time; on a GPU the model FLOP utilisation is that over the
device's dense peak (``--peak-tflops``, e.g. 989 for an H100/H200 in bf16, 494 in TF32).

Sampling: images/s of 1- and 2-step generation including the decode, and of the ldm baseline's Heun sampler
at its NFE, from the snapshots those runs wrote (the weights do not change the speed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, sync  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def case_config(case: str, a) -> tuple:
    from slct.config import load_config

    method, precision, *flags = case.split(":")
    sets = [f"train.total_steps={a.steps}", f"train.batch_size={a.batch}", f"train.device={a.device}",
            f"train.precision={precision}", f"train.compile={'compile' in flags}",
            f"train.prefetch_batches={0 if 'inline' in flags else 2}", f"logging.log_every_steps={a.steps // 2}",
            "logging.sample_every_steps=0", "logging.grid_size=4", f"checkpoint.every_steps={a.steps}",
            f"checkpoint.snapshot_every_steps={a.steps}", f"train.channels_last={a.device != 'cpu'}"]
    if a.network:
        sets.append(f"network.name={a.network}")
    sets += [f for f in flags if "=" in f]  # KEY=VALUE flags: config overrides of this case
    return load_config(method, "utkface64", sets=sets, overrides={"data": {"path": a.data}}), method


def count_step_flops(cfg, device: torch.device) -> float:
    """FLOPs of one training step of ``cfg`` (target pass, online pass, backward), counted on real shapes."""
    from torch.utils.flop_counter import FlopCounterMode

    from slct.data import LatentDataset
    from slct.model import build_model
    from slct.objectives import build_objective

    ds = LatentDataset(cfg.data.path, normalization=cfg.data.normalization)
    shape = tuple(ds.latent_shape)
    model = build_model(cfg, shape, 0).to(device)
    objective = build_objective(cfg.objective, cfg.train.total_steps)
    x0 = torch.randn(cfg.train.batch_size, *shape, device=device)
    with FlopCounterMode(display=False) as counter:
        objective(model, x0, cfg.train.total_steps // 2).total.mean().backward()
    return float(counter.get_total_flops())


def run_case(case: str, a) -> dict:
    """One case in this process: train, then read the timing window back (called in a child process)."""
    from slct.training import train

    cfg, method = case_config(case, a)
    device = torch.device("cuda" if a.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = Path(a.work) / case.replace(":", "-")
    train(cfg, out, resume="none", progress=False)
    last = [json.loads(line) for line in open(out / "metrics.jsonl") if '"sec_per_step"' in line][-1]
    peak = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # Linux: KiB
    flops = count_step_flops(cfg, device)
    return dict(case=case, method=method, network=cfg.network.name, batch=cfg.train.batch_size,
                sec_per_step=last["sec_per_step"], images_per_s=last["images_per_s"], ot_share=last["ot_share"],
                peak_mem_gib=peak, peak_kind="cuda allocated" if device.type == "cuda" else "process RSS",
                step_gflop=flops / 1e9, achieved_tflops=flops / 1e12 / last["sec_per_step"],
                snapshot=str(sorted(out.glob("snapshot-*.pt"))[-1]))


def time_sampling(snapshot: str, nfe: int, n: int, batch: int, device: str) -> float:
    """Images/s of generate() (sampling + decode) for n images in batches, after one warm-up batch."""
    from slct.sampling import load_snapshot

    snap = load_snapshot(snapshot, device=device)
    with torch.no_grad():
        snap.generate(list(range(batch)), nfe)
        sync(torch.device(device))
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            snap.generate(list(range(start, min(n, start + batch))), nfe)
        sync(torch.device(device))
    return n / (time.perf_counter() - t0)


def markdown(rows: list[dict], sampling: list[dict], meta: dict, peak_tflops: float | None) -> str:
    m = meta["machine"]
    lines = ["# Training and sampling speed", "",
             f"- Machine: {m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} torch threads)"
             + (f", {m['gpu']}" if "gpu" in m else "") + f"; torch {m['torch']}; 1-min load average "
             f"{m['load_average_1min']} at the start",
             f"- Command: `{meta['command']}` ({meta['date']})",
             f"- Data: `{meta['data']}`; each case trains {meta['steps']} steps in a fresh process, timed on the last "
             f"{meta['steps'] // 2}", "",
             "| case | network | batch | step (ms) | images/s | OT share | peak memory (GiB) | GFLOP/step | TFLOP/s"
             + (" | MFU |" if peak_tflops else " |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:" + ("|---:|" if peak_tflops else "|")]
    for r in rows:
        mfu = f" | {100 * r['achieved_tflops'] / peak_tflops:.1f}% |" if peak_tflops else " |"
        lines.append(f"| {r['case']} | {r['network']} | {r['batch']} | {1000 * r['sec_per_step']:.0f} | "
                     f"{r['images_per_s']:.0f} | {100 * r['ot_share']:.2f}% | {r['peak_mem_gib']:.2f} "
                     f"({r['peak_kind']}) | {r['step_gflop']:.1f} | {r['achieved_tflops']:.4f}" + mfu)
    lines += ["", "| sampler | NFE | images/s (incl. decode) |", "|---|---:|---:|"]
    lines += [f"| {s['method']} | {s['nfe']} | {s['images_per_s']:.1f} |" for s in sampling]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a latent dataset (e.g. UTKFace 64 px TAEF2 latents)")
    p.add_argument("--cases", nargs="+", default=["slct:fp32", "slct:fp32:inline", "ilct:fp32", "ldm:fp32",
                                                  "slct:fp32", "slct:fp32:inline"])
    p.add_argument("--network", default=None, help="network preset (default: the utkface64 preset's unet-small)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sample-n", type=int, default=256)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak, for the MFU column")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--work", default=None, help="run directories (default: a temporary folder)")
    p.add_argument("--name", default=None, help="results file stem (default: training-DEVICE)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    a = p.parse_args()
    if a.one:
        print("RESULT " + json.dumps(run_case(a.one, a)))
        return
    meta = dict(machine=machine(a.device), date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
                command=shlex.join(["python", "benchmarks/training.py", *sys.argv[1:]]), data=a.data, steps=a.steps)
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or tmp
        rows = []
        for i, case in enumerate(a.cases):  # a case may repeat (to see the timing noise): one folder each
            cmd = [sys.executable, __file__, "--one", case, "--work", f"{work}/{i}", "--data", a.data, "--batch", str(a.batch),
                   "--steps", str(a.steps), "--device", a.device, *(["--network", a.network] if a.network else [])]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"case {case} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(next(line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT "))))
            print(f"{case}: {1000 * rows[-1]['sec_per_step']:.0f} ms/step, {rows[-1]['images_per_s']:.0f} images/s",
                  flush=True)
        sampling = []
        for r in rows:
            if r["case"].split(":")[1:] != ["fp32"] or any(s["method"] == r["method"] for s in sampling):
                continue  # one sampling measurement per method, from its first plain fp32 run
            from slct.sampling import default_nfe, load_snapshot

            snap = load_snapshot(r["snapshot"])
            for nfe in default_nfe(snap.config.objective, snap.config.sampling):
                ips = time_sampling(r["snapshot"], nfe, a.sample_n, a.batch, a.device)
                sampling.append(dict(method=r["method"], nfe=nfe, images_per_s=ips))
                print(f"sampling {r['method']} {nfe} NFE: {ips:.1f} images/s", flush=True)
    text = markdown(rows, sampling, meta, a.peak_tflops)
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = a.name or f"training-{a.device}"
    (out / f"{name}.json").write_text(json.dumps(dict(meta=meta, rows=rows, sampling=sampling), indent=2) + "\n")
    (out / f"{name}.md").write_text(text)


if __name__ == "__main__":
    main()
