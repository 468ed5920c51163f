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
# xdist workers split the cores instead of each taking all of them: two workers of 2 threads on 2 cores contend, and
# the tiny test networks ran 15-25% slower per step on 2 threads than on 1 even alone (2 cores, PyTorch 2.13). Set
# before torch loads so that subprocesses (torchrun, the CLI) inherit it too; tests that need a count set their own.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

# tests import diffusers directly: make a CUDA-only torchvision beside the CPU torch importable first (slct.compat)
from slct.compat import ensure_torchvision  # noqa: E402

ensure_torchvision()

REPO = Path(__file__).resolve().parents[1]

# The longest tests (seconds on 2 cores, from the --durations list every run prints) go one by one to the worker
# with less of them, at the head of the first chunk pytest-xdist sends each worker (it sends consecutive chunks of
# a quarter of a worker's share): left where they fall they ran late, or all on one worker (10 min 12 s seen).
LONGEST_TESTS_S = {"test_meanflow_demo_two_step_samples_beat_the_noise_baseline": 170,
                   "test_demo_short_mode_beats_the_noise_baseline": 95,
                   "test_gpu_check_script_runs_every_step_at_toy_size_on_a_cpu": 65,
                   "test_shortcut_demo_beats_the_noise_baseline": 55,
                   "test_two_nodes_match_one_process_and_only_global_rank_0_writes": 28,
                   "test_digits_board_trains_scores_and_judges_against_the_best_baseline": 27,
                   "test_training_runs_match_the_recorded_fingerprints": 25}


def _expected_s(item) -> float:
    return LONGEST_TESTS_S.get(getattr(item, "originalname", item.name), 0)  # parametrised tests by their function


def pytest_collection_modifyitems(config, items):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # the same on every worker: same order
    slow = sorted((i for i in items if _expected_s(i)), key=lambda i: -_expected_s(i))
    rest = [i for i in items if i not in slow]
    if workers < 2 or len(items) < 8 * workers:
        items[:] = slow + rest
        return
    chunk = max(len(items) // workers // 4, 2)
    heads, load = [[] for _ in range(workers)], [0] * workers
    for item in slow:
        w = load.index(min(load))
        heads[w].append(item)
        load[w] += _expected_s(item)
    ordered = []
    for head in heads:
        take = chunk - len(head)
        ordered += head + rest[:take]
        rest = rest[take:]
    items[:] = ordered + rest


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
