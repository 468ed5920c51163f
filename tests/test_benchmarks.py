"""The ablation benchmark's bookkeeping: where runs live and how the report reads them (no training here)."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    """A benchmark script as a module (they are files, not a package)."""
    spec = importlib.util.spec_from_file_location(f"slct_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ablation():
    return _module("ablation")


def _args(**kw) -> argparse.Namespace:
    base = dict(resolution=64, holdout=10, steps=100, seeds=[0, 1, 2], weights=["rampup", "online"], n_eval=50,
                curve_n=20, curve_every=50, curves=["ilct", "slct"], note="fake runs", tag="", sets=[], archive=[])
    return argparse.Namespace(**{**base, **kw})


def _eval_json(path: Path, n: int, fds: dict[int, float]) -> None:
    results = [dict(nfe=nfe, fd=fd, precision=0.1 * nfe, recall=0.01 * nfe) for nfe, fd in fds.items()]
    path.write_text(json.dumps(dict(n=n, results=results)))


def test_runs_of_different_lengths_seeds_and_variants_live_apart(ablation, tmp_path):
    names = {ablation.run_dir(_args(steps=steps, tag=tag), tmp_path, "slct", seed).name
             for steps in (1000, 2000) for seed in (0, 1) for tag in ("", "paper")}
    assert len(names) == 8 and "slct-1000steps-seed0" in names and "slct-paper-2000steps-seed1" in names
    # METHOD@TAG names a variant's runs from any call (a report setting variants side by side)
    assert ablation.run_dir(_args(steps=500), tmp_path, "slct@budget", 2).name == "slct-budget-500steps-seed2"
    assert ablation.run_dir(_args(steps=500, tag="x"), tmp_path, "ilct@budget", 0).name == "ilct-budget-500steps-seed0"
    with pytest.raises(SystemExit, match="--tag budget"):  # never trained without its overrides
        ablation.stage_train(_args(steps=500), tmp_path, tmp_path, "slct@budget", 0)


def test_report_mean_sd_over_seeds_final_rows_apart_from_curves(ablation, tmp_path, monkeypatch):
    monkeypatch.setattr(ablation, "RESULTS", tmp_path / "results")
    a = _args()
    # 1-NFE FD per seed: ilct 300, 310, 320 (mean 310, sd 10); slct 250, 255, 260 (mean 255, sd 5)
    fds = {"ilct": [300.0, 310.0, 320.0], "slct": [250.0, 255.0, 260.0]}
    for method, per_seed in fds.items():
        for seed, fd in enumerate(per_seed):
            run = ablation.run_dir(a, tmp_path, method, seed)
            run.mkdir(parents=True)
            _eval_json(ablation.eval_file(run, 50, 20, "rampup"), 20, {1: 900.0 + seed})
            _eval_json(ablation.eval_file(run, 100, 20, "rampup"), 20, {1: fd + 50})
            _eval_json(ablation.eval_file(run, 100, 50, "rampup"), 50, {1: fd, 2: fd - 50})
            _eval_json(ablation.eval_file(run, 100, 50, "online"), 50, {1: fd + 100, 2: fd + 60})
            # 2 s/step for 50 steps, then 4 s/step for 50 steps: 300 s of training
            rows = [dict(step=50, sec_per_step=2.0), dict(step=100, sec_per_step=4.0)]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    ablation.stage_report(a, tmp_path, ["ilct", "slct"])

    stem = tmp_path / "results" / "ablation-utkface64-100steps"
    record = json.loads(stem.with_suffix(".json").read_text())
    assert len(record["final"]) == 2 * 3 * 2 * 2  # methods x seeds x weights x NFE
    assert all(r["n"] == 50 and r["step"] == 100 for r in record["final"])
    assert all(r["train_s"] == pytest.approx(300.0) for r in record["final"])
    # curve points (n = 20 at steps 50 and 100) plus the final-n point of the curve weights, kept apart
    assert sorted({(r["step"], r["n"]) for r in record["curves"]}) == [(50, 20), (100, 20), (100, 50)]
    pick = {(e["method"], e["weights"], e["nfe"]): e for e in record["summary"]}
    assert pick[("ilct", "rampup", 1)]["fd"] == pytest.approx(310.0)
    assert pick[("ilct", "rampup", 1)]["fd_sd"] == pytest.approx(10.0)
    assert pick[("slct", "rampup", 1)]["fd_sd"] == pytest.approx(5.0)
    assert pick[("slct", "online", 2)]["fd"] == pytest.approx(315.0) and pick[("slct", "online", 2)]["seeds"] == [0, 1, 2]
    (cmp,) = [c for c in record["comparisons"] if c["weights"] == "rampup"]
    # difference 55 > 2 x pooled sd = 2 x sqrt((100 + 25) / 2) = 15.8
    assert cmp["fd_difference"] == pytest.approx(55.0) and cmp["beats_by_2_pooled_sd"]
    assert cmp["pooled_sd"] == pytest.approx((125 / 2) ** 0.5)
    md = stem.with_suffix(".md").read_text()
    assert "| ilct | rampup | 1 | 310.0 +- 10.0 | 0.100 +- 0.000 | 0.0100 +- 0.0000 | 3 |" in md
    assert "beats by more than 2 pooled sd: **yes**" in md and "fake runs" in md
    assert (tmp_path / "results" / "ablation-utkface64-100steps-curves.png").stat().st_size > 0


def test_a_report_reads_runs_whose_folders_are_gone_from_the_archive(ablation, tmp_path, monkeypatch):
    """A wiped --work must not cost a study its finished runs: a committed report stands in for them (their rows
    come back as they were, they are not trained again) beside the runs trained since."""
    monkeypatch.setattr(ablation, "RESULTS", tmp_path / "results")
    a = _args(curves=["ilct"])
    for method, fd in (("ilct", 300.0), ("slct", 250.0)):
        for seed in a.seeds:
            run = ablation.run_dir(a, tmp_path, method, seed)
            run.mkdir(parents=True)
            _eval_json(ablation.eval_file(run, 50, 20, "rampup"), 20, {1: 900.0})
            for w in a.weights:
                _eval_json(ablation.eval_file(run, 100, 50, w), 50, {1: fd + seed, 2: fd - 10})
            (run / "metrics.jsonl").write_text(json.dumps(dict(step=100, sec_per_step=3.0)) + "\n")
    ablation.stage_report(a, tmp_path, ["ilct", "slct"])
    report = tmp_path / "results" / "ablation-utkface64-100steps.json"
    before = json.loads(report.read_text())
    archive = tmp_path / "archive.json"
    archive.write_text(report.read_text())

    import shutil

    shutil.rmtree(tmp_path / "runs")  # the wipe; then a new method trains
    run = ablation.run_dir(a, tmp_path, "ladder-ot", 0)
    run.mkdir(parents=True)
    for w in a.weights:
        _eval_json(ablation.eval_file(run, 100, 50, w), 50, {1: 280.0, 2: 270.0})
    b = _args(curves=["ilct"], archive=[str(archive)], seeds=[0])
    monkeypatch.setattr(ablation, "sh", lambda *args, **kw: pytest.fail(f"ran {args}"))
    ablation.run_stages(argparse.Namespace(**{**vars(b), "work": str(tmp_path), "stage": ["train", "eval"]}),
                        ["ilct", "slct"])  # archived: neither trained nor scored again
    assert not (tmp_path / "runs" / "ilct-100steps-seed0").exists()
    ablation.stage_report(_args(curves=["ilct"], archive=[str(archive)]), tmp_path, ["ilct", "slct", "ladder-ot"])
    after = json.loads(report.read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if k != "archived_in"} for r in rows]  # noqa: E731
    assert strip([r for r in after["final"] if r["method"] != "ladder-ot"]) == before["final"]
    assert strip(after["curves"]) == before["curves"]
    assert all(r["archived_in"] == str(archive) for r in after["final"] if r["method"] != "ladder-ot")
    pick = {(e["method"], e["weights"], e["nfe"]): e for e in after["summary"]}
    assert pick[("ilct", "rampup", 1)]["fd"] == pytest.approx(301.0) and pick[("ilct", "rampup", 1)]["seeds"] == [0, 1, 2]
    assert pick[("ladder-ot", "online", 2)]["fd"] == pytest.approx(270.0)
    md = report.with_suffix(".md").read_text()
    assert f"read from {archive}: ilct, slct" in md
    # a variant's runs by either name (a --tag call names them plainly); not the plain runs of the same method
    tagged = _args(tag="budget", archive=[str(archive)])
    (tmp_path / "results" / "tagged.json").write_text(json.dumps(
        {**after, "meta": {**after["meta"], "settings": {**after["meta"]["settings"], "tag": "budget"}}}))
    from_tagged = _args(archive=[str(tmp_path / "results" / "tagged.json")])
    assert ablation.archived(tagged, "ilct", 0) == ([], []) and ablation.archived(tagged, "ilct@budget", 0) == ([], [])
    assert ablation.archived(from_tagged, "ilct", 0) == ([], [])
    assert ablation.archived(from_tagged, "ilct@budget", 0)[0]
    assert ablation.archived(_args(tag="budget", archive=from_tagged.archive), "ilct", 0)[0]
    # an archive of another length is not read
    assert ablation.archived(_args(steps=200, archive=[str(archive)]), "ilct", 0) == ([], [])


def test_curves_figure_gives_every_method_its_own_colour(ablation, tmp_path, monkeypatch):
    # the leaderboard draws more than the default cycle's 10 colours
    import matplotlib.axes
    import matplotlib.colors

    drawn = {}
    real = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, *args, **kw):
        drawn[kw["label"].split(" ")[0]] = matplotlib.colors.to_rgba(kw["color"])  # "C10" is "C0"
        return real(self, x, y, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    curves = [dict(method=f"m{i:02d}", nfe=1, n=50, step=step, fd=100.0 + i + step / 100)
              for i in range(14) for step in (500, 1000)]
    ablation.figure_curves(curves, tmp_path / "curves.png")
    assert len(drawn) == 14 and len(set(drawn.values())) == 14
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_no_verdict_from_fewer_than_three_seeds(ablation):
    """Two seeds a side give the difference and the pooled sd but no yes/no: one or two seeds are an anecdote."""
    def entry(method, fds):
        fd, sd = ablation.mean_sd(fds)
        return dict(method=method, weights="rampup", nfe=1, seeds=list(range(len(fds))), fd=fd, fd_sd=sd)

    (two,) = ablation.compare([entry("slct", [100.0, 102.0]), entry("ilct", [200.0, 202.0])])
    assert two["fd_difference"] == pytest.approx(100.0) and two["beats_by_2_pooled_sd"] is None
    (three,) = ablation.compare([entry("slct", [100.0, 102.0, 101.0]), entry("ilct", [200.0, 202.0, 201.0])])
    assert three["beats_by_2_pooled_sd"] is True


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


def test_compare_report_puts_every_method_against_slct_and_the_speed_target(tmp_path, monkeypatch):
    compare = _module("compare")
    monkeypatch.setattr(compare.ablation, "RESULTS", tmp_path / "results")
    a = _args(curves=[])
    fds = {"slct": [250.0, 255.0, 260.0], "meanflow": [200.0, 202.0, 204.0], "shortcut": [240.0, 260.0, 280.0]}
    for method, per_seed in fds.items():
        for seed, fd in enumerate(per_seed):
            run = compare.ablation.run_dir(a, tmp_path, method, seed)
            run.mkdir(parents=True)
            for w in a.weights:
                _eval_json(compare.ablation.eval_file(run, 100, 50, w), 50, {1: fd, 2: fd - 20})
            (run / "metrics.jsonl").write_text(json.dumps(dict(step=100, sec_per_step=1.0)) + "\n")
    (tmp_path / "results").mkdir()
    rows = [dict(method=m, network="unet-small", batch=64, sec_per_step=s, images_per_s=64 / s, peak_mem_gib=1.0,
                 peak_kind="process RSS", step_gflop=10.0) for m, s in (("slct", 1.0), ("meanflow", 1.3),
                                                                          ("shortcut", 0.9))]
    (tmp_path / "results" / "compare-speed-cpu.json").write_text(json.dumps(dict(rows=rows, command="x", steps=16,
                                                                                 batch=64)))
    monkeypatch.setattr(sys, "argv", ["compare.py", "--stage", "report", "--work", str(tmp_path), "--steps", "100",
                                      "--seeds", "0", "1", "2", "--methods", "slct", "meanflow", "shortcut",
                                      "--n-eval", "50", "--curves"])
    compare.main()
    text = (tmp_path / "results" / "compare-utkface64-100steps.md").read_text()
    assert "# Few-step objectives on UTKFace 64 px" in text and "Command: `python benchmarks/compare.py " in text
    # meanflow 202 +- 2 vs slct 255 +- 5: beats by more than 2 pooled sd; shortcut 260 +- 20 does not
    assert ("meanflow vs slct (rampup weights, 1 NFE): mean FD difference 53.0 (slct minus meanflow; positive: "
            "meanflow is lower)") in text and "**yes**" in text
    assert "shortcut vs slct (rampup weights, 1 NFE)" in text and "**no**" in text
    assert "meanflow vs slct (rampup weights, 2 NFE): mean FD difference 53.0" in text  # and at 2 NFE
    assert "| meanflow | 1300 | 1.30x |" in text
    assert "MeanFlow step / sLCT step: 1.30x (target <= 1.6x): **met**" in text


def test_study_runs_each_run_once_and_every_command_parses(ablation):
    """benchmarks/study.py (issue 13's study in slices): every run is one ablation.py call its parser takes, no run
    is in both lanes or twice, and the reports name every method they compare."""
    study = _module("study")
    p = ablation.parser()
    runs = []
    for lane in study.lanes():
        for args in lane:
            a = p.parse_args(["--work", "/w", *args])
            assert len(a.methods) == 1 and len(a.seeds) == 1 and a.stage == ["train", "eval"]
            ablation.check(p, a)  # as ablation.py's main does: overrides only under their variant's name
            assert bool(a.sets) == bool(a.tag)
            runs.append(ablation.run_dir(a, Path("/w"), a.methods[0], a.seeds[0]).name)
    assert len(runs) == len(set(runs))
    expected = {f"{m}-budget-2000steps-seed{s}" for m in ("ilct", "slct", "slct-calibrated-c", "ldm")
                for s in (0, 1, 2)}
    expected |= {f"{m}-{v}-2000steps-seed{s}" for m in ("ilct", "slct") for v in ("authors", "budget-n81")
                 for s in (0, 1, 2)}
    expected |= {f"{m}-budget-500steps-seed{s}" for m in study.RUNGS for s in (0, 1, 2)}
    assert set(runs) == expected
    from slct.config import ObjectiveConfig, OptimConfig, load_config

    pinned = load_config("slct", "utkface64", sets=study.AUTHORS[3::2])  # the paper's values, the dataclass defaults
    assert pinned.objective.s1 == ObjectiveConfig().s1 == 640
    # one table of settings for both studies (benchmarks/common.py), so UTKFace's and the demo's variants agree
    common = _module("common")
    assert study.AUTHORS[3::2] == common.overrides("authors") == _module("digits").VARIANTS["authors"]
    tagged = [p.parse_args(["--work", "/w", *args]) for lane in study.lanes() for args in lane]
    for tag in ("authors", "budget", "budget-n81"):
        assert {tuple(a.sets) for a in tagged if a.tag == tag} == {tuple(common.overrides(tag))}
    assert pinned.objective.min_stage_steps == ObjectiveConfig().min_stage_steps == 0
    assert (pinned.optim.decoupled_weight_decay, pinned.optim.decay_norms_and_biases) == (
        OptimConfig().decoupled_weight_decay, OptimConfig().decay_norms_and_biases) == (False, True)
    lane_a, lane_b = study.lanes()
    assert abs(len(lane_a) - len(lane_b)) <= 1
    at2000, at500 = (p.parse_args(args) for args in study.reports("/w"))
    assert at2000.stem == "ablation-utkface64-2000steps-3seeds"  # the single-seed 2,000-step report stays
    assert at500.stem is None and at500.steps == 500  # the 500-step report grows the rungs
    assert "0.999" in at500.weights  # and keeps the fixed-EMA rows the README's first table shows
    assert "min_stage_steps=125" in at500.note and "weight decay only" in at2000.note  # how the runs were made
    for args in study.reports("/w"):
        a = p.parse_args(args)
        assert a.stage == ["report"] and a.seeds == [0, 1, 2]
        for pair in a.compare:
            assert set(pair.split(":")) <= set(a.methods), pair
        assert set(a.curves) <= set(a.methods)


def test_ctrl_c_lets_a_training_run_write_its_checkpoint(tmp_path):
    """Stopping ablation.py / study.py with Ctrl-C must not kill the `slct train` under it before it has written its
    checkpoint (subprocess.run kills its child on KeyboardInterrupt: a stopped slice lost its steps that way)."""
    import os
    import signal
    import subprocess
    import time

    child = ("import signal, sys, time, pathlib\n"
             "def stop(*_):\n"
             "    time.sleep(1.0)  # a checkpoint takes a while to write\n"
             f"    pathlib.Path({str(tmp_path / 'checkpoint')!r}).write_text('saved')\n"
             "    sys.exit(130)\n"
             "signal.signal(signal.SIGINT, stop)\n"
             f"pathlib.Path({str(tmp_path / 'ready')!r}).write_text('')\n"
             # short sleeps, not one sleep(60): a SIGINT landing between Python's last signal check and the sleep's
             # syscall waits for the sleep to end (CI once saw exactly that: a 60 s hang); a training step is short
             "for _ in range(1200):\n"
             "    time.sleep(0.05)\n")
    # a Python started from a background job inherits SIGINT ignored (no KeyboardInterrupt): restore a terminal's
    parent = (f"import importlib.util, signal, sys\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              f"spec = importlib.util.spec_from_file_location('a', {str(BENCHMARKS / 'ablation.py')!r})\n"
              "a = importlib.util.module_from_spec(spec); spec.loader.exec_module(a)\n"
              f"a.sh([sys.executable, '-c', {child!r}])\n")
    proc = subprocess.Popen([sys.executable, "-c", parent], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "ready").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: parent and child get SIGINT
    _, err = proc.communicate(timeout=60)
    assert "KeyboardInterrupt" in err  # the parent stops too...
    assert (tmp_path / "checkpoint").read_text() == "saved"  # ...after its child has finished its own stop


def test_digits_preset_study_commands_parse_and_the_report_gives_verdicts_from_3_seeds(tmp_path, monkeypatch):
    """benchmarks/digits.py: each run is an `slct demo` command the CLI takes with every override valid, and the
    report's mean +- sd and verdicts come from the runs' own scores (fake scores here, no training)."""
    from slct.cli import build_parser
    from slct.config import load_config

    digits = _module("digits")
    monkeypatch.setattr(digits, "RESULTS", tmp_path / "results")
    a = digits.parser().parse_args(["--work", str(tmp_path), "--steps", "100", "--stage", "report"])
    for variant in digits.VARIANTS:
        args = build_parser().parse_args(digits.demo_args(a, "slct", variant, 2))
        assert args.steps == 100 and args.seed == 2 and args.preset == "slct"
        cfg = load_config("slct", "digits", sets=args.sets)  # strict: a mistyped key would raise here
        assert (cfg.objective.s1 == 80) == (variant == "budget-n81")
        assert cfg.optim.decoupled_weight_decay == (variant != "authors")  # spelled out, whatever the preset holds
    fds = {("slct", "authors"): [5.0, 6.0, 7.0], ("slct", "budget"): [2.0, 2.1, 1.9],
           ("slct", "budget-n81"): [4.0, 8.0]}  # budget: lower by 4 against 2 pooled sd 1.4; n81: 2 seeds
    for (method, variant), values in fds.items():
        for seed, fd in enumerate(values):
            out = digits.run_dir(tmp_path, method, variant, 100, seed)
            out.mkdir(parents=True)
            (out / "demo-scores.json").write_text(json.dumps(dict(n=10, fd_noise_baseline=6.5, fd_nfe1=fd,
                                                                  fd_nfe2=fd / 2)))
    a.methods = ["slct"]
    text = digits.stage_report(a).read_text()
    assert "| slct | authors | 6.00 +- 1.00 | 3.00 +- 0.50 | 6.50 | 3 |" in text
    assert "slct budget vs authors (1 NFE): mean FD difference 4.00" in text and "**yes**" in text
    assert "slct budget-n81 vs authors (1 NFE)" in text and "not decided (fewer than 3 seeds)" in text
    saved = json.loads((tmp_path / "results" / "digits-presets.json").read_text())
    assert len(saved["runs"]) == 8 and "optim.decoupled_weight_decay=false" in saved["meta"]["variants"]["authors"]
    # a new machine, no run folders: the committed report is kept, not replaced by an empty one
    a.work = str(tmp_path / "elsewhere")
    with pytest.raises(SystemExit, match="is kept"):
        digits.stage_report(a)
    assert json.loads((tmp_path / "results" / "digits-presets.json").read_text()) == saved


def test_leaderboard_commands_parse_and_count_the_teacher_in_the_budget(tmp_path, capsys):
    """benchmarks/leaderboard.py: every command is one the CLI takes with a strict config; the teacher is the ldm
    run's snapshot at the teacher's step and its steps count in the budget of the entries that use it; the report
    judges against ldm from 3 seeds and checks the curve from the middle step to the end."""
    from slct.cli import build_parser
    from slct.commands.train import resolve

    board = _module("leaderboard")
    a = board.parser().parse_args(["--work", str(tmp_path), "--budget", "100", "--teacher-steps", "60"])
    plan = board.Plan(tmp_path, 100, 60, a.seeds)
    todo = board.tasks(plan, a, tmp_path / "data", tmp_path / "ref.npz")
    assert todo[0].what == "ldm seed 0" and plan.teacher(0) == plan.run("ldm", 0) / "snapshot-00000060.pt"
    for task in todo:
        ns = build_parser().parse_args(task.args)
        if task.args[0] == "train":
            cfg = resolve(ns)  # strict: a mistyped key would raise here
            tuned = "--init" in task.args or "--teacher" in task.args
            assert cfg.train.total_steps == (40 if tuned else 100), task.what
            if task.what.startswith("ldm seed"):  # writes the teacher's step and the middle one
                assert 60 % cfg.checkpoint.snapshot_every_steps == 0 and 50 % cfg.checkpoint.snapshot_every_steps == 0
            assert task.needs == ((plan.teacher(int(task.what[-1])),) if tuned else ())
    tuned = next(t for t in todo if t.what == "ilct-tuned seed 0")
    assert tuned.args[tuned.args.index("--init") + 1] == str(plan.teacher(0)) and "--teacher" not in tuned.args
    cd_init = next(t for t in todo if t.what == "ilcd-init seed 0").args  # distilled, the student starts as the teacher
    assert cd_init[cd_init.index("--init") + 1] == cd_init[cd_init.index("--teacher") + 1] == str(plan.teacher(0))
    whats = [t.what for t in todo]
    more = next(t for t in todo if t.what == "soflow seed 0: eval at 4, 8 NFE")  # beyond the run's own NFE
    assert more.args[-3:] == ["--nfe", "4", "8"] and more.done.name == "eval-final-n1000-nfe4-nfe8.json"
    ode = next(t for t in todo if t.what == "soflow seed 0: eval with Heun at 2, 4, 8, 17, 35 NFE")  # its velocity ODE
    assert ode.args[-2:] == ["--solver", "heun"] and ode.done.name.endswith("-nfe35-heun.json")
    euler = next(t for t in todo if t.what == "fm-tuned seed 0: eval with Euler at 2, 3, 4, 5 NFE")  # fm's best few
    assert euler.args[-7:] == ["--nfe", "2", "3", "4", "5", "--solver", "euler"]
    assert euler.done == plan.run("fm-tuned", 0) / "eval-final-n1000-nfe2-nfe3-nfe4-nfe5-euler.json"
    curve = next(t for t in todo if t.what == "fm seed 0: eval at 3, 5, 9, 17 NFE")  # the baselines' NFE curves
    assert curve.args[-5:] == ["--nfe", "3", "5", "9", "17"]
    assert "slct seed 0: eval at step 50" in whats and not any(w.startswith("ilcd seed 0: eval at") for w in whats)
    assert "ldm seed 0: eval at step 60" in whats  # the teacher itself
    # a teacher-only ldm run when ldm itself is not on the board: trained, never scored
    a2 = board.parser().parse_args(["--work", str(tmp_path), "--entries", "ilcd", "--seeds", "0", "--archive"])
    assert [t.what for t in board.tasks(board.Plan(tmp_path, 2000, 1500, [0]), a2, tmp_path, tmp_path)] == [
        "ldm seed 0", "ilcd seed 0", "ilcd seed 0: eval"]  # (a teacher run not on the board is not scored)
    old = tmp_path / "teacher.json"  # an archived teacher is still trained when a student to train needs it
    old.write_text(json.dumps({"runs": [dict(entry="ldm", seed=0, nfe=35, step=2000, final=True, fd=1.0,
                                             own_steps=2000)]}))
    a2.archive, a2.entries = [str(old)], ["ldm", "ilcd"]
    assert [t.what for t in board.tasks(board.Plan(tmp_path, 2000, 1500, [0]), a2, tmp_path, tmp_path)][:2] == [
        "ldm seed 0", "ldm seed 0: eval"]
    a2.entries = ["ldm"]  # ... and not when no student needs it
    assert board.tasks(board.Plan(tmp_path, 2000, 1500, [0]), a2, tmp_path, tmp_path) == []
    # --seed-first: every entry's seed 0 (with its evaluations) before any seed 1; the teacher still first
    a3 = board.parser().parse_args(["--work", str(tmp_path), "--entries", "ilct", "ilcd", "--seeds", "0", "1",
                                    "--seed-first", "--archive"])
    assert [t.what for t in board.tasks(board.Plan(tmp_path, 2000, 1500, [0, 1]), a3, tmp_path, tmp_path)
            if ":" not in t.what] == ["ldm seed 0", "ilct seed 0", "ilcd seed 0", "ldm seed 1", "ilct seed 1",
                                      "ilcd seed 1"]
    # no comparison of a missing entry or solver ("NAME@SOLVER": one of the entry's ODE rows)
    assert all(name.split("@")[0] in board.ENTRIES for pair in board.PAIRS for name in pair)
    assert all(name.split("@")[1] in dict(board.ENTRIES[name.split("@")[0]].ode)
               for pair in board.PAIRS for name in pair if "@" in name)
    # a report from fake evaluations: ldm at 35 NFE, ilct-tuned at 1 and 2 NFE, slct from scratch; 3 seeds each
    for seed, (fd_ldm, fd_tuned) in enumerate([(100.0, 80.0), (101.0, 81.0), (99.0, 79.0)]):
        for name, results in (("ldm", [dict(nfe=35, fd=fd_ldm)]),
                              ("ilct-tuned", [dict(nfe=1, fd=fd_tuned), dict(nfe=2, fd=fd_tuned + 50)]),
                              ("slct", [dict(nfe=1, fd=150.0 + seed)]), ("ilct", [dict(nfe=1, fd=160.0 + seed)])):
            run = plan.run(name, seed)
            run.mkdir(parents=True)
            (run / f"eval-final-n{a.n_eval}.json").write_text(json.dumps({"results": results}))
        soflow = plan.run("soflow", seed)
        soflow.mkdir(parents=True)
        (soflow / f"eval-final-n{a.n_eval}.json").write_text(json.dumps({"results": [dict(nfe=1, fd=90.0)]}))
        (soflow / f"eval-final-n{a.n_eval}-nfe4-nfe8.json").write_text(
            json.dumps({"results": [dict(nfe=4, fd=95.0 + seed)]}))
        (plan.run("slct", seed) / f"eval-step00000050-n{a.n_eval}.json").write_text(
            json.dumps({"results": [dict(nfe=1, fd=140.0 + seed)]}))
        (plan.run("ldm", seed) / f"eval-step00000060-n{a.n_eval}.json").write_text(
            json.dumps({"results": [dict(nfe=35, fd=120.0 + seed)]}))
        stage = [dict(stage_n_scales=11, grad_norm_median=1.0 + seed, adam_step_rms_max=0.5),
                 dict(stage_n_scales=21, grad_norm_median=4.0, adam_step_rms_max=0.2 * (seed + 1))]
        (plan.run("slct", seed) / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in [dict(step=25, loss=1.0), *stage]))
    # an entry trained on a machine that is gone: reported from the archived report's rows
    archive = tmp_path / "old.json"
    archive.write_text(json.dumps({"runs": [dict(entry="shortcut", seed=s, nfe=1, step=100, final=True, fd=130.0 + s,
                                                 precision=0.5, recall=0.1, own_steps=100, teacher_steps=0,
                                                 images=6400, sec_per_step=0.5) for s in range(3)],
                                   "stages": []}))
    a.archive = [str(archive)]
    a.entries = ["ldm", "ilct-tuned", "slct", "ilct", "soflow", "shortcut"]
    whats = [t.what for t in board.tasks(plan, a, tmp_path, tmp_path)]  # archived: not trained again
    assert "slct seed 0" in whats and not any(w.startswith("shortcut") for w in whats)
    md = board.report(plan, a, tmp_path / "results").read_text()
    assert "| shortcut | 1 | 131.0 +- 1.0 |" in md
    assert "| ilct-tuned | 1 | 80.0 +- 1.0 |" in md and "| 40 + 60 | 6,400 |" in md
    assert "ilct-tuned at 1 NFE vs ldm at 35: FD lower by 20.0 (2 pooled sd 2.0): beats it by more than 2 pooled " \
           "sd: **yes**" in md
    assert "ilct-tuned at 2 NFE vs ldm at 35: FD lower by -30.0" in md and "**no**" in md
    assert "at the bar's FD" not in md  # every fake row is clearly better or worse: no tie
    ties = board.verdicts([dict(entry="ldm", nfe=35, final=True, fd=100.0, fd_sd=4.0, seeds=[0, 1, 2]),
                           dict(entry="ilct", nfe=1, final=True, fd=104.0, fd_sd=4.0, seeds=[0, 1, 2])])
    assert (ties[0]["beats_ldm_by_2_pooled_sd"], ties[0]["worse_than_ldm_by_2_pooled_sd"]) == (False, False)
    # the bar is the best baseline row at <= 35 NFE on 3 seeds (fm at 17 here), not ldm's own 35 NFE; one seed of a
    # baseline does not make it the bar
    rows = [dict(entry="ldm", nfe=35, final=True, fd=100.0, fd_sd=1.0, seeds=[0, 1, 2]),
            dict(entry="fm", nfe=17, final=True, fd=90.0, fd_sd=1.0, seeds=[0, 1, 2]),
            dict(entry="fm", nfe=35, final=True, fd=91.0, fd_sd=1.0, seeds=[0, 1, 2]),
            dict(entry="ldm-edm", nfe=35, final=True, fd=50.0, fd_sd=0.0, seeds=[0]),
            dict(entry="soflow", nfe=2, final=True, fd=95.0, fd_sd=1.0, seeds=[0, 1, 2])]
    judged = {(v["entry"], v["nfe"]): v for v in board.verdicts(rows)}
    assert judged[("soflow", 2)]["bar"] == "fm" and judged[("soflow", 2)]["ldm_nfe"] == 17
    assert judged[("soflow", 2)]["worse_than_ldm_by_2_pooled_sd"] and judged[("ldm", 35)]["bar"] == "fm"
    assert ("fm", 35) not in judged  # the bar's own curve is not judged against itself
    # ldm's 100 is reached by the bar's curve at its fewest NFE scored (17): the report says "the fewest scored"
    assert (judged[("ldm", 35)]["ldm_nfe_matched"], judged[("ldm", 35)]["bar_nfe_fewest"]) == (17, 17)
    assert board.two_sd(ties[0]) == "2 pooled sd 8.0" and board.two_sd(dict(seeds=1, pooled_sd=0.0)) == \
        "one seed: no sd"  # a one-seed row has no spread to quote
    assert "| slct | 1 | 141.0 | 151.0 | +10.0 | 1.0 | **yes** |" in md  # rose by 10 against an sd of 1
    assert "| slct | 1 | 151.0 +- 1.0 |" in md
    assert "| soflow | 1 | 90.0 +- 0.0 |" in md and "| soflow | 4 | 96.0 +- 1.0 |" in md  # the extra NFE's file
    assert "The teacher itself (ldm at step 60, 35 NFE): FD 121.0 +- 1.0 (3 seeds)" in md
    # the questions between entries (board.PAIRS): only pairs with both sides scored
    assert "- slct vs ilct at 1 NFE: FD lower by 10.0 (2 pooled sd 2.0): lower by more than 2 pooled sd: **yes**" in md
    assert "slct vs slct-no-remedies" not in md
    # the per-stage diagnostics, averaged over seeds
    assert "| slct | 11 | 2 | 0.50 | 3 |" in md and "| slct | 21 | 4 | 0.40 | 3 |" in md
    assert (tmp_path / "results" / "leaderboard-utkface64-100steps-curves.png").stat().st_size > 0


def test_leaderboard_step_times_are_averaged_per_machine_never_across_machines():
    """Seeds timed on different CPUs (an archived report's and this machine's) keep their own s/step: averaging an
    Intel 0.65 with two AMD 0.88 would describe neither machine. Rows without a machine are "an earlier machine"."""
    board = _module("leaderboard")
    rows = [dict(entry="soflow", nfe=2, step=100, final=True, seed=0, fd=1.0, precision=None, recall=None,
                 own_steps=100, teacher_steps=0, images=6400, sec_per_step=0.65, trained_on="Intel Xeon, 2026-12-07"),
            *[dict(entry="soflow", nfe=2, step=100, final=True, seed=s, fd=1.0, precision=None, recall=None,
                   own_steps=100, teacher_steps=0, images=6400, sec_per_step=v, trained_on="AMD EPYC, 2026-12-03")
              for s, v in ((1, 0.87), (2, 0.89))],
            dict(entry="ldm", nfe=35, step=100, final=True, seed=0, fd=1.0, precision=None, recall=None,
                 own_steps=100, teacher_steps=0, images=6400, sec_per_step=0.4)]
    soflow, ldm = board.summarize(rows)
    assert soflow["sec_per_step_by_machine"]["Intel Xeon"] == [0.65, 0.0, 1]
    m, sd, n = soflow["sec_per_step_by_machine"]["AMD EPYC"]
    assert (round(m, 6), n) == (0.88, 2) and sd == pytest.approx(0.0141421, abs=1e-6)
    assert soflow["sec_per_step"] == pytest.approx(0.88)  # one number: the CPU that timed the most seeds
    tags = board.machine_tags([soflow, ldm])
    assert tags == {"Intel Xeon": "I", "AMD EPYC": "A", "an earlier machine": "3"}  # "a" is taken: a number
    assert board.seconds_cell(soflow, tags) == "0.65 (I) / 0.88 +- 0.01 (A)"
    assert board.seconds_cell(ldm, tags) == "0.40 (3)"
    assert board.seconds_cell(ldm, {"an earlier machine": "a"}) == "0.40"  # one machine in the table: no tag
    assert board.seconds_cell(dict(seeds=[0]), tags) == "-"


def test_leaderboard_step_time_of_a_run_ignores_a_paused_window(tmp_path):
    """A run's s/step is the median of its logging windows: one window that held a 30 s pause (SIGSTOP for a CI
    check, a stop and resume) must not move it, as it moved the mean (1.26 vs 0.97 s/step on a real 8,000-step run)."""
    board = _module("leaderboard")
    assert board.seconds_per_step(tmp_path) is None  # no metrics yet: no time, not zero
    windows = [1.0, 1.1, 0.9, 30.0, 1.0]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(dict(step=25 * (i + 1), sec_per_step=v)) + "\n"
                                                    for i, v in enumerate(windows))
                                            + json.dumps(dict(step=125, fd=50.0)) + "\n")  # a row without timing
    assert board.seconds_per_step(tmp_path) == 1.0


def test_leaderboard_sample_grid_grows_with_the_snapshots_here_and_never_shrinks(tmp_path, monkeypatch):
    """A board filled in over sessions: its grid is redrawn when this machine has more entries' snapshots than the
    committed grid shows (or all of them), never replaced by one with fewer (a new machine with part of the runs)."""
    board = _module("leaderboard")
    drawn = []
    monkeypatch.setattr(board.ablation, "snapshot_grids",
                        lambda named, ema, out: (drawn.append([n for n, _ in named]), out.write_bytes(b"jpg")))
    monkeypatch.setattr(board.ablation, "figure_curves", lambda curves, out: None)
    plan = board.Plan(tmp_path, 100, 60, [0])
    a = board.parser().parse_args(["--work", str(tmp_path), "--entries", "fm-tuned", "soflow", "shortcut"])
    results = tmp_path / "results"
    results.mkdir()

    def train(name):
        plan.run(name, 0).mkdir(parents=True, exist_ok=True)
        (plan.run(name, 0) / f"snapshot-{plan.own_steps(name):08d}.pt").write_bytes(b"")

    assert board.figures(plan, a, [], results, "b", []) == [] and drawn == []  # nothing to draw
    train("fm-tuned")
    assert board.figures(plan, a, [], results, "b", []) == ["fm-tuned"]  # the first grid, partial
    train("soflow")
    assert board.figures(plan, a, [], results, "b", ["fm-tuned"]) == ["fm-tuned", "soflow"]  # one more entry
    # a committed grid of all three (an older machine's) is kept while this one has two of them
    assert board.figures(plan, a, [], results, "b", ["fm-tuned", "soflow", "shortcut"]) == [
        "fm-tuned", "soflow", "shortcut"]
    assert board.figures(plan, a, [], results, "b", ["shortcut"]) == ["shortcut"]  # two others: not more of them
    train("shortcut")
    assert board.figures(plan, a, [], results, "b", ["fm-tuned", "soflow", "shortcut"]) == [
        "fm-tuned", "soflow", "shortcut"]  # every entry here: redrawn from this machine's runs
    assert drawn == [["fm-tuned"], ["fm-tuned", "soflow"], ["fm-tuned", "soflow", "shortcut"]]


def test_leaderboard_scheduler_runs_side_by_side_after_what_each_needs(tmp_path, monkeypatch):
    """run_tasks: a task starts once its needs exist, never more than --jobs at once; a failed task's dependents
    never start and are counted."""
    board = _module("leaderboard")
    log = tmp_path / "order.txt"
    script = ("import sys, time, pathlib; out = pathlib.Path(sys.argv[1]); time.sleep(float(sys.argv[2])); "
              "open(sys.argv[3], 'a').write(out.name + '\\n'); out.write_text('x') if sys.argv[4] == 'ok' else "
              "sys.exit(1)")
    monkeypatch.setattr(board.ablation, "slct", lambda *args: [sys.executable, "-c", script, *args])
    a, b, c, d = (tmp_path / n for n in "abcd")
    todo = [board.Task("a", a, [str(a), "0.5", str(log), "ok"]),
            board.Task("c", c, [str(c), "0", str(log), "ok"], needs=(a,)),
            board.Task("b", b, [str(b), "0", str(log), "fail"]),
            board.Task("d", d, [str(d), "0", str(log), "ok"], needs=(b,))]
    assert board.run_tasks(todo, jobs=2, threads=1) == 2  # b failed, d could not start
    assert log.read_text().split() == ["b", "a", "c"] and not d.exists()
    assert board.run_tasks(todo[:2], jobs=2, threads=1) == 0  # all done: nothing runs again
    assert log.read_text().split() == ["b", "a", "c"]
    # a task whose result appears while it waits (another board sharing the run made it) does not run again
    e, f = tmp_path / "e", tmp_path / "f"
    todo = [board.Task("f", f, [str(f), "0.3", str(log), "ok"]),
            board.Task("e", f, [str(e), "0", str(log), "ok"], needs=(f,))]
    assert board.run_tasks(todo, jobs=1, threads=1) == 0
    assert log.read_text().split() == ["b", "a", "c", "f"] and not e.exists()


def test_leaderboard_wall_clock_matching_gives_each_entry_the_seconds_of_ldms_budget(tmp_path, monkeypatch):
    """--match seconds: own steps = (budget - teacher's steps if it uses the teacher) x ldm's s/step / its s/step,
    in its own folder and report; every entry needs a measured s/step."""
    board = _module("leaderboard")
    seconds = {"ldm": 0.5, "soflow": 1.0, "ilct-tuned": 0.25}
    plan = board.Plan(tmp_path, 2000, 1500, [0], seconds)
    assert (plan.own_steps("ldm"), plan.own_steps("soflow"), plan.own_steps("ilct-tuned")) == (2000, 1000, 1000)
    assert plan.root.name == "leaderboard-2000steps-seconds" and plan.stem.endswith("-seconds")
    assert board.Plan(tmp_path, 2000, 1500, [0]).own_steps("soflow") == 2000  # image-matched
    a = board.parser().parse_args(["--work", str(tmp_path), "--match", "seconds", "--entries", "soflow"])
    todo = board.tasks(plan, a, tmp_path / "data", tmp_path / "ref.npz")
    assert todo[0].args[todo[0].args.index("--steps") + 1] == "1000" and "-seconds" in str(todo[0].done)
    assert plan.run("ldm", 0) == tmp_path / "leaderboard-2000steps" / "ldm-seed0"  # as many steps: the same run
    # the baselines are the clock: their image-matched runs, whatever their own step time
    assert board.Plan(tmp_path, 2000, 1500, [0], {**seconds, "fm-tuned": 0.6}).own_steps("fm-tuned") == 2000
    assert plan.run("fm-tuned", 0) == tmp_path / "sweep-2000steps" / "fm-lr0.002-b0.999-do0-seed0"
    monkeypatch.setattr(board.ablation, "RESULTS", tmp_path)
    a = board.parser().parse_args(["--budget", "123", "--match", "seconds"])
    with pytest.raises(SystemExit, match="needs step times"):
        board.measured_seconds(a)
    (tmp_path / "compute-utkface64.json").write_text(json.dumps({"rows": [
        dict(entry="ldm", sec_per_step=0.7), dict(entry="soflow", sec_per_step=0.8)]}))
    a = board.parser().parse_args(["--match", "seconds", "--entries", "soflow"])
    assert board.measured_seconds(a) == {"ldm": 0.7, "soflow": 0.8}
    a = board.parser().parse_args(["--match", "seconds", "--entries", "soflow", "fm-tuned"])  # a baseline: no time
    assert board.measured_seconds(a) == {"ldm": 0.7, "soflow": 0.8}
    a = board.parser().parse_args(["--match", "seconds", "--entries", "shortcut"])
    with pytest.raises(SystemExit, match="no measured s/step for shortcut"):
        board.measured_seconds(a)
    # the wall-clock board reads gone runs from the image-matched report too, but only runs of its own length: the
    # baseline's 2,000 steps are its run, SoFlow's 2,000-step run is not its 1,000-step one
    (tmp_path / "leaderboard-utkface64-2000steps.json").write_text(json.dumps({"runs": [
        dict(entry=e, seed=0, nfe=n, step=2000, final=True, fd=f, own_steps=2000, teacher_steps=0)
        for e, n, f in (("ldm", 35, 100.0), ("soflow", 2, 80.0))]}))
    a = board.parser().parse_args(["--work", str(tmp_path / "gone"), "--match", "seconds", "--entries", "ldm",
                                   "soflow", "--seeds", "0"])
    rows = board.collect(board.Plan(tmp_path / "gone", 2000, 1500, [0], seconds), a)
    assert [(r["entry"], r["fd"]) for r in rows] == [("ldm", 100.0)]


def test_digits_board_trains_scores_and_judges_against_the_best_baseline(tmp_path, monkeypatch):
    """benchmarks/digits_board.py: each entry trained on the digits preset, scored as the demo scores itself at its
    NFE; the bar is the best many-step baseline row at <= 35 NFE; one seed gives no verdict."""
    board = _module("digits_board")
    monkeypatch.setattr(board.ablation, "RESULTS", tmp_path)
    board.main(["--work", str(tmp_path / "runs"), "--steps", "3", "--seeds", "0", "--n-eval", "40",
                "--entries", "fm", "soflow"])
    data = json.loads((tmp_path / "digits-board-3steps.json").read_text())
    rows = {(s["entry"], s["nfe"]) for s in data["summary"]}
    assert rows == {("fm", k) for k in (2, 5, 9, 17, 35)} | {("soflow", k) for k in (1, 2, 4)}
    assert data["bar"]["entry"] == "fm" and all(v["beats"] is None for v in data["verdicts"])
    assert "not decided (fewer than 3 seeds a side)" in (tmp_path / "digits-board-3steps.md").read_text()
    # a new machine, no run folders: the committed report is kept, not replaced by an empty one
    before = (tmp_path / "digits-board-3steps.json").read_text()
    with pytest.raises(SystemExit, match="is kept"):
        board.main(["--work", str(tmp_path / "elsewhere"), "--steps", "3", "--stage", "report"])
    assert (tmp_path / "digits-board-3steps.json").read_text() == before


def test_premise_plans_every_strength_and_judges_slct_against_ilct_per_strength(tmp_path, monkeypatch):
    """benchmarks/premise.py: the outlier codec's strengths as data sets (plain = the leaderboard's latents and
    runs), iLCT and sLCT first, every command strict; the report compares sLCT with iLCT at each strength."""
    from slct.cli import build_parser
    from slct.commands.train import resolve

    premise = _module("premise")
    monkeypatch.setattr(premise.ablation, "RESULTS", tmp_path)
    a = premise.parser().parse_args(["--work", str(tmp_path), "--steps", "100", "--strengths", "1", "spike:10"])
    assert premise.encode_args(a, "spike:10")[-2:] == ["--outliers", "spike:10"]
    assert premise.data_dir(a, "1") == tmp_path / "utk64-train"  # the leaderboard's latents
    todo = premise.tasks(a, tmp_path / "ref.npz")
    assert [t.what for t in todo[:8:2]] == ["ilct at 1 seed 0", "ilct at spike:10 seed 0", "slct at 1 seed 0",
                                           "slct at spike:10 seed 0"]
    for task in todo:
        if task.args[0] == "train":
            assert resolve(build_parser().parse_args(task.args)).train.total_steps == 100
    for method, base in (("ilct", 150.0), ("slct", 120.0)):
        for seed in range(3):
            run = premise.run_dir(a, "spike:10", method, seed)
            run.mkdir(parents=True)
            (run / "eval-final-n1000.json").write_text(json.dumps(
                {"results": [dict(nfe=1, fd=base + seed), dict(nfe=2, fd=base + 10 + seed)]}))
    a.methods = ["ilct", "slct"]
    import numpy as np  # the spike latents' kurtosis (per-element, as `slct analyze` advises from); plain's are absent
    from slct.data import encode_dataset
    from slct.data.sources import ArraySource

    images = np.random.default_rng(0).normal(127, 30, (64, 8, 8, 3)).clip(0, 255).astype(np.uint8)
    encode_dataset(ArraySource(images), premise.data_dir(a, "spike:10"),
                   {"name": "outliers", "base": {"name": "identity"}, "strength": 20.0}, 8, num_workers=0,
                   progress=False)
    kurt = premise.kurtosis(a, "spike:10")
    assert kurt > 10 and premise.kurtosis(a, "1") is None
    text = premise.report(a).read_text()
    assert f"| (latents' excess kurtosis) | | - | {kurt:.2f} |" in text
    saved = json.loads((tmp_path / "premise-utkface64-100steps.json").read_text())
    assert saved["kurtosis"]["spike:10"] == kurt  # what `slct analyze` advises from (3 seeds a side, 1 NFE)
    assert saved["findings"] == [dict(strength="spike:10", kurtosis=kurt, method="slct", minus_ilct=-30.0,
                                     two_pooled_sd=2.0)]
    assert "| slct | 1 | - | 121.0 +- 1.0 (3) |" in text
    assert "- spike10, 1 NFE: slct vs ilct: +30.0 (2.0): lower beyond 2 pooled sd: **yes**" in text
    assert (tmp_path / "premise-utkface64-100steps.png").stat().st_size > 0
    assert "![samples]" not in text  # no run wrote sample grids: no strip
    from PIL import Image

    grid = premise.run_dir(a, "spike:10", "slct", 0) / "samples" / "step-00000100-nfe1.png"
    grid.parent.mkdir()
    Image.new("RGB", (80, 80), "red").save(grid)
    assert "![samples](premise-utkface64-100steps-samples.png)" in premise.report(a).read_text()
    assert Image.open(tmp_path / "premise-utkface64-100steps-samples.png").size == (110 + 80, 10)


def test_premise_reports_runs_of_an_earlier_machine_from_the_committed_report_exactly(tmp_path, monkeypatch):
    """A new machine has none of the run folders: benchmarks/premise.py neither retrains the seeds the committed
    report scored nor drops them. A row kept only as mean +- sd (reports before per-seed values) is pooled exactly
    with a seed scored here; a row with per-seed values gives them back seed by seed."""
    premise = _module("premise")
    monkeypatch.setattr(premise.ablation, "RESULTS", tmp_path)
    a = premise.parser().parse_args(["--work", str(tmp_path), "--steps", "100", "--strengths", "spike:10",
                                     "--methods", "ilct", "slct"])
    old = [dict(strength="spike:10", method="ilct", nfe=1, fd=201.0, fd_sd=2 ** 0.5, seeds=[0, 1]),  # 200, 202
           dict(strength="spike:10", method="slct", nfe=1, fd=101.0, fd_sd=1.0, seeds=[0, 1, 2],
                values=[[0, 100.0], [1, 101.0], [2, 102.0]])]
    (tmp_path / "premise-utkface64-100steps.json").write_text(json.dumps(dict(summary=old, kurtosis={"spike:10": 9.5})))
    todo = premise.tasks(a, tmp_path / "ref.npz")
    assert [t.what for t in todo if t.args[0] == "train"] == ["ilct at spike:10 seed 2"]
    run = premise.run_dir(a, "spike:10", "ilct", 2)
    run.mkdir(parents=True)
    (run / "eval-final-n1000.json").write_text(json.dumps({"results": [dict(nfe=1, fd=210.0)]}))
    rows = {r["method"]: r for r in premise.summarize(a)}
    mean, sd = premise.ablation.mean_sd([200.0, 202.0, 210.0])
    assert rows["ilct"]["seeds"] == [0, 1, 2] and rows["ilct"]["values"] == [[2, 210.0]]
    assert abs(rows["ilct"]["fd"] - mean) < 1e-9 and abs(rows["ilct"]["fd_sd"] - sd) < 1e-9
    assert rows["slct"]["values"] == [[0, 100.0], [1, 101.0], [2, 102.0]] and rows["slct"]["fd_sd"] == 1.0
    # a pooled seed scored here again: the pool cannot be split, so the runs here win
    again = premise.run_dir(a, "spike:10", "ilct", 0)
    again.mkdir(parents=True)
    (again / "eval-final-n1000.json").write_text(json.dumps({"results": [dict(nfe=1, fd=199.0)]}))
    assert [r["seeds"] for r in premise.summarize(a) if r["method"] == "ilct"] == [[0, 2]]
    text = premise.report(a).read_text()
    assert "| (latents' excess kurtosis) | | 9.50 |" in text  # the committed report's: the latents are not here
    # the committed strip shows runs that are not here: it stays, and the seed-0 runs here are added beside it
    from PIL import Image

    Image.new("RGB", (190, 10), "blue").save(tmp_path / "premise-utkface64-100steps-samples.png")
    grid = again / "samples" / "step-00000100-nfe1.png"
    grid.parent.mkdir()
    Image.new("RGB", (80, 80), "red").save(grid)
    text = premise.report(a).read_text()
    assert "Runs scored since that strip (trained on another machine): spike10 ilct:" in text
    assert Image.open(tmp_path / "premise-utkface64-100steps-samples.png").getpixel((0, 0)) == (0, 0, 255)
    assert Image.open(tmp_path / "premise-utkface64-100steps-samples-added.png").size == (110 + 80, 10)
    saved = json.loads((tmp_path / "premise-utkface64-100steps.json").read_text())
    assert saved["meta"]["samples"] == {"strip": None, "added": ["spike10 ilct"]}
