"""``slct analyze DATA_DIR``: the paper's outlier analysis (section 4.1, Figure 1) of a latent dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = ("box plots, fence fractions and kurtosis of latents (and pixels, and TDs): the paper's Figure 1; and which "
        "recipe (ilct, slct or a ladder rung) the latents' kurtosis points to")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", metavar="DATA_DIR", nargs="+",
                   help="latent dataset directory (from `slct encode`); several: each analysed, and side by side in "
                   "OUT/comparison.png (e.g. plain and --outliers latents of the same images)")
    p.add_argument("--out", default=None, help="output folder for analysis.png / analysis.json "
                   "(None: DATA_DIR/analysis; with several datasets: required)")
    p.add_argument("--pixels", action="store_true", help="also analyse the source images in pixel space")
    p.add_argument("--limit", type=int, default=4096, help="samples analysed, spread over the dataset (0: all)")
    p.add_argument("--normalization", default="per-channel", choices=["per-channel", "per-element", "none"],
                   help="standardisation of the data before plotting (per-element: the authors' normalisation; "
                        "per-channel: fence fractions as in the raw data)")
    p.add_argument("--network", default=None, metavar="PRESET",
                   help="analyse the temporal difference with this network preset (e.g. unet-small)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="weights for the TD analysis: an `slct train` snapshot/checkpoint, or a plain state dict of "
                        "the PrecondModel or its backbone (--network names the preset); None: fresh init")
    p.add_argument("--n-scales", type=int, default=21, help="discretisation steps N of the TD grid (paper: 21)")
    p.add_argument("--td-samples", type=int, default=256, help="samples for the TD statistics")
    p.add_argument("--seed", type=int, default=0, help="seed of the TD noise and timesteps")
    p.add_argument("--device", default="cpu", help="device for the TD network")
    p.add_argument("--workers", type=int, default=None, help="image-decoding processes for --pixels")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from slct.analyze import analyze, compare, format_table

    options = dict(pixels=args.pixels, limit=args.limit or None, normalization=args.normalization,
                   network=args.network, n_scales=args.n_scales, checkpoint=args.checkpoint,
                   td_samples=args.td_samples, seed=args.seed, device=args.device, num_workers=args.workers,
                   progress=not args.no_progress)
    if len(args.data_dir) > 1:
        if not args.out:
            raise ValueError("several datasets are analysed side by side into one folder: pass --out DIR")
        result = compare(args.data_dir, args.out, **options)
        print(format_table(result))
        for name, report in result["reports"].items():
            print(f"{name}: {report['advice']['text']}")
        print(f"wrote {Path(args.out) / 'comparison.png'} and {Path(args.out) / 'comparison.json'} (and one "
              "analysis per dataset beside them)")
        return 0
    (data_dir,) = args.data_dir
    out = Path(args.out) if args.out else Path(data_dir) / "analysis"
    report = analyze(data_dir, out, **options)
    unit = "standard deviations" if args.normalization != "none" else "raw values"
    print(f"{report['dataset']}: {report['codec_id']}, {report['image_resolution']} px, data in {unit} "
          f"({args.normalization}); fences at {report['fences_iqr']['inner']} and {report['fences_iqr']['outer']} IQR")
    print(format_table(report))
    print(report["advice"]["text"])
    print(f"wrote {out / 'analysis.png'} and {out / 'analysis.json'}")
    return 0
