"""Importing optional packages that pull in torchvision (diffusers, timm for FD-DINOv2, pytorch-fid in the tests).

PyPI's torchvision wheels for Linux are built against CUDA torch. Beside a CPU-only torch their C++
operators (nms, roi_align, ...) cannot load, and ``import torchvision`` then fails while registering
fake-tensor kernels for those operators ("operator torchvision::nms does not exist"). slct needs none of
them, only the Python modules that timm and pytorch-fid import, so :func:`import_module` retries the
import without that registration module. Nothing else about torchvision changes, and on a matching
install the first import simply succeeds.
"""

from __future__ import annotations

import importlib
import sys
import types
from types import ModuleType

_REGISTRATIONS = "torchvision._meta_registrations"


def _torchvision_ops_unloadable(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and "torchvision::" in str(error)


def ensure_torchvision() -> None:
    """Make ``import torchvision`` work (or leave it absent) before a package that imports it lazily (diffusers).

    Where it is not installed, or imports normally, nothing changes.
    """
    try:
        importlib.import_module("torchvision")
    except ImportError:
        return
    except RuntimeError as e:
        if not _torchvision_ops_unloadable(e):
            raise
        for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[module]  # the half-imported attempt
        sys.modules[_REGISTRATIONS] = types.ModuleType(_REGISTRATIONS)  # skip registering kernels for absent ops
        importlib.import_module("torchvision")


def import_module(name: str, extra: str | None = None) -> ModuleType:
    """``importlib.import_module(name)``, tolerating a torchvision whose C++ operators cannot load.

    ``extra`` names the pip extra that installs ``name`` for the ImportError message.
    """
    ensure_torchvision()
    try:
        return importlib.import_module(name)
    except ImportError as e:
        hint = f' (pip install "slct[{extra}]")' if extra else ""
        raise ImportError(f"{name} is needed here but not installed{hint}: {e}") from e
