"""Starting a run from another run's weights (``train.init``, ``slct train --init RUN_OR_SNAPSHOT``): consistency
tuning from a diffusion model (ECT / ECM style: the ``ldm`` baseline's denoiser is a good first consistency
function), or any run continued under another objective. The source must be the same network on the same latents:
architecture and options, latent shape, codec and normalisation; any difference is one line naming it, before
anything is written. The source's training (steps, images) is recorded with the run, so a budget counts it."""

from __future__ import annotations

from pathlib import Path

import torch

from slct import checkpoint


def recorded(run_dir: Path, key: str) -> dict | None:
    """What a run that has checkpoints recorded of its ``key`` ("init" or "teacher") in run.json, or None for a run
    not started yet."""
    import json

    if not checkpoint.list_checkpoints(run_dir) or not (Path(run_dir) / "run.json").is_file():
        return None
    return json.loads((Path(run_dir) / "run.json").read_text()).get(key)


def recorded_init(run_dir: Path) -> dict | None:
    """What a run that has checkpoints recorded of its source (run.json), or None for a run not started yet."""
    return recorded(run_dir, "init")


def describe_source(record: dict) -> str:
    """One line naming the file a run loaded weights from: path, kind, step, EMA and the start of its sha256."""
    sha = f", sha256 {record['sha256'][:12]}" if record.get("sha256") else ""
    return f"{record['path']} ({record['kind']} model, step {record['step']}, {record['ema']} weights{sha})"


def _source_record(snap) -> dict:
    from slct.sampling import file_sha256

    return {"path": str(Path(snap.path).resolve()), "kind": snap.config.objective.kind, "step": int(snap.step),
            "ema": snap.ema, "sha256": file_sha256(snap.path)}


def load_init(path: str, model: torch.nn.Module, meta: dict, network_name: str) -> dict:
    """Load the default weights of the snapshot (or run directory, or checkpoint) at ``path`` into ``model``;
    return what the run records of its source: {"path", "kind", "step", "nimg", "ema"}."""
    from slct.sampling import load_snapshot
    from slct.training.rundir import describe_difference

    snap = load_snapshot(path)  # never unpickles; refuses non-finite weights
    mine = {"network": network_name, **{k: meta[k] for k in ("network_kwargs", "latent_shape", "codec",
                                                            "normalizer", "num_classes")}}
    theirs = {"network": snap.config.network.name, "network_kwargs": snap.network_kwargs,
              "latent_shape": list(snap.latent_shape), "codec": snap.codec_spec,
              "normalizer": snap.normalizer.to_dict(), "num_classes": snap.num_classes}
    for key in mine:
        if mine[key] != theirs[key]:
            raise ValueError(f"--init {path}: not the same network on the same latents ({key}: "
                             f"{describe_difference(theirs[key], mine[key])}, the source's first); a run starts "
                             "from weights of its own architecture, latent shape, codec and normalisation only")
    model.load_state_dict(snap.model.state_dict())
    return {**_source_record(snap), "nimg": None if snap.nimg is None else int(snap.nimg)}


def load_teacher(path: str, meta: dict, run_dir: Path | None = None) -> tuple[torch.nn.Module, dict]:
    """The diffusion teacher of consistency distillation: the default weights of an ``ldm`` run (directory, snapshot
    or checkpoint) as a frozen denoiser in eval mode, and what the run records of it (the exact file and its
    sha256). The teacher may be another network than the student's, but it must be a diffusion model (EDM
    parameterisation) on the same latents.

    A run that has started (``run_dir`` holds checkpoints) distils from the file it recorded, whatever ``path``
    resolves to now (a teacher run that kept training has newer snapshots): that file, unchanged, or a ValueError
    in one line if it changed or vanished."""
    from slct.objectives import parameterisation
    from slct.sampling import file_sha256, load_snapshot
    from slct.training.rundir import describe_difference

    before = recorded(run_dir, "teacher") if run_dir is not None else None
    if before is not None:
        file = Path(before["path"])
        if not file.is_file():
            raise ValueError(f"this run distils from {file}, which is gone; restore that file to resume (a newer "
                             "teacher would change the run), or start a new run with another --out")
        if before.get("sha256") and file_sha256(file) != before["sha256"]:
            raise ValueError(f"this run's teacher {file} has changed since the run started (sha256 "
                             f"{before['sha256'][:12]} recorded); restore it to resume, or start a new run")
        path = str(file)
    snap = load_snapshot(path)
    kind = snap.config.objective.kind
    if parameterisation(kind) != "edm":
        raise ValueError(f"--teacher {path} is a {kind} model, not a diffusion model: distillation needs an ldm run "
                         "(a denoiser whose Heun steps follow the probability-flow ODE)")
    mine = {k: meta[k] for k in ("latent_shape", "codec", "normalizer")}
    theirs = {"latent_shape": list(snap.latent_shape), "codec": snap.codec_spec, "normalizer": snap.normalizer.to_dict()}
    for key in mine:
        if mine[key] != theirs[key]:
            raise ValueError(f"--teacher {path} works on other latents ({key}: "
                             f"{describe_difference(theirs[key], mine[key])}, the teacher's first): distil from a "
                             "diffusion model trained on the same latent dataset")
    theirs_k, mine_k = int(snap.num_classes), int(meta["num_classes"])
    if theirs_k != mine_k:  # the student would fail at step 0, or silently distil the null-label output
        what = lambda k: f"class-conditional ({k} classes)" if k else "unconditional"  # noqa: E731
        raise ValueError(f"--teacher {path} is {what(theirs_k)} and this run is {what(mine_k)}: distil a "
                         f"{'conditional' if theirs_k else 'unconditional'} teacher into a student of the same "
                         f"conditioning ({'--set data.conditional=true' if theirs_k else 'leave data.conditional off'})")
    teacher = snap.model.eval()
    teacher.requires_grad_(False)
    return teacher, _source_record(snap)
