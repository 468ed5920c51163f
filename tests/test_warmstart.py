"""slct train --init: consistency tuning from a diffusion run's weights (issue "Few-step models...", item 2). The
source must be the same network on the same latents; a difference is one line naming it, nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from slct import checkpoint
from slct.cli import main

BASE = ["--data-preset", "digits", "--batch", "8", "--device", "cpu", "--set", "network.name=unet-tiny",
        "--set", "logging.sample_every_steps=0", "--set", "checkpoint.every_steps=2", "--no-progress"]
GROUP = ["--set", "network.block_norm=group", "--set", "network.out_norm=group"]  # the ldm preset's norms


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ldm") / "run"
    assert main(["train", "--preset", "ldm", *map(str, BASE), "--steps", "4", "--out", str(run)]) == 0
    return run


def test_a_consistency_run_starts_from_the_diffusion_runs_weights(ldm_run, tmp_path, capsys):
    run = tmp_path / "tuned"
    code, _, err = cli(capsys, "train", "--preset", "ilct", *BASE, "--steps", "4", "--init", ldm_run, "--out", run)
    assert code == 0, err
    teacher = checkpoint.load(sorted(ldm_run.glob("snapshot-*.pt"))[-1], expect=checkpoint.SNAPSHOT_FORMAT)
    start = checkpoint.load(run / "checkpoints" / "checkpoint-00000000.pt")["model"]
    wanted = teacher["ema"][teacher["ema_default"]]
    assert all(torch.equal(start[k], wanted[k].to(start[k].dtype)) for k in start)  # step 0 is the teacher
    init = json.loads((run / "run.json").read_text())["init"]
    assert init["kind"] == "edm" and init["step"] == 4 and init["nimg"] == 32 and init["ema"] == teacher["ema_default"]
    # resuming does not read the source again: it may be gone by then
    moved = tmp_path / "gone"
    ldm_run.rename(moved)
    try:
        code, _, err = cli(capsys, "train", "--preset", "ilct", *BASE, "--steps", "6", "--init", ldm_run, "--out", run)
    finally:
        moved.rename(ldm_run)
    assert code == 2 and "another config" in err  # --steps changed: refused as any other config change
    code, _, err = cli(capsys, "train", "--preset", "ilct", *BASE, "--steps", "4", "--init", ldm_run, "--out", run)
    assert code == 0, err


@pytest.mark.parametrize("preset, extra, named", [
    ("slct", [], "block_norm: 'group' vs 'nonscaling-layer'"),  # the paper's NsLN is another network
    ("ilct", ["--set", "network.options.model_channels=16"], "model_channels: None vs 16"),
    ("meanflow", [], "second_time"),  # a flow model has a second time input
])
def test_another_network_is_refused_in_one_line(ldm_run, tmp_path, capsys, preset, extra, named):
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--preset", preset, *BASE, *extra, "--steps", "2", "--init", ldm_run,
                       "--out", run)
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and "not the same network on the same latents" in lines[0]
    assert named in lines[0]
    assert not run.exists()  # nothing written


def test_another_latent_space_is_refused(ldm_run, tmp_path, capsys):
    code, _, err = cli(capsys, "train", "--preset", "ilct", *BASE, "--data", "builtin:digits", "--steps", "2",
                       "--init", ldm_run, "--out", tmp_path / "run")
    assert code == 2 and "network_kwargs: attn_resolutions" in err  # 16x16 latents: attention one level up
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------------
# consistency distillation from an ldm teacher (item 3)


def test_one_heun_step_follows_the_probability_flow_of_a_gaussian():
    from slct.objectives.distillation import heun_step

    s2 = 0.25  # data ~ N(0, s2): D(x, sigma) = x s2 / (s2 + sigma^2), the flow x(sigma) ~ sqrt(s2 + sigma^2)
    teacher = lambda x, sigma, labels=None: x * s2 / (s2 + sigma.view(-1, 1, 1, 1) ** 2)  # noqa: E731
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)

    def errors(h):
        hi, lo = torch.tensor([1.0], dtype=torch.float64), torch.tensor([1.0 - h], dtype=torch.float64)
        exact = x * ((s2 + lo**2) / (s2 + hi**2)).sqrt()
        euler = x + (lo - hi) * (x - teacher(x, hi)) / hi
        return float((heun_step(teacher, x, hi, lo) - exact).abs()), float((euler - exact).abs())

    (heun_h, euler_h), (heun_h2, euler_h2) = errors(0.2), errors(0.1)
    assert heun_h < 0.2 * euler_h
    assert heun_h / heun_h2 > 6 and euler_h / euler_h2 < 5  # local error O(h^3) for Heun, O(h^2) for Euler


def test_the_target_starts_from_the_teachers_step():
    from slct.objectives import ObjectiveConfig, build_objective
    from slct.objectives.distillation import heun_step

    seen = []

    def model(x, sigma, labels=None):
        seen.append(x.clone())
        return x * 0.5

    teacher = lambda x, sigma, labels=None: x * 0.25  # noqa: E731
    cfg = ObjectiveConfig(kind="distillation", teacher="runs/ldm", coupling="none", diffusion_r=0.0)
    objective = build_objective(cfg, 100)
    x0, z = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    idx = torch.tensor([0, 3, 5, 9])
    objective(model, x0, 0, noise=z, indices=idx, dropout_seed=0, target_model=teacher)
    from slct.sigmas import karras_sigmas

    sigmas = karras_sigmas(11).float()
    hi, lo = sigmas[idx + 1], sigmas[idx]
    assert torch.allclose(seen[0], x0 + hi.view(-1, 1, 1, 1) * z)  # the online pass: the noisy data at t_{i+1}
    assert torch.allclose(seen[1], heun_step(teacher, seen[0], hi, lo), atol=1e-5)  # the target: the teacher's step
    with pytest.raises(ValueError, match="needs its teacher"):
        objective(model, x0, 0, noise=z, indices=idx, dropout_seed=0)


def test_distillation_trains_from_the_cli_and_records_its_teacher(ldm_run, tmp_path, capsys):
    run = tmp_path / "cd"
    code, _, err = cli(capsys, "train", "--preset", "ilcd", *BASE, "--steps", "2", "--teacher", ldm_run,
                       "--out", run)
    assert code == 0, err
    teacher = json.loads((run / "run.json").read_text())["teacher"]
    assert teacher["kind"] == "edm" and teacher["step"] == 4
    code, _, err = cli(capsys, "sample", run, "--n", "2", "--nfe", "1", "2", "--device", "cpu", "--out", tmp_path / "s")
    assert code == 0, err


def test_distillation_without_a_diffusion_teacher_is_one_line(ldm_run, tmp_path, capsys):
    code, _, err = cli(capsys, "train", "--preset", "slcd", *BASE, "--steps", "2", "--out", tmp_path / "a")
    assert code == 2 and "consistency distillation needs a teacher: pass --teacher RUN" in err
    consistency = tmp_path / "ct"
    assert cli(capsys, "train", "--preset", "ilct", *BASE, "--steps", "2", "--out", consistency)[0] == 0
    code, _, err = cli(capsys, "train", "--preset", "ilcd", *BASE, "--steps", "2", "--teacher", consistency,
                       "--out", tmp_path / "b")
    assert code == 2 and "is a consistency model, not a diffusion model" in err
    code, _, err = cli(capsys, "train", "--preset", "ilcd", *BASE, "--data", "builtin:digits", "--steps", "2",
                       "--teacher", ldm_run, "--out", tmp_path / "c")
    assert code == 2 and "works on other latents (latent_shape" in err
    code, _, err = cli(capsys, "train", "--preset", "ilct", *BASE, "--steps", "2", "--teacher", ldm_run,
                       "--out", tmp_path / "d")
    assert code == 2 and "objective.teacher is read by consistency distillation only" in err
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_an_ldm_runs_first_steps_do_not_depend_on_its_length(tmp_path):
    """benchmarks/leaderboard.py takes the teacher (T steps of ldm) from the ldm entry's own step-T snapshot: that is
    the same weights as a T-step run only while nothing in an ldm run depends on its total length (no curriculum, a
    step-only learning rate, an EMA that counts images)."""
    snaps = {}
    for steps in (3, 5):
        run = tmp_path / f"ldm{steps}"
        assert main(["train", "--preset", "ldm", *BASE, "--steps", str(steps), "--out", str(run),
                     "--set", "checkpoint.snapshot_every_steps=3"]) == 0
        snaps[steps] = checkpoint.load(run / "snapshot-00000003.pt", expect=checkpoint.SNAPSHOT_FORMAT)
    short, long = snaps[3], snaps[5]
    assert short["ema"].keys() == long["ema"].keys()
    for name in short["ema"]:
        assert all(torch.equal(short["ema"][name][k], long["ema"][name][k]) for k in short["ema"][name]), name
