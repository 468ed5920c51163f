"""What every benchmark records about the machine it ran on (imported by the scripts beside it)."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path

import torch


# The run-length settings the studies compare (benchmarks/study.py on UTKFace, benchmarks/digits.py on the demo's
# data), each spelling out all six, so a run means the same whatever a preset holds today:
# - authors: eq. 10's stages of K/7 steps up to N = 641, RAdam's weight decay coupled to the lr on every tensor;
# - budget: stages at least 125 steps long, decay decoupled and none on norms and biases (docs/training.md);
# - budget-n81: budget with eq. 10's doubling stopped at N = 81 (s1 = 80: four stages of K/4 steps).
NO_STAGE_REMEDIES = {"optim.stage_warmup_steps": 0, "optim.grad_scale_beta": 0.0}  # neither study used them
SETTINGS = {
    "authors": {"objective.min_stage_steps": 0, "objective.s1": 640, "optim.decoupled_weight_decay": False,
                "optim.decay_norms_and_biases": True, **NO_STAGE_REMEDIES},
    "budget": {"objective.min_stage_steps": 125, "objective.s1": 640, "optim.decoupled_weight_decay": True,
               "optim.decay_norms_and_biases": False, **NO_STAGE_REMEDIES},
}
SETTINGS["budget-n81"] = {**SETTINGS["budget"], "objective.s1": 80}


def overrides(variant: str) -> list[str]:
    """A variant's settings as `slct --set` values (KEY=VALUE, YAML spelling)."""
    return [f"{key}={str(value).lower() if isinstance(value, bool) else value}"
            for key, value in SETTINGS[variant].items()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device | str = "cpu") -> dict:
    """CPU model, cores, threads, versions, the 1-min load average (other work skews CPU timings), and the GPU."""
    device = torch.device(device)
    info = {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "load_average_1min": round(os.getloadavg()[0], 2)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_report(path: Path, lines: list[str]) -> Path:
    """A report's Markdown: written (one trailing newline), shown on the terminal, and its path returned."""
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


def load_sibling(name: str):
    """Another benchmark script of this folder as a module (the scripts are files, not a package)."""
    spec = importlib.util.spec_from_file_location(f"slct_bench_{name}", Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
