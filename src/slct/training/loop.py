"""The training loop: one function wiring data pipeline, objective, optimiser, EMAs, run directory and monitor.

Resuming is re-running the same command: the loop restores the newest checkpoint of the run directory and continues.
Since every step's randomness is a pure function of (seed, step) (see ``slct.pipeline``), a run stopped at any point
(kill -9 included) and resumed produces bitwise the same weights as an uninterrupted run on the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slct import distributed
from slct.calibration import stage_c
from slct.config import Config
from slct.ema import EMA, default_ema, profiles_from_config
from slct.model import build_model, count_parameters, network_kwargs
from slct.objectives import build_objective
from slct.pipeline import BatchPipeline, step_seed
from slct.training import rundir
from slct.training.health import (Health, StopSignals, TrainingDiverged, TrainingStalled, divergence_message, grad_norm,
                                  stall_message)
from slct.training.monitor import Monitor
from slct.training.setup import (adam_step_rms, build_optimizer, learning_rate, open_dataset, resolve_device,
                                 stage_start)
from slct.training.state import TrainState


@dataclass
class TrainResult:
    run_dir: Path
    state: TrainState
    finished: bool  # reached total_steps
    stopped_by: str  # "done" | "until_step" | "minutes" | "signal"
    files: dict = field(default_factory=dict)
    signal: str | None = None  # "SIGTERM" | "SIGINT" when stopped by a signal


def train(cfg: Config, run_dir: str | Path, resume: str = "auto", until_step: int | None = None,
          max_minutes: float | None = None, progress: bool | str = True, loss_hook=None) -> TrainResult:
    """Train ``cfg`` in ``run_dir``; stop at ``until_step`` / after ``max_minutes`` (with a checkpoint) to train in slices.

    ``resume``: "auto" (continue from the newest readable checkpoint, if any), "none" or a checkpoint file.
    ``progress``: "bar" (True), "lines" (a plain line per logging interval and a final line, for logs and
    ``--no-progress``) or "none" (False). ``loss_hook(step, loss) -> loss`` may replace the loss tensor
    (fault-injection tests, custom regularisers). Raises ``TrainingDiverged`` when non-finite steps persist after
    ``train.max_rollbacks`` rollbacks, ``RunDirectoryLocked`` when another process trains in ``run_dir``.
    """
    cfg.validate()
    if cfg.logging.eval_every_steps and not Path(cfg.logging.eval_reference).is_file():
        raise FileNotFoundError(f"logging.eval_reference {cfg.logging.eval_reference!r} does not exist "
                                "(make it with `slct eval ref SOURCE --extractor NAME --out FILE.npz`)")
    progress = {True: "bar", False: "none"}.get(progress, progress)
    if progress not in ("bar", "lines", "none"):
        raise ValueError(f"progress must be 'bar', 'lines' or 'none', got {progress!r}")
    t_start = time.time()
    device, dist = _init_device(cfg)
    run_dir = Path(run_dir)

    # everything that can fail on bad input happens before the run directory is created
    dataset = open_dataset(cfg)
    run, objective = _build_run(cfg, run_dir, dataset, device, dist)
    if resume == "none":
        rundir.resume_path(run_dir, resume)  # refuses a folder that holds checkpoints, before touching it
    lock, resumed_from = _open_run_dir(run, resume, dataset, device)
    try:
        if resumed_from is not None and dist.is_main and progress != "none":
            print(f"resuming from {resumed_from} (step {run.state.step} of {cfg.train.total_steps})", flush=True)
        if dist.is_main and progress != "none":
            _print_sources(run.meta, resumed_from is not None)
        logger = Monitor(run_dir, cfg, dataset, dist.is_main, progress, start=run.state.step,
                         total=cfg.train.total_steps)
        try:
            stopped_by, detail = _loop(run, objective, dataset, logger, until_step, max_minutes, loss_hook)
        finally:
            logger.close()
        state, total = run.state, cfg.train.total_steps
        files = logger.finish(state.step >= total) if dist.is_main else {}
        distributed.barrier()
    finally:
        if lock is not None:
            lock.release()
    if stopped_by == "diverged":
        raise TrainingDiverged(detail)
    if stopped_by == "stalled":
        raise TrainingStalled(detail)
    if dist.is_main and progress != "none":
        verb = "finished" if state.step >= total else f"stopped ({stopped_by}) at step {state.step}/{total}"
        how = {"until_step": f"re-run without --until-step (or with a later one) to continue from step {state.step}"
               }.get(stopped_by, "re-run the same command to resume")
        print(f"training {verb} in {time.time() - t_start:.0f} s; run directory: {run_dir}"
              + ("" if state.step >= total else f"\n{how}"))
    return TrainResult(run_dir, state, state.step >= total, stopped_by, files,
                       signal=detail if stopped_by == "signal" else None)


def _print_sources(meta: dict, resumed: bool) -> None:
    """Name the files a run took weights from: the --init source (read at the start only) and the teacher."""
    from slct.training.warmstart import describe_source

    if "init" in meta:
        print(f"initialised {'at the start ' if resumed else ''}from {describe_source(meta['init'])}", flush=True)
    if "teacher" in meta:
        print(f"teacher: {describe_source(meta['teacher'])}", flush=True)


def _loop(run: rundir.Run, objective, dataset, logger: Monitor, until_step: int | None, max_minutes: float | None,
          loss_hook) -> tuple[str, str | None]:
    """The training steps from ``run.state.step`` to the stop; returns (why it stopped, detail): ("diverged",
    the message), ("signal", its name), or ("done" | "until_step" | "minutes", None)."""
    cfg, dist, state, model, device = run.cfg, run.dist, run.state, run.model, run.device
    train_model = torch.compile(model) if cfg.train.compile else model
    # forward-mode AD (MeanFlow's JVP) does not go through DDP: such objectives get the plain module and the
    # gradients are averaged over processes by hand after the last micro-batch (same result as DDP's all-reduce)
    manual_sync = dist.world_size > 1 and objective.sync_gradients_manually
    if dist.world_size > 1 and not manual_sync:
        with warnings.catch_warnings():  # torch 2.13 deprecates the flag but advises keeping it for unsynced buffers
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")
            train_model = torch.nn.parallel.DistributedDataParallel(
                train_model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    total = cfg.train.total_steps
    stop_step = min(total, until_step) if until_step is not None else total
    prefetch = cfg.train.prefetch_batches
    pipeline = BatchPipeline(dataset, cfg, dist.rank, dist.world_size, state.step, device, prefetch)
    target, ema_target = _target_model(run, objective), _ema_target_model(run)
    health = Health()
    slice_start = time.time()
    try:
        with StopSignals() as signals:
            while state.step < stop_step:
                batch = next(pipeline)
                _refresh_targets(run, objective, target, ema_target)  # the EMAs as they stand after the last step
                c_now = stage_c(model, objective, dataset, cfg, state, device, dist, logger, target, ema_target)
                lr = learning_rate(cfg.optim, state.step, state.lr_scale, stage_start(cfg, state.step),
                                   cfg.train.total_steps)
                for group in run.optimizer.param_groups:
                    group["lr"] = lr
                loss_value, norm = _forward_backward(run, train_model, objective, batch, c_now, manual_sync,
                                                     logger, loss_hook, target, ema_target)
                finite = math.isfinite(loss_value) and math.isfinite(norm)
                in_time = max_minutes is None or (time.time() - slice_start) / 60 < max_minutes
                # one all-reduce agrees on all three, so every rank takes the same branch below
                ok, go_on, in_time = distributed.all_true([finite, signals.received is None, in_time], device)
                _apply_or_skip(run, ok, loss_value, norm, health)
                state.step += 1
                state.nimg += cfg.train.batch_size
                logger.step(state, lr, ok, norm, adam_step_rms(run.optimizer) if logger.due(state.step) else None)
                # norm is of the all-reduced gradients: the same on every rank, so is this branch
                health.consecutive_zero = health.consecutive_zero + 1 if ok and norm == 0 else 0
                if cfg.train.max_zero_grad_steps and health.consecutive_zero >= cfg.train.max_zero_grad_steps:
                    _write_outputs(run, logger, health, ok, stopping=True)
                    message = stall_message(cfg, state, health, loss_value)
                    logger.event(message, state.step, echo=False)  # the caller reports it
                    return "stalled", message
                if not ok and health.consecutive_bad >= cfg.train.max_bad_steps:
                    if state.rollbacks >= cfg.train.max_rollbacks:
                        message = divergence_message(run.dir, cfg, state, health, lr)
                        logger.event(message, state.step, echo=False)  # the caller reports it
                        return "diverged", message
                    pipeline.close()
                    rundir.rollback(run, logger)
                    health.consecutive_bad, health.checkpoint_due = 0, False
                    pipeline = BatchPipeline(dataset, cfg, dist.rank, dist.world_size, state.step, device, prefetch)
                    continue
                stopping = (not go_on) or (not in_time) or state.step >= stop_step
                _write_outputs(run, logger, health, ok, stopping)
                if not go_on:  # another rank may have received it: SIGTERM is what schedulers send
                    return "signal", signals.received or "SIGTERM"
                if not in_time:
                    return "minutes", None
    finally:
        pipeline.close()
    return ("done" if state.step >= total else "until_step"), None


def _init_device(cfg: Config) -> tuple[torch.device, distributed.DistInfo]:
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    dist = distributed.init(device)
    if dist.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device, dist


def _build_run(cfg: Config, run_dir: Path, dataset, device, dist) -> tuple[rundir.Run, object]:
    """Network, optimiser, EMAs and objective for ``dataset``, checked against it (nothing written yet)."""
    latent_shape = tuple(dataset.latent_shape)
    if cfg.train.batch_size > len(dataset):
        raise ValueError(f"train.batch_size ({cfg.train.batch_size}) is larger than the dataset ({len(dataset)} "
                         f"latents in {cfg.data.path}): every batch would repeat samples; use --batch "
                         f"{len(dataset)} or less, or encode more images")
    if cfg.logging.eval_every_steps:  # a "held-out" reference must not hold training images
        from slct.eval.reference import check_held_out, check_image_size, load_reference

        manifest = load_reference(cfg.logging.eval_reference).manifest
        check_image_size(manifest, (dataset.image_resolution,) * 2, cfg.logging.eval_reference, "this run")
        check_held_out({k: dataset.manifest.get(k) for k in ("source", "selection")}, manifest,
                       cfg.logging.eval_reference)
    num_classes = int(dataset.num_classes) if cfg.data.conditional else 0
    if cfg.data.conditional and num_classes == 0:
        raise ValueError(f"data.conditional is set but the dataset {cfg.data.path} has no labels")
    net_kwargs = network_kwargs(cfg, latent_shape, num_classes)
    torch.manual_seed(step_seed(cfg.train.seed, 0, stream=1))  # the initial weights: same seed on every rank
    model = build_model(cfg, latent_shape, num_classes).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    meta = {"codec": dataset.codec_spec, "normalizer": dataset.normalizer.to_dict(), "latent_shape": list(latent_shape),
            "num_classes": num_classes, "network_kwargs": net_kwargs,
            "data_source": {k: dataset.manifest.get(k) for k in ("source", "selection", "image_resolution",
                                                                   "class_names")}}
    if cfg.train.init:  # another run's weights instead of the fresh ones (the draw above happens all the same)
        from slct.training.warmstart import load_init, recorded_init

        # a resumed run restores its checkpoint: the source is not read again (it may be gone by then)
        meta["init"] = recorded_init(run_dir) or load_init(cfg.train.init, model, meta, cfg.network.name)
    optimizer = build_optimizer(cfg.optim, model)
    ema = EMA(model, profiles_from_config(cfg.train, cfg.objective.target_ema))
    objective = build_objective(cfg.objective, cfg.train.total_steps)
    teacher = None
    if objective.target_weights == "teacher":
        from slct.training.warmstart import load_teacher

        teacher, meta["teacher"] = load_teacher(cfg.objective.teacher, meta, run_dir)
        teacher = teacher.to(device)
    return rundir.Run(run_dir, cfg, meta, model, optimizer, ema, TrainState(), dist, teacher), objective


def _open_run_dir(run: rundir.Run, resume: str, dataset, device) -> tuple[rundir.RunLock | None, Path | None]:
    """Create (or reopen) and hold the run directory: restore the checkpoint to resume from, or write the step-0
    one. Returns the lock (rank 0; released by the caller) and the checkpoint resumed from."""
    dist = run.dist
    with rundir.removed_if_start_fails(run.dir, dist.is_main):
        lock = rundir.prepare_run_dir(run.dir, dist.is_main, device)
        try:
            ckpt_path = rundir.restore(run, resume)
            if ckpt_path is None and dist.world_size > 1:  # identical initial weights everywhere
                for t in run.model.state_dict().values():
                    torch.distributed.broadcast(t, src=0)
                run.ema = EMA(run.model, profiles_from_config(run.cfg.train, run.cfg.objective.target_ema))
            if dist.is_main:
                rundir.write_run_files(run, count_parameters(run.model), len(dataset), device)
            if ckpt_path is None:  # a step-0 checkpoint: the rollback target always exists
                rundir.save_checkpoint(run)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
    return lock, ckpt_path


def _target_model(run: rundir.Run, objective) -> torch.nn.Module | None:
    """The model that makes an objective's targets when it is not the online one: a frozen copy of the network in
    eval mode that follows the EMA ("ema"), the distillation teacher ("teacher", loaded in _build_run), or None."""
    if objective.target_weights == "teacher":
        return run.teacher
    if objective.target_weights is None:
        return None
    target = copy.deepcopy(run.model).eval()
    target.requires_grad_(False)
    return target


def _ema_target_model(run: rundir.Run) -> torch.nn.Module | None:
    """The consistency target network when ``objective.target_ema`` > 0: a frozen copy of the network in the online
    one's mode (the same dropout mask), loaded from that EMA before every step; None for iCT's mu = 0."""
    if run.cfg.objective.target_ema <= 0:
        return None
    target = copy.deepcopy(run.model)
    target.requires_grad_(False)
    return target


def _refresh_targets(run: rundir.Run, objective, target, ema_target) -> None:
    """Load the target networks that follow an EMA with that EMA's current weights."""
    cfg = run.cfg
    if objective.target_weights == "ema":
        target.load_state_dict(run.ema.weights(default_ema(run.ema.names, cfg.train.ema_default)))
    if ema_target is not None:
        ema_target.load_state_dict(run.ema.weights(str(float(cfg.objective.target_ema))))


def _forward_backward(run: rundir.Run, train_model, objective, batch, c_now, manual_sync: bool, logger,
                      loss_hook, target=None, ema_target=None) -> tuple[float, float]:
    """The loss and its gradients over the step's micro-batches; returns (last micro-batch loss, gradient norm of
    the loss as the objective gives it) with one device sync. With ``optim.grad_scale_beta`` the loss is divided by
    the running mean of its gradient norm before the backward pass, so Adam sees gradients of a steady scale."""
    cfg, dist, state = run.cfg, run.dist, run.state
    scale = state.grad_scale if cfg.optim.grad_scale_beta > 0 and state.grad_scale > 0 else None
    autocast = (torch.autocast(run.device.type, dtype=torch.bfloat16) if cfg.train.precision == "bf16"
                else contextlib.nullcontext())
    params = run.params
    run.optimizer.zero_grad(set_to_none=True)
    micro = batch.split(cfg.optim.accumulate)
    for j, mb in enumerate(micro):
        sync = j == len(micro) - 1 or dist.world_size == 1 or manual_sync
        with (contextlib.nullcontext() if sync else train_model.no_sync()):
            with autocast:
                terms = objective(train_model, mb.x0, state.step, labels=mb.labels, noise=mb.noise,
                                  indices=mb.indices, dropout_seed=mb.dropout_seed, c=c_now, target_model=target,
                                  ema_target=ema_target)
            loss = terms.total.mean()
            if loss_hook is not None:
                loss = loss_hook(state.step, loss)
            ((loss if scale is None else loss / scale) / len(micro)).backward()
        logger.accumulate(terms, loss, batch.ot_seconds / len(micro))
    if manual_sync:
        distributed.average_gradients(params)
    loss_value, norm = torch.stack([loss.detach().double().cpu(), grad_norm(params).cpu()]).tolist()  # one sync
    return loss_value, norm if scale is None else norm * scale


def _apply_or_skip(run: rundir.Run, ok: bool, loss_value: float, norm: float, health: Health) -> None:
    """An optimiser and EMA step when the step was finite on every rank; else the gradients are dropped."""
    cfg, state = run.cfg, run.state
    if ok:
        beta = cfg.optim.grad_scale_beta
        if beta > 0:  # the running gradient scale the next steps' losses are divided by
            state.grad_scale = norm if state.grad_scale <= 0 else beta * state.grad_scale + (1 - beta) * norm
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(run.params, cfg.optim.grad_clip)
        run.optimizer.step()
        run.ema.update(run.model, state.step + 1, state.nimg + cfg.train.batch_size, cfg.train.batch_size)
        health.consecutive_bad = 0
        health.last_finite_loss, health.last_finite_step = loss_value, state.step
    else:  # skipped on every rank alike (the flag was all-reduced)
        run.optimizer.zero_grad(set_to_none=True)
        state.bad_steps += 1
        health.consecutive_bad += 1


def _write_outputs(run: rundir.Run, logger: Monitor, health: Health, ok: bool, stopping: bool) -> None:
    """What is due after the step: checkpoint, snapshots, power EMAs, sample grids, evaluation."""
    cfg, state, is_main = run.cfg, run.state, run.dist.is_main
    total, latent_shape = cfg.train.total_steps, run.meta["latent_shape"]
    health.checkpoint_due |= stopping or state.step % cfg.checkpoint.every_steps == 0
    if health.checkpoint_due and ok:  # never inside a streak of non-finite steps
        health.checkpoint_due = not rundir.save_checkpoint(run, logger)
    if is_main and (stopping or state.step % cfg.checkpoint.snapshot_every_steps == 0):
        rundir.save_snapshot(run)  # a run stopped early has one too
    every = cfg.train.ema_power_every_steps
    if is_main and every and (state.step % every == 0 or state.step == total):
        rundir.save_snapshot(run, power_only=True)
    every = cfg.logging.sample_every_steps
    if is_main and ((every and state.step % every == 0) or state.step == total):
        logger.sample_grids(run.model, run.ema, state.step, latent_shape)
    every = cfg.logging.eval_every_steps
    if is_main and every and (state.step % every == 0 or state.step == total):
        logger.evaluate(run.model, run.ema, state.step, latent_shape)
    if stopping and health.checkpoint_due:
        logger.event(f"stopped at step {state.step} inside a streak of non-finite steps: no checkpoint "
                     "written; resuming replays from the newest one", state.step)
