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
