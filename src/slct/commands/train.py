"""`slct train`: train a model from a preset (method x data), a YAML file and overrides."""

from __future__ import annotations

import argparse
import os
import sys

HELP = "train a latent consistency model (or the ldm baseline); re-run the same command to resume"


def add_config_arguments(p: argparse.ArgumentParser, default_preset: str | None = "slct") -> None:
    """The config flags shared by `slct train` and `slct demo`."""
    p.add_argument("--preset", default=default_preset, help="method preset (see --list-presets)")
    p.add_argument("--data-preset", default=None, help="dataset preset: celebahq256, ffhq256, lsunchurch256, "
                   "utkface64, digits")
    p.add_argument("--config", default=None, help="a YAML file of config values (applied after the presets)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set objective.loss=cauchy (repeatable; strict)")
    p.add_argument("--data", default=None, help="latent dataset directory (from `slct encode`), or builtin:digits8 (the demo's 8x8 digits) / "
                   "builtin:digits (16x16)")
    p.add_argument("--network", default=None, help="network preset, e.g. unet-paper, unet-small, dit-b2")
    p.add_argument("--steps", type=int, default=None, help="total training steps K (sets the curriculum length)")
    p.add_argument("--batch", type=int, default=None, help="global batch size")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--teacher", default=None, metavar="RUN_OR_SNAPSHOT",
                   help="the diffusion teacher of consistency distillation (--preset ilcd / slcd): an ldm run on the "
                   "same latents (objective.teacher)")
    p.add_argument("--init", default=None, metavar="RUN_OR_SNAPSHOT",
                   help="start from this run's default weights (same network on the same latents), e.g. consistency "
                   "tuning from an ldm run (train.init)")


def flag_overrides(args) -> dict:
    out: dict = {}
    if args.data is not None:
        out.setdefault("data", {})["path"] = args.data
    if args.network is not None:
        out.setdefault("network", {})["name"] = args.network
    if getattr(args, "teacher", None) is not None:
        out.setdefault("objective", {})["teacher"] = args.teacher
    for flag, key in (("steps", "total_steps"), ("batch", "batch_size"), ("seed", "seed"), ("device", "device"),
                      ("init", "init")):
        if getattr(args, flag) is not None:
            out.setdefault("train", {})[key] = getattr(args, flag)
    return out


def resolve(args):
    from slct.config import load_config

    return load_config(args.preset, args.data_preset, args.config, args.sets, flag_overrides(args))


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--out", default=None, help="run directory (default: runs/<preset>-<data-preset>)")
    p.add_argument("--resume", default="auto", help="auto (newest checkpoint in --out, if any) | none | PATH")
    p.add_argument("--until-step", type=int, default=None, help="stop (with a checkpoint) at this step: train in slices")
    p.add_argument("--minutes", type=float, default=None, help="stop (with a checkpoint) after this many minutes")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and derived quantities, then exit")
    p.add_argument("--list-presets", action="store_true", help="list method and data presets, then exit")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a plain line per logging interval (logging.log_every_steps) instead")


def run(args) -> int:
    if args.list_presets:
        print_presets()
        return 0
    cfg = resolve(args)
    if args.dry_run:
        print(dry_run_report(cfg))
        return 0
    from slct.training import train

    if os.environ.get("RANK", "0") == "0":  # once, not per process under torchrun
        for note in curriculum_notes(cfg):
            print(note, file=sys.stderr)
    out = args.out or f"runs/{cfg.preset.replace(' x ', '-') or 'run'}"
    result = train(cfg, out, resume=args.resume, until_step=args.until_step, max_minutes=args.minutes,
                   progress="lines" if args.no_progress else "bar")
    if result.finished or result.stopped_by in ("until_step", "minutes"):
        return 0
    return 143 if result.signal == "SIGTERM" else 130  # 128 + the signal's number, as a shell reports it


def print_presets() -> None:
    from slct.config import list_presets, preset_description

    for kind, flag in (("method", "--preset"), ("data", "--data-preset")):
        print(f"{kind} presets ({flag}):")
        for name in list_presets(kind):
            print(f"  {name:22s} {preset_description(kind, name)}")


def dry_run_report(cfg) -> str:
    """The resolved config as YAML plus what follows from it (curriculum stages, c per stage, model size)."""
    import yaml

    from slct.curriculum import C_SCHEDULES, c_schedule, curriculum_stages, stage_length_steps

    obj, tr = cfg.objective, cfg.train
    lines = ["# resolved config", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "", "# derived"]
    lines.append(f"total steps K: {tr.total_steps:,}; images seen: {tr.total_steps * tr.batch_size:,}")
    shape, source, size = _latent_shape(cfg)
    if size:
        lines.append(f"images per epoch: {size:,} (data: {cfg.data.path}); epochs: "
                     f"{tr.total_steps * tr.batch_size / size:,.1f}")
    dim = 1
    for s in shape:
        dim *= s
    from slct.objectives import uses_curriculum

    if uses_curriculum(obj):
        k_prime = stage_length_steps(tr.total_steps, obj.s0, obj.s1, obj.min_stage_steps)
        floor = f", at least {obj.min_stage_steps:,} (objective.min_stage_steps)" if obj.min_stage_steps else ""
        lines.append(f"stage length K': {k_prime:,} steps (paper eq. 10, s0={obj.s0}, s1={obj.s1}{floor})")
        lines.append(f"{'from step':>10} {'steps':>9} {'N':>6} {'c (' + obj.c_schedule + ')':>22}")
        for stage in curriculum_stages(tr.total_steps, obj.s0, obj.s1, obj.min_stage_steps):
            c = (f"{c_schedule(obj.c_schedule, stage['n_scales'], dim, obj.s0, c0=obj.c0):.6g}"
                 if obj.c_schedule in C_SCHEDULES else "measured at the start")
            lines.append(f"{stage['start']:>10,} {stage['steps']:>9,} {stage['n_scales']:>6} {c:>22}")
        lines += curriculum_notes(cfg)
    try:
        from slct.model import build_model, count_parameters

        model = build_model(cfg, shape, 0)
        lines.append(f"network: {cfg.network.name}, {count_parameters(model):,} trainable parameters at latent shape "
                     f"{tuple(shape)} ({source})")
    except (ValueError, ImportError) as e:
        lines.append(f"network: could not be built: {e}")
    return "\n".join(lines)


LONG_RUN_STEPS = 20_000  # beyond the lengths the short-run curriculum cap was measured at (500-2,000 steps)


def curriculum_notes(cfg) -> list[str]:
    """What a run's length says about its curriculum settings (printed by --dry-run and when training starts)."""
    from slct.curriculum import stage_length_steps
    from slct.objectives import uses_curriculum

    obj, total = cfg.objective, cfg.train.total_steps
    if not uses_curriculum(obj):
        return []
    notes = []
    k_prime = stage_length_steps(total, obj.s0, obj.s1, obj.min_stage_steps)
    if k_prime < 1000 and total >= 1000 and not obj.min_stage_steps:
        notes.append(f"note: stages of {k_prime} steps are shorter than RAdam's memory (~1,000 steps at beta2 "
                     "0.999); objective.min_stage_steps gives each stage a floor (fewer stages)")
    if obj.s1 < 640 and total >= LONG_RUN_STEPS:
        notes.append(f"note: the curriculum stops at N = {obj.s1 + 1} (objective.s1={obj.s1}: a short-run setting, "
                     f"measured at 2,000 steps); for a run of {total:,} steps consider the paper's "
                     "--set objective.s1=640")
    return notes


def _latent_shape(cfg):
    """(latent shape, where it came from, dataset size or None)."""
    if cfg.data.path:
        try:
            from slct.training import open_dataset

            ds = open_dataset(cfg)
            return tuple(ds.latent_shape), "from the data", len(ds)
        except (FileNotFoundError, ValueError) as e:
            print(f"note: data not readable ({e}); using the network preset's default shape", file=sys.stderr)
    from slct.nn import NETWORK_PRESETS

    _, defaults = NETWORK_PRESETS[cfg.network.name]
    shape = (defaults.get("in_channels", 4), defaults.get("resolution", 32), defaults.get("resolution", 32))
    source = (f"the network preset's default: {cfg.data.path} could not be read" if cfg.data.path
              else "the network preset's default; pass --data for the real one")
    return shape, source, None
