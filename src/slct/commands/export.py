"""`slct export`: a trained model in another library's format (today: a diffusers pipeline folder)."""

from __future__ import annotations

import argparse
from pathlib import Path

from slct.commands.options import add_ema_option

HELP = "export a snapshot as a diffusers pipeline folder (DiffusionPipeline.from_pretrained loads it)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("snapshot", help="a snapshot-*.pt, a run directory (its newest snapshot) or a checkpoint")
    p.add_argument("out", help="the folder to write (must not exist, or be empty)")
    p.add_argument("--format", choices=["diffusers"], default="diffusers", help="the target library")
    add_ema_option(p)


def run(args) -> int:
    try:
        from slct.diffusers_pipeline import export_diffusers
    except ImportError as e:
        raise ImportError(f'exporting to diffusers needs diffusers and safetensors: pip install "slct[sd-vae]" ({e})')
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose another OUT")
    from slct.checkpoint import write_folder_atomic

    # everything is written beside OUT and renamed into place: a full disk leaves no half-written folder behind
    write_folder_atomic(out, lambda folder: export_diffusers(args.snapshot, folder, ema=args.ema),
                        what="the diffusers pipeline")
    print(f"diffusers pipeline -> {out}\n  load: slct.diffusers_pipeline.load_pipeline({str(out)!r}) (runs nothing "
          f"from the folder), or DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True) for folders "
          "you made yourself\n  sample: pipe(seeds=range(16), num_inference_steps=1).images")
    return 0
