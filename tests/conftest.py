"""Shared fixtures.

Tests that need the real data or weights in ``../shared`` use the ``shared_dir`` fixture: it
skips when they are absent on a developer machine and *fails* when ``CI=true``, so CI can
never go green by silently skipping the real-data tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# before torch loads OpenMP: spinning idle threads make CPU steps many times slower on 2-core VMs (see slct.cli._quiet_openmp)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# tests import diffusers directly: make a CUDA-only torchvision beside the CPU torch importable first (slct.compat)
from slct.compat import ensure_torchvision  # noqa: E402

ensure_torchvision()

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SLCT_SHARED", REPO.parent / "shared"))


def _require(path: Path) -> Path:
    if not path.exists():
        msg = f"{path} is missing (expected ../shared beside the checkout, or SLCT_SHARED)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED)


@pytest.fixture(scope="session")
def shared_weights(shared_dir) -> Path:
    return _require(shared_dir / "weights")


@pytest.fixture(scope="session")
def utkface_zip(shared_dir) -> Path:
    return _require(shared_dir / "data" / "utkface-200px.zip")


@pytest.fixture(autouse=True)
def _deterministic_torch():
    import torch

    torch.manual_seed(0)
    yield
