"""`slct eval ref SOURCE`: reference statistics (features, mean, covariance) of real images for `slct eval`.

A command of its own rather than a sub-command of `slct eval`, so that a mistyped `slct eval` flag is reported as
such instead of its value being read as a sub-command name. The CLI maps `slct eval ref ...` here.
"""

from __future__ import annotations

from slct.commands.eval import add_ref_arguments as add_arguments  # noqa: F401  (the command's interface)
from slct.commands.eval import run_ref as run  # noqa: F401

HELP = "typed `slct eval ref`: reference statistics of real images (a folder, .zip or latent dataset)"
PROG = "slct eval ref"
