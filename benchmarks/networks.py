"""Parameter counts and forward+backward timings of the network presets (REFERENCE.md [6]).

    python benchmarks/networks.py                      # CPU: all presets counted, the feasible ones timed
    python benchmarks/networks.py --device cuda --amp bf16 --channels-last --compile

Each timed step is one training-style pass of the bare backbone at the preset's default input
shape: ``net(x, c_noise).square().mean().backward()`` in train mode, x (batch, C, H, W) standard
normal, c_noise = 250 ln(sigma) for sigma ~ lognormal. The median over ``--repeats`` steps after
``--warmup`` steps is reported. Presets above ``--max-timed-params`` (default: 200M on a CPU, no
limit on a GPU) are only counted, on the meta device (no memory, no compute).

Prints a Markdown table and writes ``networks-<device>.json`` and ``.md`` to ``--out``, with the
machine (CPU model, cores, threads, GPU, torch version) and the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from slct.nn import NETWORK_PRESETS, build_network

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def count_parameters(name: str) -> int:
    with torch.device("meta"):
        net = build_network(name)
    return sum(p.numel() for p in net.parameters())


def time_fwd_bwd(name: str, device: torch.device, batch: int, repeats: int, warmup: int,
                 amp: torch.dtype | None, channels_last: bool, compile_net: bool) -> dict:
    """Median seconds of one forward+backward step of preset ``name`` (and peak memory on CUDA)."""
    net = build_network(name).to(device).train()
    shape = NETWORK_PRESETS[name][1]
    x = torch.randn(batch, shape["in_channels"], shape["resolution"], shape["resolution"], device=device)
    c_noise = 250 * (torch.randn(batch, device=device) * 2.0 - 1.1)  # 250 ln(sigma), ln(sigma) ~ N(-1.1, 2^2)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    step_net = torch.compile(net) if compile_net else net
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    def step() -> None:
        net.zero_grad(set_to_none=True)
        with autocast:
            out = step_net(x, c_noise)
        out.float().square().mean().backward()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    result = {"fwd_bwd_s": statistics.median(times), "all_s": times, "warmup_s": warmup_s}
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def markdown(rows: list[dict], meta: dict) -> str:
    m = meta["machine"]
    s = meta["settings"]
    lines = [
        f"# Network presets: parameters and forward+backward time ({meta['device']})",
        "",
        f"- Machine: {m['cpu']}, {m['cpu_cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)"
        + (f", GPU {m['gpu']} (CUDA {m['cuda']})" if "gpu" in m else "")
        + f"; 1-min load average {m['load_average_1min']} at the start",
        f"- Settings: batch {s['batch']}, median of {s['repeats']} steps after {s['warmup']} warm-up, "
        f"amp {s['amp']}, channels_last {s['channels_last']}, torch.compile {s['compile']}",
        "- Step: `net(x, c_noise).square().mean().backward()` in train mode at the preset's default input shape",
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}",
    ]
    if meta["device"] == "cpu" and m["load_average_1min"] > m["cpu_cores"]:
        lines.append("- The CPU was shared with other work (load above the core count): the times are upper bounds.")
    lines += [
        "",
        "| preset | architecture | parameters | input (C x H x W) | fwd+bwd (ms) | samples/s |"
        + (" peak memory (GiB) |" if meta["device"] == "cuda" else ""),
        "|---|---|---:|---|---:|---:|" + ("---:|" if meta["device"] == "cuda" else ""),
    ]
    for r in rows:
        timed = r.get("fwd_bwd_s") is not None
        ms = f"{1000 * r['fwd_bwd_s']:.1f}" if timed else "not timed"
        rate = f"{r['batch'] / r['fwd_bwd_s']:.1f}" if timed else "-"
        line = (f"| {r['preset']} | {r['architecture']} | {r['parameters']:,} ({r['parameters'] / 1e6:.1f}M) "
                f"| {r['input']} | {ms} | {rate} |")
        if meta["device"] == "cuda":
            line += f" {r['peak_mem_gib']:.2f} |" if timed else " - |"
        lines.append(line)
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--presets", nargs="*", default=list(NETWORK_PRESETS), choices=list(NETWORK_PRESETS),
                        metavar="NAME", help="presets to include")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--amp", choices=list(AMP_DTYPES), default="none", help="autocast dtype")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone (inductor)")
    parser.add_argument("--max-timed-params", type=float, default=None,
                        help="count but do not time presets above this many parameters "
                             "(default: 200e6 on a CPU, no limit on a GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--suffix", default="", help="appended to the result file names (write --suffix=-bf16)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    limit = args.max_timed_params if args.max_timed_params is not None else (
        200e6 if device.type == "cpu" else math.inf)
    torch.manual_seed(0)

    rows = []
    for name in args.presets:
        cls, kwargs = NETWORK_PRESETS[name]
        row = {"preset": name, "architecture": cls.__name__, "parameters": count_parameters(name),
               "input": f"{kwargs['in_channels']} x {kwargs['resolution']} x {kwargs['resolution']}",
               "batch": args.batch, "fwd_bwd_s": None}
        if row["parameters"] <= limit:
            row.update(time_fwd_bwd(name, device, args.batch, args.repeats, args.warmup, AMP_DTYPES[args.amp],
                                    args.channels_last, args.compile))
        rows.append(row)
        status = f"{1000 * row['fwd_bwd_s']:.1f} ms" if row["fwd_bwd_s"] is not None else "not timed"
        print(f"{name}: {row['parameters']:,} parameters, {status}", file=sys.stderr, flush=True)

    meta = {
        "device": device.type,
        "machine": machine(device),
        "settings": {"batch": args.batch, "repeats": args.repeats, "warmup": args.warmup, "amp": args.amp,
                     "channels_last": args.channels_last, "compile": args.compile,
                     "max_timed_params": None if math.isinf(limit) else limit},
        "command": " ".join(["python", "benchmarks/networks.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    table = markdown(rows, meta)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"networks-{device.type}{args.suffix}"
    (args.out / f"{stem}.json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
