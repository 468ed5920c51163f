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

# the longest tests (each 1.5-4 min on 2 cores, from the --durations list every run prints) start first: under
# `-n 2` they otherwise start late and run alone at the end (10 min 10 s seen, ~4 min of it with one worker idle)
SLOWEST_FIRST = ("test_meanflow_demo_two_step_samples_beat_the_noise_baseline",
                 "test_demo_short_mode_beats_the_noise_baseline", "test_shortcut_demo_beats_the_noise_baseline",
                 "test_gpu_check_script_runs_every_step_at_toy_size_on_a_cpu")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: getattr(item, "originalname", item.name) not in SLOWEST_FIRST)  # stable: rest as is
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
