"""The ``slct`` command line: a thin dispatcher over the library.

Each sub-command lives in ``slct.commands.<name>`` and exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Adding a command is one entry below.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from slct import __version__

# command name -> module; order is the order shown by --help
COMMANDS: dict[str, str] = {
    "demo": "slct.commands.demo",
    "encode": "slct.commands.encode",
    "analyze": "slct.commands.analyze",
    "train": "slct.commands.train",
    "sample": "slct.commands.sample",
    "eval": "slct.commands.eval",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slct",
        description="Train 1- and 2-step latent consistency models with the sLCT recipe "
        "(Dao et al., ICLR 2025).",
    )
    parser.add_argument("--version", action="version", version=f"slct {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:  # a real import error inside the command: surface it
                raise
            continue  # command not shipped in this build
        p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _quiet_openmp() -> None:
    """Make idle OpenMP threads sleep instead of spin, unless the user chose otherwise.

    On small shared VMs (the 2-core machines slct is tested on) spinning threads made CPU training steps many
    times slower (`benchmarks/openmp_wait.py`, results in `benchmarks/results/openmp-wait-cpu.md`); on a GPU run
    the CPU threads are idle anyway. Must run before torch loads its OpenMP runtime, so the CLI does it first thing.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    _quiet_openmp()
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, RuntimeError) as e:
        # user-facing errors: one clear line, no traceback (set SLCT_TRACEBACK=1 to see it)
        if os.environ.get("SLCT_TRACEBACK"):
            raise
        print(f"slct {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
