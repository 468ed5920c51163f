"""`slct ema RUN --std S [S ...]`: post-hoc EMA (EDM2) from the power EMAs a run stored, as new snapshots."""

from __future__ import annotations

import argparse

HELP = "reconstruct EMAs of any width after training from the stored power EMAs (EDM2's post-hoc EMA)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory (trained with train.ema_power_stds, e.g. the utkface64 preset)")
    p.add_argument("--std", type=float, nargs="+", required=True,
                   help="relative widths sigma_rel of the EMAs to build (EDM2: 0.05-0.15 typical; larger averages "
                   "more of training)")
    p.add_argument("--step", type=int, default=None, help="read the EMA at this step (default: the latest stored)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/posthoc-ema)")
    p.add_argument("--max-fit-error", type=float, default=0.1,
                   help="refuse a reconstruction whose weight profile misses the wanted one by more than this "
                   "(relative L2; the run's stored EMAs may not span the wanted width at that step)")


def run(args) -> int:
    from slct.posthoc import reconstruct

    for std in args.std:
        r = reconstruct(args.run, std, args.step, args.out, args.max_fit_error)
        print(f"std={std:g} at step {r['step']}: {r['sources']} stored power EMAs, profile fit error "
              f"{r['fit_error']:.2e} -> {r['path']}")
    print("sample or evaluate with: slct sample PATH, slct eval --snapshot PATH")
    return 0
