"""The many-step baselines at their best: flow matching (`--preset fm`), the flow-ODE solvers that sample it and any
flow objective through its velocity, EDM's own training recipe (`--preset ldm-edm`: Adam, a learning-rate ramp-up
as a fraction of the run, dropout), and the tuning sweep's plan and report (benchmarks/sweep.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from slct.config import load_config
from slct.objectives import ObjectiveConfig, build_objective
from slct.objectives.flow_matching import fm_times
from slct.sampling import flow_ode_sample, set_solver
from slct.training import train
from slct.training.setup import build_optimizer, learning_rate, warmup_steps
from tiny_run import TINY_RUN

TINY = [*TINY_RUN, "logging.log_every_steps=1", "train.device=cpu", "train.batch_size=8", "checkpoint.every_steps=4"]


def test_fm_loss_is_the_velocity_regression():
    """fm: total_i = mean((u(x_t, t, 0) - (e - x0))^2) with x_t = (1 - t) x0 + t e, consistency term 0."""
    cfg = ObjectiveConfig(kind="fm", coupling="none")
    objective = build_objective(cfg, 10)
    x0, e = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    t = torch.tensor([[0.1], [0.4], [0.7], [0.95]], dtype=torch.float64)
    seen = {}

    def model(x, tt, labels, h):
        seen.update(x=x, t=tt, h=h)
        return 0.5 * x  # any function of the input
    terms = objective(model, x0, 0, noise=e, indices=t, dropout_seed=0)
    tb = t[:, 0].reshape(-1, 1, 1, 1)
    xt = (1 - tb) * x0 + tb * e
    torch.testing.assert_close(seen["x"], xt)
    assert torch.equal(seen["h"], torch.zeros(4, dtype=torch.float64))
    want = (0.5 * xt - (e - x0)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(terms.total, want)
    assert torch.equal(terms.consistency, torch.zeros(4, dtype=torch.float64))


def test_fm_times_are_logit_normal():
    cfg = ObjectiveConfig(kind="fm", fm_t_mean=0.5, fm_t_std=0.8)
    t = fm_times(20_000, cfg, torch.Generator().manual_seed(0))[:, 0]
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean()) - 0.5) < 0.03 and abs(float(logit.std()) - 0.8) < 0.03
    with pytest.raises(ValueError, match="fm_t_std must be > 0"):
        ObjectiveConfig(kind="fm", fm_t_std=0.0).validate()


def _counting(fn):
    calls = []

    def model(x, t, labels, h):
        calls.append(float(t[0]))
        assert torch.equal(h, torch.zeros_like(h))  # the instantaneous velocity: h = 0
        return fn(x, t)
    return model, calls


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 7])
def test_flow_ode_solvers_use_exactly_the_nfe_and_are_exact_on_a_single_point(solver, nfe):
    """For data that is one point d the exact velocity is (x - d) / t, whose solution is linear in t: both solvers
    land on d exactly, with exactly ``nfe`` network evaluations."""
    d = torch.tensor([[0.3, -1.2]])
    model, calls = _counting(lambda x, t: (x - d) / t.reshape(-1, 1).clamp_min(1e-12))
    if solver == "heun" and nfe % 2 == 0:  # its last correction evaluates at t = 0: use the limit there
        model, calls = _counting(lambda x, t: torch.where(t.reshape(-1, 1) > 0, (x - d) / t.reshape(-1, 1)
                                                          .clamp_min(1e-12), torch.zeros_like(x)))
    x = flow_ode_sample(model, torch.tensor([[2.0, 0.5]]), nfe, solver)
    assert len(calls) == nfe and calls[0] == 1.0
    if not (solver == "heun" and nfe % 2 == 0):
        torch.testing.assert_close(x, d)


def test_heun_is_second_order_and_euler_first():
    """dx/dt = x t from t = 1 (x = 1) to 0: x(0) = exp(-1/2). Doubling the steps divides Heun's error by ~4 and
    Euler's by ~2."""
    exact = math.exp(-0.5)

    def error(solver, nfe):
        model, _ = _counting(lambda x, t: x * t.reshape(-1, 1))
        return abs(float(flow_ode_sample(model, torch.ones(1, 1, dtype=torch.float64), nfe, solver)) - exact)

    assert 3.6 < error("heun", 40) / error("heun", 80) < 4.4
    assert 1.8 < error("euler", 40) / error("euler", 80) < 2.2


def test_solver_choices_follow_the_parameterisation():
    samp = load_config("soflow", "digits").sampling
    set_solver(samp, "soflow", "heun")
    assert samp.flow_solver == "heun"
    set_solver(samp, "soflow", "map")
    with pytest.raises(ValueError, match="learns an instantaneous velocity, not a flow map"):
        set_solver(samp, "fm", "map")
    samp = load_config("ldm", "digits").sampling
    set_solver(samp, "edm", "euler")
    assert samp.ldm_solver == "euler"
    with pytest.raises(ValueError, match="solvers are euler, heun"):
        set_solver(samp, "edm", "map")
    with pytest.raises(ValueError, match="leave --solver out"):
        set_solver(samp, "consistency", "heun")
    with pytest.raises(ValueError, match="sampling.flow_solver must be euler or heun"):
        load_config("fm", "digits", sets=["sampling.flow_solver=map"])


def test_fm_trains_and_samples_at_any_nfe_and_a_flow_map_model_through_its_velocity(tmp_path, capsys):
    from slct.cli import main
    from slct.sampling import load_snapshot

    for method in ("fm", "soflow"):
        train(load_config(method, "digits", sets=[*TINY, "train.total_steps=4"]), tmp_path / method,
              progress=False)
    snap = load_snapshot(tmp_path / "fm")
    assert snap.config.sampling.flow_solver == "heun"
    assert main(["sample", str(tmp_path / "fm"), "--n", "2", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "grid-nfe35.png").is_file()  # fm's default: the ldm baseline's 35 NFE
    assert main(["sample", str(tmp_path / "soflow"), "--n", "2", "--nfe", "3", "--solver", "euler",
                 "--out", str(tmp_path / "s2")]) == 0
    assert json.loads((tmp_path / "s2" / "samples.json").read_text())["solver"] == "euler"
    soflow = load_snapshot(tmp_path / "soflow")
    a = soflow.sample_latents([0, 1], 3)  # its flow map
    soflow.config.sampling.flow_solver = "euler"
    assert not torch.equal(a, soflow.sample_latents([0, 1], 3))  # the ODE of its velocity: another sampler


def test_ldm_edm_is_edms_recipe():
    cfg = load_config("ldm-edm", "utkface64")
    assert (cfg.optim.optimizer, cfg.optim.weight_decay, cfg.optim.warmup_fraction, cfg.network.dropout) == (
        "adam", 0.0, 0.05, 0.1)
    assert cfg.objective.kind == "edm" and cfg.train.ema_rampup_ratio == 0.05  # EDM's ramp-up EMA
    model = torch.nn.Linear(2, 2)
    assert type(build_optimizer(cfg.optim, model)) is torch.optim.Adam
    assert type(build_optimizer(load_config("ldm", "utkface64").optim, model)) is torch.optim.RAdam
    with pytest.raises(ValueError, match="optim.optimizer must be one of radam, adam"):
        load_config("ldm", "digits", sets=["optim.optimizer=sgd"])


def test_the_warmup_fraction_fits_the_run_length():
    """5% of the run: 100 steps of a 2,000-step run, 15,000 of a 300k one; the longer of steps and fraction."""
    cfg = load_config("ldm-edm", "utkface64").optim
    assert warmup_steps(cfg, 2000) == 100 and warmup_steps(cfg, 300_000) == 15_000
    assert learning_rate(cfg, 0, total_steps=2000) == pytest.approx(cfg.lr / 100)
    assert learning_rate(cfg, 99, total_steps=2000) == learning_rate(cfg, 1500, total_steps=2000) == cfg.lr
    cfg.warmup_steps = 400
    assert warmup_steps(cfg, 2000) == 400
    with pytest.raises(ValueError, match="warmup_fraction must be in"):
        load_config("ldm", "digits", sets=["optim.warmup_fraction=1.5"])


# ---------------------------------------------------------------------------------------------------------------------
# benchmarks/sweep.py


def _sweep():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep.py"
    spec = importlib.util.spec_from_file_location("slct_bench_sweep", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_sweep_plan_centre_first_and_every_command_parses(tmp_path):
    from slct.cli import build_parser
    from slct.commands.train import resolve

    sweep = _sweep()
    points = sweep.order("ldm-edm")
    assert len(points) == 16 and len(set(points)) == 16
    assert (points[0].lr, points[0].beta2, points[0].dropout) == (1e-3, 0.999, 0.1)  # the preset's own point
    assert all(sum(getattr(p, k) != getattr(points[0], k) for k in sweep.GRID) == 1 for p in points[1:6])
    a = sweep.parser().parse_args(["--work", str(tmp_path), "--budget", "100"])
    todo = sweep.tasks(a, tmp_path / "data", tmp_path / "ref.npz")
    assert len(todo) == 3 * 48 and [t.what.split("-")[0] for t in todo[:9:3]] == ["ldm", "fm", "soflow"]
    for task in todo:
        ns = build_parser().parse_args(task.args)
        baseline = next(b for b in ("ldm-edm", "fm", "soflow") if task.what.startswith(b + "-"))
        if task.args[0] == "train":
            cfg = resolve(ns)
            assert cfg.objective.kind == {"ldm-edm": "edm", "fm": "fm", "soflow": "soflow"}[baseline]
            point = next(p for p in sweep.order(baseline) if task.what.startswith(p.name + " seed"))
            assert (cfg.optim.lr, cfg.optim.betas[1], cfg.network.dropout) == (point.lr, point.beta2, point.dropout)
            assert cfg.train.total_steps == 100
        elif baseline == "soflow":  # its flow map at 2 steps, then 1, 4 and 8
            assert ns.nfe == ([1, 4, 8] if "NFE" in task.what else [2])
        else:
            assert ns.nfe == ([3, 5, 9, 17] if "NFE" in task.what else [35])  # 35, then the leaderboard's curve
    # SoFlow's centre is its preset's own point (beta2 0.99, dropout 0: the authors' ImageNet settings)
    soflow = sweep.order("soflow")
    assert (soflow[0].lr, soflow[0].beta2, soflow[0].dropout) == (1e-3, 0.99, 0.0) and len(set(soflow)) == 16


def test_tuned_entries_are_the_sweeps_points_and_share_its_runs(tmp_path, monkeypatch):
    """leaderboard's ``*-tuned`` entries: the command of seed k is the sweep's command of its point at seed k (the
    same folder, so the sweep's seed 0 is the entry's), on the wall-clock board too (a baseline keeps its budget)."""
    sweep = _sweep()
    monkeypatch.setattr(sweep.ablation, "RESULTS", tmp_path)  # no committed sweep: every point is planned
    board = sys.modules.get("slct_bench_leaderboard") or sweep.leaderboard
    tuned = {n: e for n, e in board.ENTRIES.items() if e.sweep}
    assert set(tuned) == {"ldm-edm-tuned", "fm-tuned"} and set(tuned) <= set(board.BASELINES)
    data = tmp_path / "data"
    for name, entry in tuned.items():
        point = next(p for p in sweep.order(entry.preset) if p.name == entry.sweep)
        for seed in (0, 2):
            a = sweep.parser().parse_args(["--work", str(tmp_path), "--seed", str(seed), "--only", point.name])
            mine = sweep.tasks(a, data, tmp_path / "ref.npz")[0].args
            plan = board.Plan(tmp_path, 2000, 1500, [seed])
            assert board.train_command(plan, name, seed, data) == mine
            assert plan.run(name, seed) == sweep.run_dir(tmp_path, 2000, point, seed)
        timed = board.Plan(tmp_path, 2000, 1500, [0], seconds={"ldm": 1.0, name: 2.0})
        assert timed.run(name, 0) == sweep.run_dir(tmp_path, 2000, point, 0)  # a baseline is the clock: its run


def test_soflows_centre_is_the_leaderboards_soflow_run(tmp_path):
    """The sweep's SoFlow centre is the leaderboard's `soflow` entry: the same folder and the same resolved config
    (dropout None is the network's 0), so it is trained once; every other point has its own folder."""
    import dataclasses

    from slct.cli import build_parser
    from slct.commands.train import resolve

    sweep = _sweep()
    board = sys.modules.get("slct_bench_leaderboard") or sweep.leaderboard
    centre, *others = sweep.order("soflow")
    plan = board.Plan(tmp_path, 2000, 1500, [1])
    assert sweep.run_dir(tmp_path, 2000, centre, 1) == plan.run("soflow", 1)
    assert all(sweep.run_dir(tmp_path, 2000, p, 1).parent.name == "sweep-2000steps" for p in others)
    a = sweep.parser().parse_args(["--work", str(tmp_path), "--seed", "1", "--only", centre.name])
    mine = resolve(build_parser().parse_args(sweep.tasks(a, tmp_path / "data", tmp_path / "ref.npz")[0].args))
    theirs = resolve(build_parser().parse_args(board.train_command(plan, "soflow", 1, tmp_path / "data")))
    theirs.network.dropout = theirs.network.dropout or 0.0
    assert dataclasses.asdict(mine) == dataclasses.asdict(theirs)
    # the baselines' centres keep their own sweep runs (their leaderboard entries are other runs)
    assert sweep.run_dir(tmp_path, 2000, sweep.order("fm")[0], 0).parent.name == "sweep-2000steps"


def test_sweep_only_trains_the_named_points_and_refuses_unknown_ones(tmp_path):
    sweep = _sweep()
    a = sweep.parser().parse_args(["--work", str(tmp_path), "--only", "fm-lr0.0005-b0.999-do0"])
    assert [t.what for t in sweep.tasks(a, tmp_path, tmp_path)] == [
        "fm-lr0.0005-b0.999-do0 seed 0", "fm-lr0.0005-b0.999-do0 seed 0: eval",
        "fm-lr0.0005-b0.999-do0 seed 0: eval at 3, 5, 9, 17 NFE"]
    with pytest.raises(SystemExit, match="no such point"):
        sweep.main(["--work", str(tmp_path), "--only", "fm-lr9-b0.999-do0", "--print"])


def test_sweep_report_ranks_the_points(tmp_path, monkeypatch):
    sweep = _sweep()
    a = sweep.parser().parse_args(["--work", str(tmp_path), "--budget", "100", "--baselines", "ldm-edm"])
    for i, point in enumerate(sweep.order("ldm-edm")[:3]):
        run = sweep.run_dir(tmp_path, 100, point, 0)
        run.mkdir(parents=True)
        (run / "eval-final-n1000-nfe35.json").write_text(json.dumps(
            {"results": [{"nfe": 35, "fd": 50.0 - i, "precision": 0.5, "recall": 0.1 * i}]}))
    results = tmp_path / "results"
    results.mkdir()
    text = sweep.report(a, results).read_text()
    assert "Best: lr 0.001, beta2 0.99, dropout 0.1 (FD 48.0 at 35 NFE; the next point 1.0 higher; one seed" in text
    # a point's NFE curve scored: ranked by its best FD at <= 35 NFE (the bar's rule), here the centre at 5 NFE
    centre = sweep.run_dir(tmp_path, 100, sweep.order("ldm-edm")[0], 0)
    (centre / "eval-final-n1000-nfe3-nfe5-nfe9-nfe17.json").write_text(json.dumps({"results": [
        {"nfe": 3, "fd": 60.0}, {"nfe": 5, "fd": 40.0}, {"nfe": 9, "fd": 45.0}, {"nfe": 17, "fd": 49.0}]}))
    text = sweep.report(a, results).read_text()
    assert "Best: lr 0.001, beta2 0.999, dropout 0.1 (FD 40.0 at 5 NFE; the next point 8.0 higher" in text
    assert "| 0.001 | 0.999 | 0.1 | 50.0 | 60.0 | 40.0 | 45.0 | 49.0 | 40.0 (5) |" in text
    data = json.loads((results / "sweep-utkface64-100steps.json").read_text())
    assert len(data["rows"]) == 3 and data["best"]["ldm-edm"]["best_fd"] == 40.0


def test_sweep_ranks_soflow_at_its_own_nfe_and_says_what_was_not_run(tmp_path):
    """SoFlow's points are ranked by their 2-step FD (the NFE its comparison with the bar is made at), not by the
    best over its curve; a swept entry with no point scored is named with the command that scores it."""
    sweep = _sweep()
    a = sweep.parser().parse_args(["--work", str(tmp_path), "--budget", "100", "--baselines", "soflow", "fm"])
    for i, point in enumerate(sweep.order("soflow")[:2]):
        run = sweep.run_dir(tmp_path, 100, point, 0)
        run.mkdir(parents=True)
        (run / "eval-final-n1000-nfe2.json").write_text(json.dumps(
            {"results": [{"nfe": 2, "fd": 80.0 + i, "precision": 0.5, "recall": 0.1}]}))
        (run / "eval-final-n1000-nfe1-nfe4-nfe8.json").write_text(json.dumps(  # the second point's 8 steps lower
            {"results": [{"nfe": 1, "fd": 120.0}, {"nfe": 4, "fd": 90.0}, {"nfe": 8, "fd": 70.0 if i else 95.0}]}))
    results = tmp_path / "results"
    results.mkdir()
    text = sweep.report(a, results).read_text()
    assert "## `soflow` (`--preset soflow`: lr 0.001, beta2 0.99, dropout 0)" in text
    assert "Best: lr 0.001, beta2 0.99, dropout 0 (FD 80.0 at 2 NFE; the next point 1.0 higher; one seed; the " \
           "points ranked by their FD at 2 NFE)." in text
    assert "## `fm`: no point scored yet (`python benchmarks/sweep.py --baselines fm`)" in text


def test_soflow_target_pass_runs_on_the_consistency_rows_only_and_changes_no_bit():
    """The no-grad target pass f(x_l, l, s) on the 25% consistency rows alone (the authors' way): the loss is bitwise
    the one with the pass over the whole batch (a network without dropout), at a quarter of that pass's cost."""
    from slct.model import build_model
    from slct.objectives.soflow import soflow_draws

    cfg = load_config("soflow", "digits", sets=["network.name=unet-tiny"])
    torch.manual_seed(0)
    net = build_model(cfg, (1, 8, 8))
    sizes = []

    def model(x, t, labels=None, h=None):
        sizes.append(len(x))
        return net(x, t, labels, h)

    objective = build_objective(cfg.objective, 100)
    x0, e = torch.randn(16, 1, 8, 8), torch.randn(16, 1, 8, 8)
    rows = soflow_draws(16, cfg.objective, 5, 100, torch.Generator().manual_seed(3))
    terms = objective(model, x0, 5, noise=e, indices=rows, dropout_seed=0)
    assert sizes == [16, 4]  # the online pass on all rows, the target pass on the 4 consistency rows
    # the same loss with the target pass over every row
    t, s, l = (rows[:, i].float() for i in range(3))
    fm = s == t
    v = e - x0
    xt, xl = x0 + t.view(-1, 1, 1, 1) * v, x0 + l.view(-1, 1, 1, 1) * v
    with torch.no_grad():
        u_t, u_l = net(xt, t, None, t - s), net(xl, l, None, l - s)
    q = ((xt - (t - s).view(-1, 1, 1, 1) * u_t) - (xl - (l - s).view(-1, 1, 1, 1) * u_l)) / torch.where(
        fm, torch.ones_like(t), t - l).view(-1, 1, 1, 1)
    err = torch.where(fm, (u_t - v).pow(2).flatten(1).mean(1), q.pow(2).flatten(1).mean(1))
    w = 1 / (err + cfg.objective.soflow_eps) ** cfg.objective.soflow_p
    consistency = torch.where(fm, 0.0, -(u_t * (w.view(-1, 1, 1, 1) * q)).flatten(1).mean(1))
    assert torch.equal(terms.consistency.detach(), consistency)
    sizes.clear()
    every = dataclasses.replace(cfg.objective, soflow_target_rows="all")  # the pass over every row, as before
    again = build_objective(every, 100)(model, x0, 5, noise=e, indices=rows, dropout_seed=0)
    assert sizes == [16, 16] and torch.equal(again.total, terms.total)


def test_soflow_target_pass_with_dropout_runs_over_every_row_so_masks_match():
    """With dropout active a target pass over the consistency rows alone would draw other masks than the online
    pass (another batch shape), and q divides their difference by t - l: so it then runs over every row under the
    online pass's seed - bitwise the "all" setting - and back on the rows alone in eval mode or without dropout."""
    from slct.model import build_model
    from slct.objectives.base import active_dropout
    from slct.objectives.soflow import soflow_draws

    cfg = load_config("soflow", "digits", sets=["network.name=unet-tiny", "network.dropout=0.3"])
    torch.manual_seed(0)
    net = build_model(cfg, (1, 8, 8)).train()
    assert active_dropout(net) and not active_dropout(net.eval()) and not active_dropout(lambda x: x)
    net.train()
    sizes = []
    net.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    x0, e = torch.randn(16, 1, 8, 8), torch.randn(16, 1, 8, 8)
    rows = soflow_draws(16, cfg.objective, 5, 100, torch.Generator().manual_seed(3))
    terms = build_objective(cfg.objective, 100)(net, x0, 5, noise=e, indices=rows, dropout_seed=0)
    assert sizes == [16, 16]
    every = dataclasses.replace(cfg.objective, soflow_target_rows="all")
    assert torch.equal(build_objective(every, 100)(net, x0, 5, noise=e, indices=rows, dropout_seed=0).total,
                       terms.total)
    # the masks match: each dropout layer zeroes the same elements in the target pass as in the online pass
    masks = []
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.register_forward_hook(lambda module, args, out: masks.append(out == 0))
    build_objective(cfg.objective, 100)(net, x0, 5, noise=e, indices=rows, dropout_seed=0)
    half = len(masks) // 2
    assert half and all(torch.equal(a, b) for a, b in zip(masks[:half], masks[half:]))
    assert 0.2 < float(torch.cat([m.flatten() for m in masks]).float().mean()) < 0.4  # p = 0.3: masks drawn


# ---------------------------------------------------------------------------------------------------------------------
# distillation with the measured c


def test_slcd_with_calibrated_c_trains_and_the_bounds_are_per_element(tmp_path):
    from slct.calibration import bounds_of_c

    teacher = tmp_path / "ldm"
    train(load_config("ldm", "digits", sets=[*TINY, "train.total_steps=2"]), teacher, progress=False)
    cfg = load_config("slcd", "digits", sets=[*TINY, "train.total_steps=2", "objective.c_schedule=calibrated",
                                              "objective.c_calibration_batches=1", f"objective.teacher={teacher}"])
    result = train(cfg, tmp_path / "slcd", progress=False)  # calibration passes the teacher (crashed at step 0)
    assert result.finished and result.state.c_table
    obj = load_config("ilct", "digits", sets=["objective.loss_reduction=sum"]).objective
    assert bounds_of_c(obj, (4, 32, 32)) == pytest.approx((1e-5 * 64, 64.0))  # sqrt(4096) = 64
    assert bounds_of_c(load_config("ilct", "digits").objective, (4, 32, 32)) == (1e-5, 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# consistency distillation as published: an EMA target network (openai's mu = 0.95), a fixed N


def test_the_target_network_is_the_ema_when_target_ema_is_set():
    cfg = ObjectiveConfig(kind="consistency", loss="l2", diffusion_r=0.0, coupling="none", target_ema=0.95)
    objective = build_objective(cfg, 100)
    x0, e = torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.randn(4, 1, 4, 4, dtype=torch.float64)
    online = lambda x, s, labels=None: x * 0.5  # noqa: E731
    with pytest.raises(ValueError, match="needs the EMA target network"):
        objective(online, x0, 0, noise=e)
    zero = lambda x, s, labels=None: torch.zeros_like(x)  # noqa: E731
    idx = torch.tensor([0, 1, 2, 3])
    terms = objective(online, x0, 0, noise=e, indices=idx, dropout_seed=0, ema_target=zero)
    plain = build_objective(ObjectiveConfig(kind="consistency", loss="l2", diffusion_r=0.0, coupling="none"), 100)
    ref = plain(lambda x, s, labels=None: x * 0.5 if torch.is_grad_enabled() else torch.zeros_like(x), x0, 0,
                noise=e, indices=idx, dropout_seed=0)  # the target pass (no grad) from the zero network
    torch.testing.assert_close(terms.total, ref.total)
    with pytest.raises(ValueError, match="target_ema must be in"):
        ObjectiveConfig(target_ema=1.0).validate()


def test_a_run_with_an_ema_target_tracks_it_and_resumes_bitwise(tmp_path):
    from slct import checkpoint

    sets = [*TINY, "train.total_steps=6", "objective.target_ema=0.95", "objective.s0=17", "objective.s1=17"]
    whole, sliced = tmp_path / "whole", tmp_path / "sliced"
    train(load_config("ilct", "digits", sets=sets), whole, progress=False)
    train(load_config("ilct", "digits", sets=sets), sliced, until_step=3, progress=False)
    train(load_config("ilct", "digits", sets=sets), sliced, progress=False)
    a, b = (checkpoint.load(checkpoint.latest_checkpoint(r)) for r in (whole, sliced))
    assert "0.95" in a["ema"]["names"]  # the target network is an EMA of the run, checkpointed with the others
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [json.loads(x)["n_scales"] for x in open(whole / "metrics.jsonl") if '"n_scales"' in x] == [18] * 6


def test_compute_counts_the_passes_of_a_training_step():
    """benchmarks/compute.py: ldm and fm take one back-propagated pass per image; iLCT adds a no-grad target pass;
    SoFlow's target pass covers its 25% consistency rows only; CD as published: two teacher passes (Heun) and the
    EMA target's."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compute.py"
    spec = importlib.util.spec_from_file_location("slct_bench_compute", path)
    compute = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = compute
    spec.loader.exec_module(compute)
    rows = {name: compute.measure(name) for name in ("ldm", "fm", "ilct", "soflow", "ilcd-published")}
    passes = {k: (r["grad_rows_per_image"], r["no_grad_rows_per_image"]) for k, r in rows.items()}
    assert passes == {"ldm": (1, 0), "fm": (1, 0), "ilct": (1, 1), "soflow": (1, 0.25), "ilcd-published": (1, 3)}
    assert rows["fm"]["gflop_per_image"] == pytest.approx(rows["ldm"]["gflop_per_image"], rel=1e-3)
    assert rows["ldm"]["gflop_per_image"] < rows["soflow"]["gflop_per_image"] < rows["ilct"]["gflop_per_image"]


def test_sweep_reports_points_of_an_earlier_machine_from_the_committed_report(tmp_path, monkeypatch):
    """A new machine has no run folders: the points the committed report scored (this budget and seed) are neither
    retrained nor dropped from the table; a report of another seed is not read."""
    sweep = _sweep()
    monkeypatch.setattr(sweep.ablation, "RESULTS", tmp_path)
    a = sweep.parser().parse_args(["--work", str(tmp_path), "--budget", "100", "--baselines", "fm"])
    centre, other = sweep.order("fm")[:2]
    row = dict(baseline="fm", lr=centre.lr, beta2=centre.beta2, dropout=centre.dropout, nfe=35, seed=0, fd=50.0,
               precision=0.5, recall=0.2, sec_per_step=0.4, curve={"35": 50.0, "5": 45.0}, best_fd=45.0, best_nfe=5)
    (tmp_path / "sweep-utkface64-100steps.json").write_text(json.dumps(dict(seed=0, rows=[row])))
    whats = [t.what for t in sweep.tasks(a, tmp_path, tmp_path) if ":" not in t.what]
    assert centre.name + " seed 0" not in whats and whats[0] == other.name + " seed 0"
    run = sweep.run_dir(tmp_path, 100, other, 0)
    run.mkdir(parents=True)
    (run / "eval-final-n1000-nfe35.json").write_text(json.dumps(
        {"results": [{"nfe": 35, "fd": 48.0, "precision": 0.5, "recall": 0.1}]}))
    text = sweep.report(a, tmp_path).read_text()
    assert "| 0.001 | 0.999 | 0.1 | 50.0 | - | 45.0 | - | - | 45.0 (5) |" in text  # archived, ranked first
    assert "Best: lr 0.001, beta2 0.999, dropout 0.1 (FD 45.0 at 5 NFE; the next point 3.0 higher" in text
    b = sweep.parser().parse_args(["--work", str(tmp_path), "--budget", "100", "--baselines", "fm", "--seed", "1"])
    assert sweep.archived(b) == {}
