"""The training loop: one function wiring data pipeline, objective, optimiser, EMAs, checkpoints and logging.

Resuming is re-running the same command: the loop restores the newest checkpoint of the run directory and continues.
Since every step's randomness is a pure function of (seed, step) (see ``slct.pipeline``), a run stopped at any point
(kill -9 included) and resumed produces bitwise the same weights as an uninterrupted run on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from slct import __version__, checkpoint, distributed
from slct.config import Config
from slct.ema import EMA, PowerEMA, default_ema, profiles_from_config
from slct.model import build_model, count_parameters, network_kwargs
from slct.objectives import build_objective
from slct.pipeline import BatchPipeline, step_seed

# config sections a resumed run may change: they do not alter the training trajectory
RESUMABLE_CHANGES = ("logging.", "checkpoint.", "train.device", "train.compile", "train.tf32", "train.prefetch_batches",
                     "train.max_rollbacks", "data.path", "preset")


@dataclass
class TrainState:
    step: int = 0
    nimg: int = 0
    lr_scale: float = 1.0  # lowered at each rollback after repeated non-finite steps
    bad_steps: int = 0  # non-finite steps skipped in total
    rollbacks: int = 0
    wall_seconds: float = 0.0
    c_table: dict = field(default_factory=dict)  # c_schedule "calibrated": str(N) -> c measured at the stage start

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class TrainResult:
    run_dir: Path
    state: TrainState
    finished: bool  # reached total_steps
    stopped_by: str  # "done" | "until_step" | "minutes" | "signal"
    files: dict = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but no CUDA device is available")
    return device


def open_dataset(cfg: Config):
    from slct.data import LatentDataset

    if not cfg.data.path:
        raise ValueError("no training data: pass --data DIR (a latent dataset from `slct encode`) or --data-preset")
    if not cfg.data.path.startswith("builtin:") and not Path(cfg.data.path).exists():
        raise FileNotFoundError(f"data path {cfg.data.path} does not exist (create it with `slct encode`)")
    if cfg.data.hflip and cfg.data.path and not cfg.data.path.startswith("builtin:"):
        codec = LatentDataset(cfg.data.path, normalization="none").codec_spec.get("name")
        if codec != "identity":
            raise ValueError(f"data.hflip flips latents, which is only valid in pixel space (identity codec); this "
                             f"dataset's codec is {codec!r}: store flipped copies with `slct encode --hflip-copies`")
    return LatentDataset(cfg.data.path, normalization=cfg.data.normalization, sigma_data=cfg.objective.sigma_data,
                         scale=cfg.data.scale, hflip=False)  # flips are drawn by the pipeline (deterministic)


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        full = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "options":
            out += config_differences(a, b, f"{full}.")
        elif a != b and not any(full.startswith(p) for p in RESUMABLE_CHANGES):
            out.append(f"{full}: {a!r} -> {b!r}")
    return out


def _rng_state() -> dict:
    """The global RNG states as tensors and plain values only, so checkpoints load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class _StopSignals:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the step and returns."""

    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        if threading_main():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _global_norm(tensors) -> torch.Tensor:
    """The L2 norm of all floating-point ``tensors`` together (float64; inf or nan when any entry is), no sync."""
    floats = [t for t in tensors if t is not None and t.is_floating_point() and t.numel()]
    if not floats:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(torch._foreach_norm(floats)).double().norm()


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global gradient norm (its finiteness decides whether a step is taken)."""
    return _global_norm([p.grad for p in params])


def _state_finite(model, optimizer, ema) -> bool:
    """Weights, optimizer moments and EMAs all finite: the condition for writing a checkpoint."""
    moments = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    shadows = [v for shadow in ema.shadows for v in shadow.values()]
    return bool(torch.isfinite(_global_norm([*model.state_dict().values(), *moments, *shadows]).cpu()))


def build_optimizer(optim_cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """RAdam (REFERENCE [8]) with the weight-decay options: coupled (authors) or decoupled, on every tensor
    (authors) or on the matrices and kernels only (``decay_norms_and_biases=False``: no decay on 1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 and not optim_cfg.decay_norms_and_biases else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.RAdam(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                             decoupled_weight_decay=optim_cfg.decoupled_weight_decay)


class TrainingDiverged(RuntimeError):
    """Non-finite steps continued after train.max_rollbacks rollbacks; the run stopped (its checkpoints are finite)."""


@dataclass
class _Health:
    """Non-finite step bookkeeping of one train() call (the totals live in TrainState)."""

    consecutive_bad: int = 0
    last_finite_loss: float = float("nan")
    last_finite_step: int = -1
    checkpoint_due: bool = False  # a periodic checkpoint fell inside a streak of bad steps: write it at the next good one


def train(cfg: Config, run_dir: str | Path, resume: str = "auto", until_step: int | None = None,
          max_minutes: float | None = None, progress: bool | str = True, loss_hook=None) -> TrainResult:
    """Train ``cfg`` in ``run_dir``; stop at ``until_step`` / after ``max_minutes`` (with a checkpoint) to train in slices.

    ``progress``: "bar" (True), "lines" (a plain line per logging interval and a final line, for logs and
    ``--no-progress``) or "none" (False). ``loss_hook(step, loss) -> loss`` may replace the loss tensor
    (fault-injection tests, custom regularisers). Raises ``TrainingDiverged`` when non-finite steps persist after
    ``train.max_rollbacks`` rollbacks.
    """
    cfg.validate()
    if cfg.logging.eval_every_steps and not Path(cfg.logging.eval_reference).is_file():
        raise FileNotFoundError(f"logging.eval_reference {cfg.logging.eval_reference!r} does not exist "
                                "(make it with `slct eval ref SOURCE --extractor NAME --out FILE.npz`)")
    progress = {True: "bar", False: "none"}.get(progress, progress)
    if progress not in ("bar", "lines", "none"):
        raise ValueError(f"progress must be 'bar', 'lines' or 'none', got {progress!r}")
    t_start = time.time()
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    dist = distributed.init(device)
    if dist.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    run_dir = Path(run_dir)

    # everything that can fail on bad input happens before the run directory is created
    dataset = open_dataset(cfg)
    latent_shape = tuple(dataset.latent_shape)
    if cfg.train.batch_size > len(dataset):
        raise ValueError(f"train.batch_size ({cfg.train.batch_size}) is larger than the dataset ({len(dataset)} "
                         f"latents in {cfg.data.path}): every batch would repeat samples; use --batch "
                         f"{len(dataset)} or less, or encode more images")
    if cfg.logging.eval_every_steps:  # a "held-out" reference must not hold training images
        from slct.eval.reference import check_held_out, load_reference

        check_held_out({k: dataset.manifest.get(k) for k in ("source", "selection")},
                       load_reference(cfg.logging.eval_reference).manifest, cfg.logging.eval_reference)
    num_classes = int(dataset.num_classes) if cfg.data.conditional else 0
    if cfg.data.conditional and num_classes == 0:
        raise ValueError(f"data.conditional is set but the dataset {cfg.data.path} has no labels")
    net_kwargs = network_kwargs(cfg, latent_shape, num_classes)
    torch.manual_seed(step_seed(cfg.train.seed, 0, stream=1))  # the initial weights: same seed on every rank
    model = build_model(cfg, latent_shape, num_classes).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg.optim, model)
    ema = EMA(model, profiles_from_config(cfg.train))
    objective = build_objective(cfg.objective, cfg.train.total_steps)
    state = TrainState()
    meta = {"codec": dataset.codec_spec, "normalizer": dataset.normalizer.to_dict(), "latent_shape": list(latent_shape),
            "num_classes": num_classes, "network_kwargs": net_kwargs,
            "data_source": {k: dataset.manifest.get(k) for k in ("source", "selection", "image_resolution",
                                                                   "class_names")}}
    ckpt_path = _resume_path(run_dir, resume)

    with _removed_if_start_fails(run_dir, dist.is_main):
        _prepare_run_dir(run_dir, dist.is_main)
        if ckpt_path is not None:
            _load_checkpoint(ckpt_path, cfg, meta, model, optimizer, ema, state)
        elif dist.world_size > 1:  # identical initial weights everywhere
            for t in model.state_dict().values():
                torch.distributed.broadcast(t, src=0)
            ema = EMA(model, profiles_from_config(cfg.train))
        if dist.is_main:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            (run_dir / "run.json").write_text(json.dumps({
                "slct_version": __version__, "parameters": count_parameters(model), "data_size": len(dataset),
                "world_size": dist.world_size, "device": str(device), **meta}, indent=2, default=str))
        if ckpt_path is None:  # a step-0 checkpoint: the rollback target always exists
            _save_checkpoint(run_dir, cfg, meta, model, optimizer, ema, state, dist)

    train_model = model
    if cfg.train.compile:
        train_model = torch.compile(model)
    # forward-mode AD (MeanFlow's JVP) does not go through DDP: such objectives get the plain module and the
    # gradients are averaged over processes by hand after the last micro-batch (same result as DDP's all-reduce)
    manual_sync = dist.world_size > 1 and getattr(objective, "sync_gradients_manually", False)
    if dist.world_size > 1 and not manual_sync:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    total = cfg.train.total_steps
    stop_step = min(total, until_step) if until_step is not None else total
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.precision == "bf16"
                else contextlib.nullcontext())
    logger = _Logger(run_dir, cfg, dataset, dist.is_main, progress, start=state.step, total=total)
    prefetch = cfg.train.prefetch_batches
    pipeline = BatchPipeline(dataset, cfg, dist.rank, dist.world_size, state.step, device, prefetch)
    health, stopped_by, diverged = _Health(), "done", None
    slice_start = time.time()
    try:
        with _StopSignals() as signals:
            while state.step < stop_step:
                batch = next(pipeline)
                c_now = _stage_c(model, objective, dataset, cfg, state, device, dist, logger)
                lr = cfg.optim.lr * state.lr_scale * min(1.0, (state.step + 1) / max(cfg.optim.warmup_steps, 1))
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                micro = batch.split(cfg.optim.accumulate)
                for j, mb in enumerate(micro):
                    sync = j == len(micro) - 1 or dist.world_size == 1 or manual_sync
                    with (contextlib.nullcontext() if sync else train_model.no_sync()):
                        with autocast:
                            terms = objective(train_model, mb.x0, state.step, labels=mb.labels, noise=mb.noise,
                                              indices=mb.indices, dropout_seed=mb.dropout_seed, c=c_now)
                        loss = terms.total.mean()
                        if loss_hook is not None:
                            loss = loss_hook(state.step, loss)
                        (loss / len(micro)).backward()
                    logger.accumulate(terms, loss, batch.ot_seconds / len(micro))
                if manual_sync:
                    distributed.average_gradients(params)
                loss_value, grad_norm = torch.stack([loss.detach().double().cpu(),
                                                     _grad_norm(params).cpu()]).tolist()  # one sync
                finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
                in_time = max_minutes is None or (time.time() - slice_start) / 60 < max_minutes
                # one all-reduce agrees on all three, so every rank takes the same branch below
                ok, go_on, in_time = distributed.all_true([finite, signals.received is None, in_time], device)
                if ok:
                    if cfg.optim.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                    optimizer.step()
                    ema.update(model, state.step + 1, state.nimg + cfg.train.batch_size, cfg.train.batch_size)
                    health.consecutive_bad = 0
                    health.last_finite_loss, health.last_finite_step = loss_value, state.step
                else:  # skipped on every rank alike (the flag was all-reduced)
                    optimizer.zero_grad(set_to_none=True)
                    state.bad_steps += 1
                    health.consecutive_bad += 1
                state.step += 1
                state.nimg += cfg.train.batch_size
                logger.step(state, lr, ok, grad_norm)
                if not ok and health.consecutive_bad >= cfg.train.max_bad_steps:
                    if state.rollbacks >= cfg.train.max_rollbacks:
                        diverged = _divergence_message(run_dir, cfg, state, health, lr)
                        logger.event(diverged, state.step, echo=False)  # the caller reports it
                        stopped_by = "diverged"
                        break
                    pipeline.close()
                    _rollback(run_dir, cfg, meta, model, optimizer, ema, state, logger)
                    health.consecutive_bad, health.checkpoint_due = 0, False
                    pipeline = BatchPipeline(dataset, cfg, dist.rank, dist.world_size, state.step, device, prefetch)
                    continue
                out_of_time = not in_time
                stopping = (not go_on) or out_of_time or state.step >= stop_step
                health.checkpoint_due |= stopping or state.step % cfg.checkpoint.every_steps == 0
                if health.checkpoint_due and ok:  # never inside a streak of non-finite steps
                    health.checkpoint_due = not _save_checkpoint(run_dir, cfg, meta, model, optimizer, ema, state,
                                                                 dist, logger)
                if dist.is_main and (stopping or state.step % cfg.checkpoint.snapshot_every_steps == 0):
                    _save_snapshot(run_dir, cfg, meta, model, ema, state)  # a run stopped early has one too
                every = cfg.train.ema_power_every_steps
                if dist.is_main and every and (state.step % every == 0 or state.step == total):
                    _save_snapshot(run_dir / "power-ema", cfg, meta, None, ema, state, power_only=True)
                every = cfg.logging.sample_every_steps
                if dist.is_main and ((every and state.step % every == 0) or state.step == total):
                    logger.sample_grids(model, ema, state.step, latent_shape)
                every = cfg.logging.eval_every_steps
                if dist.is_main and every and (state.step % every == 0 or state.step == total):
                    logger.evaluate(model, ema, state.step, latent_shape)
                if stopping and health.checkpoint_due:
                    logger.event(f"stopped at step {state.step} inside a streak of non-finite steps: no checkpoint "
                                 "written; resuming replays from the newest one", state.step)
                if not go_on:
                    stopped_by = "signal"
                    break
                if out_of_time:
                    stopped_by = "minutes"
                    break
    finally:
        pipeline.close()
        logger.close()
    if stopped_by == "done" and state.step < total:
        stopped_by = "until_step"
    files = {}
    if dist.is_main:
        files = logger.finish(state.step >= total)
    distributed.barrier()
    if diverged:
        raise TrainingDiverged(diverged)
    if dist.is_main and progress != "none":
        verb = "finished" if state.step >= total else f"stopped ({stopped_by}) at step {state.step}/{total}"
        print(f"training {verb} in {time.time() - t_start:.0f} s; run directory: {run_dir}"
              + ("" if state.step >= total else "\nre-run the same command to resume"))
    return TrainResult(run_dir, state, state.step >= total, stopped_by, files)


def _stage_c(model, objective, dataset, cfg, state, device, dist, logger) -> float | None:
    """The measured c of this step's curriculum stage (c_schedule "calibrated"), measured at the stage's first step
    and kept in ``state.c_table`` (so checkpoints carry it and a resumed run uses the same c); None otherwise."""
    from slct.curriculum import CALIBRATED, num_scales

    obj = cfg.objective
    if obj.kind != "consistency" or obj.c_schedule != CALIBRATED:
        return None
    n = num_scales(state.step, cfg.train.total_steps, obj.s0, obj.s1, obj.min_stage_steps)
    if str(n) not in state.c_table:
        c, count = _calibrate_c(model, objective, dataset, cfg, state.step, device, dist)
        state.c_table[str(n)] = c
        logger.event(f"c calibrated at step {state.step} for N = {n}: {c:.4g} (quantile "
                     f"{obj.c_calibration_quantile:g} of r over {count} pairs at r/(2c^2) = 1)", state.step)
    return state.c_table[str(n)]


@torch.no_grad()
def _calibrate_c(model, objective, dataset, cfg, step: int, device, dist) -> tuple[float, int]:
    """Measure r on ``objective.c_calibration_batches`` batches (no gradients; drawn from their own seed stream, so
    the training batches are untouched) and return (calibrated c, number of pairs). Every rank measures its share
    of each global batch; the quantile is taken over all of them."""
    from slct.coupling import ot_coupling
    from slct.curriculum import calibrated_c, num_scales, sample_timestep_indices

    obj, batch = cfg.objective, cfg.train.batch_size
    n = num_scales(step, cfg.train.total_steps, obj.s0, obj.s1, obj.min_stage_steps)
    g = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, stream=2))
    lo, hi = dist.rank * batch // dist.world_size, (dist.rank + 1) * batch // dist.world_size
    rs = []
    for _ in range(obj.c_calibration_batches):
        chosen = torch.randint(len(dataset), (batch,), generator=g).numpy()
        noise = torch.randn((batch, *dataset.latent_shape), generator=g)[lo:hi]
        indices = sample_timestep_indices(n, batch, obj.p_mean, obj.p_std, generator=g, sigma_min=obj.sigma_min,
                                          sigma_max=obj.sigma_max, rho=obj.rho)[lo:hi]
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        x0, _ = dataset.get_batch(chosen[lo:hi])
        if obj.coupling == "ot":
            noise = noise[ot_coupling(x0, noise)]
        terms = objective(model, x0.to(device), step, noise=noise.to(device), indices=indices, dropout_seed=seed, c=1.0)
        rs.append(terms.r.float().cpu())
    r = torch.cat([torch.as_tensor(part) for part in distributed.gather_objects(torch.cat(rs))])
    return calibrated_c(r, obj.c_calibration_quantile), len(r)


def _divergence_message(run_dir, cfg, state, health, lr) -> str:
    newest = checkpoint.latest_checkpoint(run_dir)
    last = (f"last finite loss {health.last_finite_loss:.4g} at step {health.last_finite_step}"
            if health.last_finite_step >= 0 else "no finite loss since the last rollback")
    return (f"training diverged: {health.consecutive_bad} consecutive non-finite steps up to step {state.step} after "
            f"{state.rollbacks} rollback(s) ({last}); the newest good checkpoint is "
            f"{newest.name if newest else 'none'}. Start a new run (another --out) with a lower optim.lr (the last "
            f"one used was {lr:.3g}), optim.grad_clip=1.0 or train.precision=fp32; or resume with more "
            f"train.max_rollbacks (now {cfg.train.max_rollbacks})")


# ---------------------------------------------------------------------------------------------------------------------
# run directory, checkpoints, snapshots


@contextlib.contextmanager
def _removed_if_start_fails(run_dir: Path, is_main: bool):
    """A run directory this start created is removed again if the start fails (no empty run folders)."""
    created = is_main and not run_dir.exists()
    try:
        yield
    except BaseException:
        if created and not checkpoint.list_checkpoints(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _prepare_run_dir(run_dir: Path, is_main: bool) -> None:
    if is_main:
        try:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PermissionError(f"cannot create the run directory {run_dir}: {e}") from e
        if not os.access(run_dir, os.W_OK):
            raise PermissionError(f"the run directory {run_dir} is not writable")
        # temporary files of writes a kill -9 interrupted: nothing refers to them
        for stale in checkpoint.remove_stale_temporaries(run_dir / "checkpoints") \
                + checkpoint.remove_stale_temporaries(run_dir):
            print(f"removed {stale} (left by an interrupted write)", file=sys.stderr)
    distributed.barrier()


def _resume_path(run_dir: Path, resume: str) -> Path | None:
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


def _save_checkpoint(run_dir, cfg, meta, model, optimizer, ema, state, dist, logger=None) -> bool:
    """Write the training state if all of it is finite (else log why not); True when written.

    Every rank takes the same branch: the finiteness flag is all-reduced before any collective.
    """
    (finite,) = distributed.all_true([_state_finite(model, optimizer, ema)], next(model.parameters()).device)
    if not finite:
        if logger is not None:
            logger.event(f"checkpoint at step {state.step} not written: the weights or optimizer state hold "
                         "non-finite values", state.step)
        return False
    payload = {
        "format": checkpoint.CHECKPOINT_FORMAT, "slct_version": __version__, "config": cfg.to_dict(), **meta,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict(),
        "state": state.to_dict(), "rng": distributed.gather_objects(_rng_state()),
    }
    error, disk_full = None, False
    if dist.is_main:
        path = checkpoint.checkpoint_path(run_dir, state.step)
        try:
            checkpoint.save_atomic(payload, path, what=f"checkpoint {state.step}")
            checkpoint.prune(run_dir, cfg.checkpoint.keep)
        except checkpoint.SaveError as e:
            newest = checkpoint.latest_checkpoint(run_dir)
            error = f"{e}; the newest good checkpoint is {newest.name if newest else 'none'}"
            if e.disk_full:
                error += " (free some space, then re-run the same command to resume from it)"
            disk_full = e.disk_full
    (saved,) = distributed.all_true([error is None], next(model.parameters()).device)  # all ranks stop together
    if not saved:
        raise checkpoint.SaveError(error or f"rank 0 could not write checkpoint {state.step}", disk_full=disk_full)
    return True


def _load_checkpoint(path, cfg, meta, model, optimizer, ema, state) -> None:
    ckpt = checkpoint.load(path, expect=checkpoint.CHECKPOINT_FORMAT)  # never runs code from the file
    from slct.config import config_from_dict

    # the saved config through today's dataclasses: keys added since it was written take their defaults
    diffs = config_differences(config_from_dict(ckpt["config"]).to_dict(), cfg.to_dict())
    if diffs:
        raise ValueError(f"{path} was written by a run with another config ({'; '.join(diffs)}); re-run with the "
                         "same settings to resume, or use another --out for a new run")
    for key, what in (("codec", "codec"), ("normalizer", "normalisation"), ("latent_shape", "latent shape")):
        if ckpt.get(key) != meta[key]:
            raise ValueError(f"the data's {what} differs from the checkpoint's ({path}): "
                             f"{describe_difference(ckpt.get(key), meta[key])}; resume with the data the run "
                             "started with, or use another --out for a new run")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    ema.load_state_dict(ckpt["ema"])
    for k, v in ckpt["state"].items():
        setattr(state, k, v)
    rngs = ckpt["rng"]
    rank = torch.distributed.get_rank() if distributed.is_active() else 0
    if rank < len(rngs):
        _set_rng_state(rngs[rank])


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


def _rollback(run_dir, cfg, meta, model, optimizer, ema, state, logger) -> None:
    path = checkpoint.latest_checkpoint(run_dir)
    bad, rollbacks, lr_scale, at = state.bad_steps, state.rollbacks, state.lr_scale, state.step
    _load_checkpoint(path, cfg, meta, model, optimizer, ema, state)
    state.bad_steps, state.rollbacks = bad, rollbacks + 1
    state.lr_scale = lr_scale * cfg.train.rollback_lr_factor
    logger.rewind(state)
    logger.event(f"{cfg.train.max_bad_steps} consecutive non-finite steps up to step {at}: restored {path.name} "
                 f"(step {state.step}) and lowered the learning rate to {state.lr_scale:g} x optim.lr "
                 f"(rollback {state.rollbacks} of at most {cfg.train.max_rollbacks})", at)


def _save_snapshot(run_dir, cfg, meta, model, ema, state, power_only: bool = False) -> Path:
    """A snapshot: every tracked EMA and the online weights (for sampling; ``power_only``: the power EMAs alone,
    the material of `slct ema`'s post-hoc reconstruction)."""
    from slct.sampling import snapshot_payload

    names = [p.name for p in ema.profiles if isinstance(p, PowerEMA) or not power_only]
    weights = {name: ema.weights(name) for name in names}
    if model is not None:
        weights["online"] = model.state_dict()
    payload = snapshot_payload(cfg, weights, meta["network_kwargs"], meta["codec"], meta["normalizer"],
                               meta["latent_shape"], meta["num_classes"], state.step, state.nimg,
                               data_source=meta.get("data_source"),
                               ema_default=default_ema(names, cfg.train.ema_default))
    Path(run_dir).mkdir(exist_ok=True)
    path = checkpoint.save_atomic(payload, Path(run_dir) / f"snapshot-{state.step:08d}.pt",
                                  what=f"snapshot {state.step}")
    if not power_only:  # a run sliced by --minutes keeps only its newest off-schedule snapshot, not one per slice
        for old in Path(run_dir).glob("snapshot-*.pt"):
            step = int(old.stem.split("-")[1])
            if step < state.step and step % cfg.checkpoint.snapshot_every_steps and step != cfg.train.total_steps:
                old.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# logging


# noise bands of the diagnostics (name, lowest sigma, highest sigma): where the 1-step samples are decided (> 1) and
# where the diffusion loss and most of the Cauchy loss's gradient go (< 0.1)
NOISE_BANDS = (("lt0.1", 0.0, 0.1), ("0.1-1", 0.1, 1.0), ("1-10", 1.0, 10.0), ("gt10", 10.0, math.inf))


def noise_band(sigma: torch.Tensor) -> torch.Tensor:
    """The NOISE_BANDS index of each sigma (int64, CPU)."""
    edges = torch.tensor([b[1] for b in NOISE_BANDS[1:]], dtype=torch.float64)
    return torch.bucketize(sigma.detach().double().cpu(), edges, right=True)


class _Logger:
    """Progress bar, metrics.jsonl, optional TensorBoard, sample grids and the final plot (rank 0 only writes)."""

    KEYS = ("loss", "consistency", "diffusion")
    SHOWN = (("N", "n_scales"), ("c", "c"), ("mse", "mse"))  # (label, metrics key) beside the loss in progress

    def __init__(self, run_dir: Path, cfg: Config, dataset, active: bool, progress: str, start: int, total: int):
        self.run_dir, self.cfg, self.active, self.progress, self.total = run_dir, cfg, active, progress, total
        self._reset_window(time.time())  # sums, counts and band statistics of the logging window
        self.stats: dict = {}
        self.bar = None
        self.tb = None
        self._eval_pair = None
        self._dataset, self._decode = dataset, None  # the codec for sample grids and evaluation, built once
        if not active:
            return
        path = run_dir / "metrics.jsonl"
        if path.exists():
            trim_metrics(path, start)  # rows past the checkpoint we resume from are replayed: keep no doubles
        self.metrics = open(path, "a")
        if progress == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, desc="train")
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError('logging.tensorboard needs the tensorboard extra: pip install "slct[tensorboard]"') from e
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def accumulate(self, terms, loss, ot_seconds: float) -> None:
        # kept as tensors: no device sync until the log step
        for key, value in (("loss", loss.detach()), ("consistency", terms.consistency.detach().mean()),
                           ("diffusion", terms.diffusion.detach().mean())):
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.stats = terms.stats
        self.ot_seconds += ot_seconds
        self.count += 1
        if terms.sigma is not None:  # per-noise-band loss sums (device) and counts (CPU)
            band = noise_band(terms.sigma)
            total = terms.total.detach().float()
            sums = torch.zeros(len(NOISE_BANDS), device=total.device).index_add_(0, band.to(total.device), total)
            self.band_sums = sums if self.band_sums is None else self.band_sums + sums
            self.band_counts += torch.bincount(band, minlength=len(NOISE_BANDS))
            self.last_r = (terms.r, band, terms.stats.get("c"))

    def step(self, state: TrainState, lr: float, ok: bool, grad_norm: float = float("nan")) -> None:
        self.steps += 1
        if ok and math.isfinite(grad_norm):
            self.grad_norms.append(grad_norm)
        if self.bar is not None:
            self.bar.update(1)
        every = self.cfg.logging.log_every_steps
        if state.step % every and state.step != self.cfg.train.total_steps:
            return
        means = distributed.all_mean(torch.stack([torch.as_tensor(self.sums.get(k, 0.0), dtype=torch.float32)
                                                  for k in self.KEYS]).cpu() / max(self.count, 1))
        now = time.time()
        seconds = max(now - self.t_last, 1e-9)
        steps = max(self.steps, 1)
        record = {"step": state.step, "nimg": state.nimg, **{k: float(v) for k, v in zip(self.KEYS, means)},
                  **{k: float(v) for k, v in self.stats.items()}, "lr": lr,
                  "images_per_s": steps * self.cfg.train.batch_size / seconds, "sec_per_step": seconds / steps,
                  "ot_share": self.ot_seconds / seconds, "bad_steps": state.bad_steps, "time": now,
                  **self._band_record()}
        state.wall_seconds += seconds
        self._reset_window(now)
        if not self.active:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        # what the bar and the lines show beside the loss, where the objective logs it (MeanFlow's `mse`: its
        # adaptive-weighted loss sits near 1 by construction)
        shown = {label: f"{record[key]:.4g}" for label, key in self.SHOWN if key in record}
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", **shown, img_s=f"{record['images_per_s']:.0f}")
        elif self.progress == "lines":
            extra = "".join(f" {label} {value}" for label, value in shown.items())
            print(f"step {state.step}/{self.total} loss {record['loss']:.4g}{extra} "
                  f"{record['images_per_s']:.0f} img/s", flush=True)
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "time"):
                    self.tb.add_scalar(k, v, state.step)

    def _reset_window(self, now: float) -> None:
        self.sums, self.count, self.steps, self.ot_seconds, self.t_last = {}, 0, 0, 0.0, now
        self.band_sums, self.band_counts, self.last_r, self.grad_norms = None, torch.zeros(len(NOISE_BANDS)), None, []

    def _band_record(self) -> dict:
        """Diagnostics for when the loss says nothing: the loss per noise band over the logging window, r/(2c^2)
        quantiles per band in the window's last batch (where the Cauchy loss is quadratic, ~1, or logarithmic,
        >> 1) and the mean gradient norm."""
        out: dict = {}
        if self.grad_norms:
            out["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        if self.band_sums is None:
            return out
        sums = distributed.all_sum(self.band_sums.float().cpu())
        counts = distributed.all_sum(self.band_counts.float())
        for (name, _, _), total, n in zip(NOISE_BANDS, sums.tolist(), counts.tolist()):
            if n:
                out[f"loss_sigma_{name}"] = total / n
        r, band, c = self.last_r
        if r is not None and c:
            ratio = (r.detach().double().cpu() / (2 * c * c))
            for i, (name, _, _) in enumerate(NOISE_BANDS):
                values = ratio[band == i]
                if len(values):
                    q50, q90 = torch.quantile(values, torch.tensor([0.5, 0.9], dtype=torch.float64)).tolist()
                    out[f"r2c2_p50_sigma_{name}"], out[f"r2c2_p90_sigma_{name}"] = q50, q90
        return out

    def rewind(self, state: TrainState) -> None:
        """After a rollback: the bar and the throughput window restart from the restored step."""
        self._reset_window(time.time())
        if self.bar is not None:
            self.bar.n = state.step
            self.bar.refresh()

    def event(self, message: str, step: int | None = None, echo: bool = True) -> None:
        """A line in metrics.jsonl (and on the console unless progress is "none" or ``echo`` is False)."""
        if self.active:
            self.metrics.write(json.dumps({"event": message, "event_step": step, "time": time.time()}) + "\n")
            self.metrics.flush()
            if echo and self.progress != "none":
                (self.bar.write if self.bar is not None else print)(message)

    @contextlib.contextmanager
    def _ema_model(self, model, ema):
        """The model in eval mode with the default EMA's weights (``train.ema_default``, as snapshots), restored
        afterwards; yields (EMA name, decode), decode mapping normalised latents to images through the run's codec
        (built once per run)."""
        decay = default_ema(ema.names, self.cfg.train.ema_default)
        backup = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(ema.weights(decay))
        model.eval()
        try:
            device = next(model.parameters()).device
            if self._decode is None:
                from slct.codecs import get_codec

                codec = get_codec(**self._dataset.codec_spec).to(device)
                normalizer = self._dataset.normalizer.to(device)
                self._decode = lambda z: codec.decode(normalizer.denormalize(z))
            yield decay, self._decode
        finally:
            model.load_state_dict(backup)
            model.train()

    @property
    def _class_names(self) -> list[str]:
        return list(getattr(self._dataset, "manifest", {}).get("class_names") or [])

    @torch.no_grad()
    def sample_grids(self, model, ema, step: int, latent_shape) -> None:
        from slct.images import save_grid
        from slct.sampling import default_nfe, labels_for_seeds, sample_latents

        with self._ema_model(model, ema) as (_, decode):
            seeds = list(range(self.cfg.logging.grid_size))
            labels = labels_for_seeds(None, seeds, _num_classes(model))  # class-balanced for a conditional model
            for nfe in default_nfe(self.cfg.objective, self.cfg.sampling):
                z = sample_latents(model, seeds, tuple(latent_shape), nfe, self.cfg.objective, self.cfg.sampling,
                                   labels)
                save_grid(decode(z), self.run_dir / "samples" / f"step-{step:08d}-nfe{nfe}.png")

    @torch.no_grad()
    def evaluate(self, model, ema, step: int, latent_shape) -> None:
        """FD (and precision/recall) of the default EMA model on logging.eval_n samples, per NFE."""
        from slct.eval.evaluate import evaluate_many, extractor_for_reference
        from slct.eval.reference import load_reference
        from slct.sampling import default_nfe, labels_for_seeds, sample_latents

        if self._eval_pair is None:  # loaded once per run
            reference = load_reference(self.cfg.logging.eval_reference)
            self._eval_pair = (extractor_for_reference(reference), reference)
        ref_class = self._eval_pair[1].manifest.get("class")  # a one-class reference: samples of that class
        spec = None if ref_class is None else [str(ref_class)]
        with self._ema_model(model, ema) as (decay, decode):
            row = {"eval_step": step, "eval_n": self.cfg.logging.eval_n, "ema": decay}
            for nfe in default_nfe(self.cfg.objective, self.cfg.sampling):
                def generate(seeds, nfe=nfe):
                    labels = labels_for_seeds(spec, seeds, _num_classes(model), self._class_names)
                    return decode(sample_latents(model, seeds, tuple(latent_shape), nfe, self.cfg.objective,
                                                 self.cfg.sampling, labels))

                (result,) = evaluate_many(generate, self.cfg.logging.eval_n, 64, [self._eval_pair], progress=False)
                row.update({f"{key}_nfe{nfe}": result[key] for key in ("fd", "precision", "recall")
                            if result.get(key) is not None})
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        summary = ", ".join(f"{k} {v:.3g}" for k, v in row.items() if k.startswith("fd_"))
        (self.bar.write if self.bar is not None else print)(f"step {step}: {summary} ({row['eval_n']} samples)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()

    def finish(self, done: bool) -> dict:
        self.metrics.close()
        files = {"metrics": self.run_dir / "metrics.jsonl"}
        obj, stages = self.cfg.objective, None
        if obj.kind == "consistency":
            from slct.curriculum import curriculum_stages

            stages = [st["start"] for st in curriculum_stages(self.cfg.train.total_steps, obj.s0, obj.s1,
                                                               obj.min_stage_steps)]
        plot = plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "training.png", stages)
        if plot:
            files["plot"] = plot
        return files


def _row_step(row: dict) -> int | None:
    for key in ("step", "eval_step", "event_step"):
        if row.get(key) is not None:
            return row[key]
    return None


def _num_classes(model) -> int:
    """Classes of a (preconditioned, possibly compiled or DDP-wrapped) model's network; 0: unconditional."""
    net = getattr(model, "module", model)
    net = getattr(net, "_orig_mod", net)
    return int(getattr(getattr(net, "net", net), "label_dim", 0) or 0)


def trim_metrics(path: Path, step: int) -> int:
    """Drop the rows of ``path`` logged after ``step`` (a resume replays them); returns how many were dropped."""
    kept, dropped = [], 0
    for line in open(path):
        if not line.strip():
            continue
        try:
            at = _row_step(json.loads(line))
        except json.JSONDecodeError:  # a line cut by kill -9
            dropped += 1
            continue
        if at is not None and at > step:
            dropped += 1
        else:
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        checkpoint.atomic_write(path, lambda f: f.write("".join(kept).encode()), what=f"trimmed {path.name}")
    return dropped


def plot_metrics(metrics_path: Path, out: Path, stage_starts: list[int] | None = None) -> Path | None:
    """One PNG: loss terms, loss and r/(2c^2) per noise band, gradient norm, c, N (and FD when evaluated) against
    the step, with the curriculum's stage starts (``stage_starts``) as dotted lines."""
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    rows = list({r["step"]: r for r in rows if "step" in r}.values())  # after a rollback the latest row of a step wins
    rows.sort(key=lambda r: r["step"])
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    bands = [name for name, _, _ in NOISE_BANDS]
    panels = [("loss (rises with N: closer pairs, larger lambda; not divergence)", ("loss", "consistency", "diffusion"),
               True),
              ("loss per noise band (sigma)", tuple(f"loss_sigma_{b}" for b in bands), True),
              ("r / (2c^2), median per band (>> 1: Cauchy's log regime)", tuple(f"r2c2_p50_sigma_{b}" for b in bands),
               True),
              ("gradient norm", ("grad_norm",), True), ("c", ("c",), True), ("N", ("n_scales",), False)]
    panels = [p for p in panels if any(k in r for r in rows for k in p[1])]
    evals = [json.loads(line) for line in open(metrics_path) if '"eval_step"' in line]
    count = len(panels) + bool(evals)
    cols = min(count, 4)
    fig, axes = plt.subplots((count + cols - 1) // cols, cols, figsize=(4.4 * cols, 3.4 * ((count + cols - 1) // cols)),
                             squeeze=False)
    axes = list(axes.flat)
    if evals:  # periodic evaluation (logging.eval_every_steps): FD per NFE against the step
        ax = axes[len(panels)]
        for key in sorted({k for r in evals for k in r if k.startswith("fd_nfe")}):
            pts = [(r["eval_step"], r[key]) for r in evals if key in r]
            ax.plot(*zip(*pts), marker="o", label=key.replace("fd_nfe", "") + " NFE")
        ax.set_yscale("log")
        ax.set_title(f"FD ({evals[-1]['eval_n']} samples)")
        ax.legend()
    for ax, (title, keys, log) in zip(axes, panels):
        for k in keys:
            ys = [r.get(k) for r in rows]
            if any(y is not None and math.isfinite(y) and (y > 0 or not log) for y in ys):
                label = k.replace("loss_sigma_", "sigma ").replace("r2c2_p50_sigma_", "sigma ")
                ax.plot(steps, [y if y is not None else float("nan") for y in ys], label=label)
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in axes[:count]:
        ax.set_xlabel("step")
        for start in (stage_starts or [])[1:]:  # curriculum stage boundaries
            ax.axvline(start, color="grey", linestyle=":", linewidth=0.8)
    for ax in axes[count:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
