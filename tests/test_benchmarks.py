"""The ablation benchmark's bookkeeping: where runs live and how the report reads them (no training here)."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("slct_bench_ablation", BENCHMARKS / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _args(**kw) -> argparse.Namespace:
    base = dict(resolution=64, holdout=10, steps=100, seed=0, n_eval=50, curve_n=20, curve_every=50,
                curves=["ilct", "slct"], note="two fake runs")
    return argparse.Namespace(**{**base, **kw})


def _eval_json(path: Path, n: int, fds: dict[int, float]) -> None:
    results = [dict(nfe=nfe, fd=fd, precision=0.1 * nfe, recall=0.01 * nfe) for nfe, fd in fds.items()]
    path.write_text(json.dumps(dict(n=n, results=results)))


def test_runs_of_different_lengths_live_apart(ablation, tmp_path):
    assert ablation.run_dir(_args(steps=1000), tmp_path, "slct") != ablation.run_dir(_args(steps=2000), tmp_path, "slct")
    assert ablation.run_dir(_args(steps=1000), tmp_path, "slct").name == "slct-1000steps"


def test_report_tables_final_rows_and_training_time(ablation, tmp_path, monkeypatch):
    monkeypatch.setattr(ablation, "RESULTS", tmp_path / "results")
    a = _args()
    fds = {"ilct": {1: 300.0, 2: 200.0}, "slct": {1: 250.0, 2: 190.0}}
    for method, final in fds.items():
        run = ablation.run_dir(a, tmp_path, method)
        run.mkdir(parents=True)
        _eval_json(run / "eval-00000050-n20.json", 20, {1: 900.0})
        _eval_json(run / "eval-00000100-n20.json", 20, {1: final[1] + 50})
        _eval_json(run / "eval-00000100-n50.json", 50, final)
        # 2 s/step for 50 steps, then 4 s/step for 50 steps: 300 s of training
        rows = [dict(step=50, sec_per_step=2.0), dict(step=100, sec_per_step=4.0)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    ablation.stage_report(a, tmp_path, ["ilct", "slct"])

    stem = tmp_path / "results" / "ablation-utkface64-100steps"
    record = json.loads(stem.with_suffix(".json").read_text())
    final = [r for r in record["rows"] if r["final"]]
    assert sorted((r["method"], r["nfe"], r["fd"]) for r in final) == [
        ("ilct", 1, 300.0), ("ilct", 2, 200.0), ("slct", 1, 250.0), ("slct", 2, 190.0)]
    assert all(r["train_s"] == pytest.approx(300.0) for r in record["rows"])
    assert len(record["rows"]) == 2 * (1 + 1 + 2)  # two curve points + the two final NFEs, per method
    md = stem.with_suffix(".md").read_text()
    assert "| slct | 1 | 250.00 | 0.100 | 0.0100 | 100 | 5.0 min |" in md
    assert "| ilct | 2 | 200.00 | 0.200 | 0.0200 | 100 | 5.0 min |" in md
    assert "two fake runs" in md
    assert (tmp_path / "results" / "ablation-utkface64-100steps-curves.png").stat().st_size > 0


def test_gpu_check_script_runs_every_step_at_toy_size_on_a_cpu(tmp_path):
    """benchmarks/gpu_check.sh cannot rot where no GPU is ever lent: its toy mode runs the same steps on the CPU."""
    import subprocess

    out = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--toy", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record = json.loads((tmp_path / "gpu-check-cpu-toy.json").read_text())
    assert record["all_ok"] and [s["step"] for s in record["steps"]] == [
        "CUDA tests", "training throughput", "torchrun --nproc_per_node=1", "sampling 1 and 2 steps"]
    assert [r["case"] for r in record["throughput"]["rows"]] == ["slct:fp32", "slct:bf16"]
    assert all(r["images_per_s"] > 0 for r in record["throughput"]["rows"])
    assert record["steps"][3]["images_nfe1"] == [16, 8, 8, 3] and record["steps"][3]["images_nfe2"] == [16, 8, 8, 3]
    assert "| torchrun --nproc_per_node=1 | ok |" in (tmp_path / "gpu-check-cpu-toy.md").read_text()
