"""Restructures change no behaviour: tiny runs of every objective (measured c, a resume in two slices and a rollback
included) come out bitwise as benchmarks/results/fingerprints.json recorded them (benchmarks/fingerprint.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _fingerprint_module():
    spec = importlib.util.spec_from_file_location("slct_bench_fingerprint", BENCHMARKS / "fingerprint.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_training_runs_match_the_recorded_fingerprints():
    fp = _fingerprint_module()
    saved = json.loads((BENCHMARKS / "results" / "fingerprints.json").read_text())
    assert set(saved["runs"]) == set(fp.RUNS)  # every objective and mode is covered
    now = fp.record(list(saved["runs"]))
    assert fp.compare(saved, now) == []


def test_the_comparison_notices_a_changed_run():
    fp = _fingerprint_module()
    saved = {"environment": fp._environment(), "runs": {"a": {"sha256": "0" * 64, "weight_sum": 1.0, "step": 6}}}
    now = {"environment": fp._environment(), "runs": {"a": {"sha256": "1" * 64, "weight_sum": 1.0, "step": 6}}}
    assert fp.compare(saved, now) == [f"a: sha256 {'1' * 12} != {'0' * 12}"]
    other = {**saved, "environment": {"torch": "0", "cpu_capability": "none"}}  # another machine: sums to 1e-4
    assert fp.compare(other, now) == []
    now["runs"]["a"]["weight_sum"] = 1.01
    assert fp.compare(other, now) == ["a: weight sum 1.01 != 1"]
