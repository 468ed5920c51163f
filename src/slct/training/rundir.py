"""The run directory: its creation and clean-up, checkpoints (all training state, for resuming), snapshots (EMA
weights, for sampling), the run's config and metadata files, resume and rollback.

Resuming is re-running the same command: the newest checkpoint is restored, after checking that the config and the
data (codec, normalisation, latent shape) are the ones the run started with.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from slct import __version__, checkpoint, distributed
from slct.config import Config
from slct.ema import EMA, PowerEMA, default_ema
from slct.training.health import state_finite
from slct.training.state import TrainState, rng_state, set_rng_state

# config sections a resumed run may change: they do not alter the training trajectory
RESUMABLE_CHANGES = ("logging.", "checkpoint.", "train.device", "train.compile", "train.tf32", "train.prefetch_batches",
                     "train.max_rollbacks", "data.path", "preset")


@dataclass
class Run:
    """One run's state as its files hold it: what checkpoints save and restore, what snapshots are made of."""

    dir: Path
    cfg: Config
    meta: dict  # codec, normalizer, latent shape, classes, network kwargs, data source: saved in every file
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA
    state: TrainState
    dist: distributed.DistInfo
    teacher: torch.nn.Module | None = None  # consistency distillation's frozen diffusion teacher (not saved)

    def __post_init__(self):
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # listed once, used every step

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@contextlib.contextmanager
def removed_if_start_fails(run_dir: Path, is_main: bool):
    """A run directory this start created is removed again if the start fails (no empty run folders)."""
    created = is_main and not run_dir.exists()
    try:
        yield
    except BaseException:
        if created and not checkpoint.list_checkpoints(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


class RunDirectoryLocked(RuntimeError):
    """Another live process trains in this run directory."""


class RunLock:
    """One training process per run directory: ``RUN/lock`` names the holder (pid, host, start) and is held with an
    OS lock (``flock``) that ends with the process, however it ends, so a lock left by a dead process is taken over
    by the next start. Where the file system has no ``flock`` (some network mounts), a holder on this host whose pid
    is gone counts as stale; one on another host is trusted (delete the file if that host's run is gone)."""

    NAME = "lock"

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / self.NAME
        self.fd: int | None = None
        self.took_over: dict | None = None  # the previous holder, when a stale lock was taken over

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = self._read(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirectoryLocked(self._refusal(holder)) from None
        except OSError as e:  # no flock here: decide by the recorded pid
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS) or self._alive(holder):
                os.close(fd)
                raise RunDirectoryLocked(self._refusal(holder)) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
        if holder and holder.get("pid") and (holder.get("pid"), holder.get("host")) != (me["pid"], me["host"]):
            self.took_over = holder
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # no holder: an empty file is not a lock
            os.close(self.fd)  # closing ends the flock
            self.fd = None

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (ValueError, UnicodeDecodeError):
            return {}

    @staticmethod
    def _alive(holder: dict) -> bool:
        if not holder.get("pid"):
            return False
        if holder.get("host") != socket.gethostname():
            return True  # cannot tell from here
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _refusal(self, holder: dict) -> str:
        who = (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}" if holder
               else "a process that left no name")
        return (f"{self.path.parent} is in use by another training process ({who}); wait for it to finish or stop "
                f"it, or train into another --out (if no such process runs, delete {self.path})")


def prepare_run_dir(run_dir: Path, is_main: bool, device: torch.device) -> RunLock | None:
    """Create the run directory and hold it (rank 0; see RunLock); then remove the temporary files of writes that
    a kill -9 interrupted. Every rank learns whether rank 0 got the directory before any raises."""
    lock, error = None, None
    if is_main:
        try:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            if not os.access(run_dir, os.W_OK):
                raise PermissionError(f"the run directory {run_dir} is not writable")
            lock = RunLock(run_dir).acquire()
        except RunDirectoryLocked as e:
            error = e
        except OSError as e:
            error = PermissionError(f"cannot create the run directory {run_dir}: {e}")
        if lock is not None:
            if lock.took_over:
                print(f"took over the run directory from pid {lock.took_over.get('pid')} on "
                      f"{lock.took_over.get('host')}, which no longer runs", file=sys.stderr)
            # temporary files of writes a kill -9 interrupted: nothing refers to them (we hold the directory)
            for stale in checkpoint.remove_stale_temporaries(run_dir / "checkpoints") \
                    + checkpoint.remove_stale_temporaries(run_dir):
                print(f"removed {stale} (left by an interrupted write)", file=sys.stderr)
    (ok,) = distributed.all_true([error is None], device)
    if not ok:
        raise error or RunDirectoryLocked(f"rank 0 could not open the run directory {run_dir}")
    distributed.barrier()
    return lock


def write_run_files(run: Run, parameters: int, data_size: int, device: torch.device) -> None:
    """config.yaml (the resolved config) and run.json (version, sizes, data and codec metadata) beside the run."""
    (run.dir / "config.yaml").write_text(yaml.safe_dump(run.cfg.to_dict(), sort_keys=False))
    (run.dir / "run.json").write_text(json.dumps({
        "slct_version": __version__, "parameters": parameters, "data_size": data_size,
        "world_size": run.dist.world_size, "device": str(device), **run.meta}, indent=2, default=str))


def resume_path(run_dir: Path, resume: str) -> Path | None:
    if resume == "none":
        if checkpoint.list_checkpoints(run_dir):
            raise FileExistsError(f"{run_dir} already holds checkpoints; use --resume auto to continue that run, or "
                                  "another --out for a new one (nothing was overwritten)")
        return None
    if resume == "auto":
        return checkpoint.latest_checkpoint(run_dir)
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file")
    return path


def restore(run: Run, resume: str) -> Path | None:
    """Restore the checkpoint ``resume`` names into ``run`` and return its path; None for a new run.

    ``resume``: "auto" (the newest readable checkpoint of the run, if any), "none" (a new run) or a file. With
    "auto", a newest checkpoint that cannot be read (truncated, corrupted) is kept as ``NAME.damaged`` with a warning
    and the one before it is used; one that holds objects slct does not load stops the start, saying how to go on.
    """
    if resume != "auto":
        path = resume_path(run.dir, resume)
        if path is not None:
            load_checkpoint(path, run)
        return path
    found = checkpoint.list_checkpoints(run.dir)
    for i in range(len(found) - 1, -1, -1):
        path, before = found[i], found[i - 1] if i else None
        try:
            load_checkpoint(path, run)
            return path
        except checkpoint.DamagedFileError as e:
            if run.dist.is_main:
                path.rename(path.with_name(path.name + ".damaged"))
                print(f"warning: {e}; kept as {path.name}.damaged, "
                      + (f"resuming from {before.name} instead" if before else "and no older checkpoint remains"),
                      file=sys.stderr)
            if before is None:
                raise checkpoint.DamagedFileError(
                    f"no readable checkpoint in {run.dir / 'checkpoints'} ({path.name} was damaged, kept as "
                    f"{path.name}.damaged); start a new run with another --out") from None
        except checkpoint.UnsafeFileError as e:
            remedy = (f"delete it (or move it out of checkpoints/) and re-run to resume from {before.name}, or pass "
                      f"--resume {before}" if before else "delete it and re-run to start the run anew")
            raise checkpoint.UnsafeFileError(f"{e}. To continue, {remedy}") from None
    return None


def save_checkpoint(run: Run, logger=None) -> bool:
    """Write the training state if all of it is finite (else log why not); True when written.

    Every rank takes the same branch: the finiteness flag is all-reduced before any collective.
    """
    state, dist = run.state, run.dist
    (finite,) = distributed.all_true([state_finite(run.model, run.optimizer, run.ema)], run.device)
    if not finite:
        if logger is not None:
            logger.event(f"checkpoint at step {state.step} not written: the weights or optimizer state hold "
                         "non-finite values", state.step)
        return False
    payload = {
        "format": checkpoint.CHECKPOINT_FORMAT, "slct_version": __version__, "config": run.cfg.to_dict(), **run.meta,
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "ema": run.ema.state_dict(),
        "state": state.to_dict(), "rng": distributed.gather_objects(rng_state()),
    }
    error, disk_full = None, False
    if dist.is_main:
        path = checkpoint.checkpoint_path(run.dir, state.step)
        try:
            checkpoint.save_atomic(payload, path, what=f"checkpoint {state.step}")
            checkpoint.prune(run.dir, run.cfg.checkpoint.keep)
        except checkpoint.SaveError as e:
            newest = checkpoint.latest_checkpoint(run.dir)
            error = f"{e}; the newest good checkpoint is {newest.name if newest else 'none'}"
            if e.disk_full:
                error += " (free some space, then re-run the same command to resume from it)"
            disk_full = e.disk_full
    (saved,) = distributed.all_true([error is None], run.device)  # all ranks stop together
    if not saved:
        raise checkpoint.SaveError(error or f"rank 0 could not write checkpoint {state.step}", disk_full=disk_full)
    return True


def load_checkpoint(path: Path, run: Run) -> None:
    """Restore ``run`` from the checkpoint at ``path`` after checking its config and data match the run's."""
    ckpt = checkpoint.load(path, expect=checkpoint.CHECKPOINT_FORMAT)  # never runs code from the file
    from slct.config import config_from_dict

    # the saved config through today's dataclasses: keys added since it was written take their defaults
    diffs = config_differences(config_from_dict(ckpt["config"]).to_dict(), run.cfg.to_dict())
    if diffs:
        raise ValueError(f"{path} was written by a run with another config ({'; '.join(diffs)}); re-run with the "
                         "same settings to resume, or use another --out for a new run")
    for key, what in (("codec", "codec"), ("normalizer", "normalisation"), ("latent_shape", "latent shape")):
        if ckpt.get(key) != run.meta[key]:
            raise ValueError(f"the data's {what} differs from the checkpoint's ({path}): "
                             f"{describe_difference(ckpt.get(key), run.meta[key])}; resume with the data the run "
                             "started with, or use another --out for a new run")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.ema.load_state_dict(ckpt["ema"])
    for k, v in ckpt["state"].items():
        setattr(run.state, k, v)
    rngs = ckpt["rng"]
    rank = torch.distributed.get_rank() if distributed.is_active() else 0
    if rank < len(rngs):
        set_rng_state(rngs[rank])


def rollback(run: Run, logger) -> None:
    """Back to the newest checkpoint after a streak of non-finite steps, with a lower learning rate."""
    cfg, state = run.cfg, run.state
    path = checkpoint.latest_checkpoint(run.dir)
    bad, rollbacks, lr_scale, at = state.bad_steps, state.rollbacks, state.lr_scale, state.step
    load_checkpoint(path, run)
    state.bad_steps, state.rollbacks = bad, rollbacks + 1
    state.lr_scale = lr_scale * cfg.train.rollback_lr_factor
    logger.rewind(state)
    logger.event(f"{cfg.train.max_bad_steps} consecutive non-finite steps up to step {at}: restored {path.name} "
                 f"(step {state.step}) and lowered the learning rate to {state.lr_scale:g} x optim.lr "
                 f"(rollback {state.rollbacks} of at most {cfg.train.max_rollbacks})", at)


def save_snapshot(run: Run, power_only: bool = False) -> Path:
    """A snapshot: every tracked EMA and the online weights (for sampling; ``power_only``: the power EMAs alone in
    power-ema/, the material of `slct ema`'s post-hoc reconstruction)."""
    from slct.sampling import snapshot_payload

    cfg, meta, state, ema = run.cfg, run.meta, run.state, run.ema
    folder = run.dir / "power-ema" if power_only else run.dir
    names = [p.name for p in ema.profiles if isinstance(p, PowerEMA) or not power_only]
    weights = {name: ema.weights(name) for name in names}
    if not power_only:
        weights["online"] = run.model.state_dict()
    payload = snapshot_payload(cfg, weights, meta["network_kwargs"], meta["codec"], meta["normalizer"],
                               meta["latent_shape"], meta["num_classes"], state.step, state.nimg,
                               data_source=meta.get("data_source"),
                               ema_default=default_ema(names, cfg.train.ema_default))
    folder.mkdir(exist_ok=True)
    path = checkpoint.save_atomic(payload, folder / f"snapshot-{state.step:08d}.pt", what=f"snapshot {state.step}")
    if not power_only:  # a run sliced by --minutes keeps only its newest off-schedule snapshot, not one per slice
        for old in folder.glob("snapshot-*.pt"):
            step = int(old.stem.split("-")[1])
            if step < state.step and step % cfg.checkpoint.snapshot_every_steps and step != cfg.train.total_steps:
                old.unlink(missing_ok=True)
    return path


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """The settings that differ between two config dicts, except those a resumed run may change."""
    out = []
    for key in sorted(set(saved) | set(current)):
        full = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "options":
            out += config_differences(a, b, f"{full}.")
        elif a != b and not any(full.startswith(p) for p in RESUMABLE_CHANGES):
            out.append(f"{full}: {a!r} -> {b!r}")
    return out


def describe_difference(saved, current, where: str = "") -> str:
    """Where two JSON-like values first differ, in one short phrase (never whole arrays)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current), key=str):
            if saved.get(key) != current.get(key):
                return describe_difference(saved.get(key), current.get(key), f"{where}.{key}" if where else str(key))
    label = f"{where}: " if where else ""
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        try:
            a, b = np.asarray(saved, dtype=np.float64), np.asarray(current, dtype=np.float64)
        except (TypeError, ValueError):
            a = b = None
        if a is not None and a.shape != b.shape:
            return f"{label}shape {a.shape} vs {b.shape}"
        if a is not None:
            diff = np.abs(a - b)
            first = np.unravel_index(int(np.argmax(diff != 0)), a.shape) if a.ndim else ()
            return (f"{label}{int((diff != 0).sum())} of {a.size} values differ (largest difference "
                    f"{float(diff.max()):.4g}; first at {list(map(int, first))}: {a[first]:.6g} vs {b[first]:.6g})")
    text = lambda v: (r if len(r := repr(v)) <= 60 else r[:57] + "...")  # noqa: E731
    return f"{label}{text(saved)} vs {text(current)}"
