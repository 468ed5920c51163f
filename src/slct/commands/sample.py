"""`slct sample`: generate images from a snapshot with 1, 2 or k consistency steps (or the ldm baseline's solver)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

from slct.cli import one_line
from slct.commands.options import add_ema_option, add_solver_option

HELP = "generate images from a snapshot (1-step, 2-step, k-step; per-sample seeds; PNGs, a grid or .npz)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("snapshot", help="a snapshot-*.pt file, a run directory (its newest snapshot) or a training "
                   "checkpoint (checkpoints/checkpoint-*.pt: its EMAs and online weights)")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--nfe", type=int, nargs="+", default=None,
                   help="network evaluations: 1, 2 or k for consistency models (default 1 2); the solver's NFE for ldm")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i, whatever --batch or the process count")
    add_solver_option(p)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sigma-mid", type=float, default=None, help="2-step intermediate sigma (default: the run's)")
    add_ema_option(p)
    p.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                   help="class-conditional models: balanced (default: seed mod K), random, none (the null label), or "
                   "class names / ids (the sample with seed s gets LABELS[s mod len(LABELS)])")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance weight for the ldm baseline trained with label dropout (1: none); "
                   "refused for consistency models (docs/evaluation.md)")
    p.add_argument("--format", nargs="+", choices=("grid", "png", "npz"), default=["grid"],
                   help="one or more of: grid (one PNG), png (one file per sample), npz (images, latents, seeds)")
    p.add_argument("--out", default=None, help="output directory (default: <run>/samples-cli)")
    p.add_argument("--device", default="auto")


def check_sigma_mid(sigma_mid: float, objective_cfg) -> None:
    """--sigma-mid: a noise level strictly between the run's sigma_min and sigma_max, for consistency models."""
    import math

    from slct.objectives import parameterisation

    if parameterisation(objective_cfg.kind) != "consistency":
        raise ValueError(f"--sigma-mid sets the intermediate noise level of consistency sampling; this is a "
                         f"{objective_cfg.kind} model (leave --sigma-mid out)")
    lo, hi = objective_cfg.sigma_min, objective_cfg.sigma_max
    if not (math.isfinite(sigma_mid) and lo < sigma_mid < hi):
        raise ValueError(f"--sigma-mid must be a noise level in ({lo:g}, {hi:g}) (the run's sigma_min, sigma_max), "
                         f"got {sigma_mid}")


def run(args) -> int:
    import torch

    from slct import distributed
    from slct.sampling import find_snapshot, load_snapshot
    from slct.training import resolve_device

    if args.n < 1 or args.batch < 1:
        raise ValueError("--n and --batch must be >= 1")
    if args.nfe is not None and min(args.nfe) < 1:
        raise ValueError(f"--nfe takes network evaluations >= 1, got {' '.join(map(str, args.nfe))}")
    device = resolve_device(args.device)
    dist = distributed.init(device)
    if dist.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    snap = load_snapshot(args.snapshot, device=device, ema=args.ema)
    if args.sigma_mid is not None:
        check_sigma_mid(args.sigma_mid, snap.config.objective)
        snap.config.sampling.sigma_mid = args.sigma_mid  # this process's private copy of the snapshot's config
    from slct.sampling import default_nfe, set_solver

    if args.solver is not None:
        set_solver(snap.config.sampling, snap.config.objective.kind, args.solver)
    nfes = args.nfe or default_nfe(snap.config.objective, snap.config.sampling)
    snap.labels([args.seed], args.labels)  # a wrong label or an unconditional model fails before any work
    snap.check_guidance(args.guidance)
    base = find_snapshot(args.snapshot).parent
    if base.name in ("checkpoints", "power-ema", "posthoc-ema"):  # the run directory above them
        base = base.parent
    out = Path(args.out) if args.out else base / "samples-cli"
    seeds = list(range(args.seed, args.seed + args.n))
    # every file is written into a staging folder beside OUT and moved into OUT at the end: a full disk or an error
    # leaves OUT as it was, with no partial set of samples in it
    stage = out.with_name(f".{out.name}.partial")
    try:
        written = _write_samples(args, snap, nfes, seeds, stage, out, dist)
        distributed.barrier()
        if dist.is_main:
            _publish(stage, out)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if not isinstance(e, OSError):
            raise
        from slct.checkpoint import SaveError, disk_full

        full = disk_full(e, out.parent if out.parent.exists() else Path("."))
        reason = f"no space left on {out.parent}" if full else f"{type(e).__name__}: {one_line(e)}"
        raise SaveError(f"{reason} while writing samples to {out}; nothing was written", disk_full=full) from e
    for line in written if dist.is_main else []:
        print(line)
    distributed.shutdown()
    return 0


def _write_samples(args, snap, nfes, seeds, stage: Path, out: Path, dist) -> list[str]:
    """Generate every NFE's samples and write them under ``stage``; returns the lines naming where they will be."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from slct import distributed
    from slct.images import save_grid, save_pngs, to_uint8

    mine = seeds[dist.rank::dist.world_size]  # disjoint shares; each sample depends on its seed only
    formats, lines = set(args.format), []
    stage.mkdir(parents=True, exist_ok=True)
    for nfe in nfes:
        images, latents, labels = [], [], []
        for i in tqdm(range(0, len(mine), args.batch), desc=f"nfe={nfe}", disable=not dist.is_main):
            chunk = mine[i:i + args.batch]
            y = snap.labels(chunk, args.labels)
            z = snap.sample_latents(chunk, nfe, y, args.guidance)
            x = snap.decode(z)
            labels.append(y if y is not None else torch.full((len(chunk),), -1))
            if "png" in formats:
                save_pngs(x, stage / f"nfe{nfe}", [f"{s:06d}.png" for s in chunk])
            if formats & {"grid", "npz"}:
                images.append(x.cpu())
                latents.append(z.cpu())
        if not formats & {"grid", "npz"}:
            continue
        gathered = distributed.gather_objects((mine, torch.cat(images) if images else None,
                                               torch.cat(latents) if latents else None,
                                               torch.cat(labels) if labels else None))
        if not dist.is_main:
            continue
        order = sorted((s, k, j) for k, (ss, *_) in enumerate(gathered) for j, s in enumerate(ss))
        x = torch.stack([gathered[k][1][j] for _, k, j in order])
        z = torch.stack([gathered[k][2][j] for _, k, j in order])
        y = torch.stack([gathered[k][3][j] for _, k, j in order])
        if "grid" in formats:
            save_grid(x, stage / f"grid-nfe{nfe}.png")
            lines.append(f"nfe={nfe}: {len(seeds)} samples -> {out / f'grid-nfe{nfe}.png'}")
        if "npz" in formats:
            extra = {"labels": y.numpy(), "class_names": np.array(snap.class_names)} if snap.num_classes else {}
            np.savez(stage / f"samples-nfe{nfe}.npz", images=to_uint8(x), latents=z.numpy(), seeds=np.array(seeds),
                     **extra)
            lines.append(f"nfe={nfe}: {len(seeds)} samples -> {out / f'samples-nfe{nfe}.npz'}")
    if "png" in formats:
        lines.append(f"{len(seeds)} samples per NFE -> {out}/nfe*/")
    if dist.is_main:  # which invocation the folder's samples are
        (stage / "samples.json").write_text(json.dumps(dict(
            snapshot=str(snap.path), step=snap.step, ema=snap.ema, nfe=list(nfes), seeds=[seeds[0], seeds[-1]],
            labels=args.labels, guidance=args.guidance, format=sorted(formats),
            solver=args.solver, sigma_mid=snap.config.sampling.sigma_mid), indent=1) + "\n")
    return lines


# what `slct sample` writes into its folder: an earlier invocation's files of these names are replaced or removed
SAMPLE_FILES = re.compile(r"^(grid-nfe\d+\.png|samples-nfe\d+\.npz|nfe\d+|samples\.json)$")


def _publish(stage: Path, out: Path) -> None:
    """Move what ``stage`` holds into ``out`` (an entry of the same name there is replaced) and remove what an
    earlier `slct sample` left there that this one did not write (its other NFEs' grids, say), so the folder holds
    one invocation's samples (samples.json says which); files of other names are left alone."""
    out.mkdir(parents=True, exist_ok=True)
    mine = {entry.name for entry in stage.iterdir()}
    for old in out.iterdir():
        if SAMPLE_FILES.match(old.name) and old.name not in mine:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    for entry in sorted(stage.iterdir()):
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    stage.rmdir()
