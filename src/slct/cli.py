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
    "ema": "slct.commands.ema",
    "export": "slct.commands.export",
    "eval": "slct.commands.eval",
    "eval-ref": "slct.commands.eval_ref",  # typed `slct eval ref` (see ALIASES)
}
# leading words -> command: `slct eval ref` is its own command, not an argparse sub-command of `slct eval`
ALIASES: dict[tuple[str, ...], str] = {("eval", "ref"): "eval-ref"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it says something: not for None, False or an empty list, and not again when
    the help text already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in text.lower():
            return text
        return super()._get_help_string(action)


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
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, prog=getattr(module, "PROG", None),
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _prog=p.prog)
    return parser


def _quiet_openmp() -> None:
    """Make idle OpenMP threads sleep instead of spin, unless the user chose otherwise.

    On small shared VMs (the 2-core machines slct is tested on) spinning threads made CPU training steps many
    times slower (`benchmarks/openmp_wait.py`, results in `benchmarks/results/openmp-wait-cpu.md`); on a GPU run
    the CPU threads are idle anyway. Must run before torch loads its OpenMP runtime, so the CLI does it first thing.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _one_line_warnings() -> None:
    """Warnings as one line each, once per message: "warning: TEXT", without the source path and line that Python
    prints (users of the CLI read the message, not slct's internals)."""
    import warnings

    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        lines = str(message).strip().splitlines()
        text = lines[0] if lines else category.__name__
        if text not in seen:
            seen.add(text)
            print(f"warning: {text}", file=sys.stderr if file is None else file)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    _quiet_openmp()
    _one_line_warnings()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    for words, command in ALIASES.items():
        if tuple(argv[:len(words)]) == words:
            argv = [command, *argv[len(words):]]
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        # user-facing errors: one clear line, no traceback (set SLCT_TRACEBACK=1 to see it)
        if os.environ.get("SLCT_TRACEBACK"):
            raise
        print(f"{args._prog}: error: {one_line(e)}", file=sys.stderr)
        return 2


MAX_ERROR_CHARS = 600


def one_line(error: BaseException) -> str:
    """An exception as one line of bounded length: the first line of its message (a library's multi-line or
    array-sized message must not flood the terminal; SLCT_TRACEBACK=1 shows all of it)."""
    text = str(error).strip() or type(error).__name__
    first = text.splitlines()[0]
    if isinstance(error, OSError) and error.filename and str(error.filename) not in first:
        first = f"{first}: {error.filename}"
    if len(first) > MAX_ERROR_CHARS or first != text:
        first = first[:MAX_ERROR_CHARS].rstrip() + " ... (SLCT_TRACEBACK=1 shows the rest)"
    return first


if __name__ == "__main__":
    sys.exit(main())
