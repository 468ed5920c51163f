"""Options that several subcommands share, written once so that their meaning and help text cannot drift apart."""

from __future__ import annotations

import argparse

from slct.config import FLOW_SOLVERS


def add_ema_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ema", default=None, help="which weights of the snapshot: an EMA name (rampup, std=0.05), a "
                   "decay (0.9999) or 'online'; None: the run's default (train.ema_default)")


def add_solver_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", choices=FLOW_SOLVERS, default=None,
                   help="the sampler: euler | heun for ldm and for any flow model's velocity ODE (any NFE), map for "
                   "a flow-map model's own k-step jumps (MeanFlow, Shortcut, SoFlow); default: the run's")
