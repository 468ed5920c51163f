"""Atomic checkpoint files: write to a temporary file, fsync, then rename over the final name.

A crash, kill -9 or full disk at any moment leaves either the old set of checkpoints or the old set plus one complete
new file, never a truncated one; older checkpoints are pruned only after the new one is in place.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import torch

_CKPT = re.compile(r"^checkpoint-(\d{8})\.pt$")


def save_atomic(obj, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        hint = " (disk full)" if e.errno == errno.ENOSPC else ""
        raise RuntimeError(f"could not write {path}{hint}: {e}; the previous checkpoints are untouched") from e
    return path


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"checkpoint-{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _CKPT.match(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune(run_dir: str | Path, keep: int) -> None:
    for p in list_checkpoints(run_dir)[:-keep]:
        p.unlink(missing_ok=True)


def load(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a foreign or damaged file: say which
        raise RuntimeError(f"{path} is not a readable slct checkpoint: {e}") from e
