"""Evaluation EMAs for runs of any length: EDM's ramp-up EMA, EDM2's power EMA and its post-hoc reconstruction,
one default EMA everywhere, snapshots of runs stopped early, sampling from checkpoints and the online weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slct import checkpoint
from slct.cli import main
from slct.config import load_config
from slct.ema import (EMA, FixedDecay, PowerEMA, RampUp, default_ema, posthoc_coefficients, power_gamma,
                      power_profile, power_std)
from slct.training import train
from tiny_run import TINY_RUN


def test_power_ema_width_and_exponent_match_edm2():
    # EDM2 (Karras et al. 2024): sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> gamma 6.94
    assert power_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert power_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    for std in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert power_std(power_gamma(std)) == pytest.approx(std, rel=1e-10)
    with pytest.raises(ValueError, match="std must be in"):
        power_gamma(0.3)


def _recursion(betas: list[float], trajectory: np.ndarray) -> np.ndarray:
    """The EMA recursion in float64: shadow <- beta_t shadow + (1 - beta_t) theta_t, from the initial weights."""
    shadow = trajectory[0] * 0 + 123.0  # the initial value is forgotten at step 1 (beta_1 = 0) for a power EMA
    for beta, theta in zip(betas, trajectory):
        shadow = beta * shadow + (1 - beta) * theta
    return shadow


def test_power_profile_is_the_recursion_exactly():
    rng = np.random.default_rng(0)
    trajectory = rng.standard_normal((60, 5)).cumsum(0)  # a random walk of 5 "weights"
    for std in (0.05, 0.1, 0.2):
        profile = PowerEMA(std)
        betas = [profile.beta(t, 0, 1) for t in range(1, 61)]
        w = power_profile(profile.gamma, 60)
        assert w.sum() == pytest.approx(1, abs=1e-12)
        np.testing.assert_allclose(w @ trajectory, _recursion(betas, trajectory), rtol=0, atol=1e-10)


def test_posthoc_reconstruction_is_exact_when_every_step_is_stored():
    """Power EMAs stored at every step span all profiles: an EMA of another width is recovered to round-off."""
    rng = np.random.default_rng(1)
    trajectory = rng.standard_normal((40, 7)).cumsum(0)
    stored = [(t, std) for t in range(1, 41) for std in (0.05, 0.1)]
    snaps = [power_profile(power_gamma(std), t, 40) @ trajectory for t, std in stored]
    x = posthoc_coefficients(stored, (40, 0.08))
    target = PowerEMA(0.08)
    direct = _recursion([target.beta(t, 0, 1) for t in range(1, 41)], trajectory)
    np.testing.assert_allclose(np.tensordot(x, np.stack(snaps), 1), direct, rtol=0, atol=1e-8)


def test_posthoc_reconstruction_from_sparse_snapshots_is_close():
    """As a run stores them (every 25 of 500 steps): the profile fit and the weights are close, not exact."""
    from slct.posthoc import fit_error

    rng = np.random.default_rng(2)
    trajectory = rng.standard_normal((500, 3)).cumsum(0) * 0.01
    stored = [(t, std) for t in range(25, 501, 25) for std in (0.05, 0.1)]
    snaps = np.stack([power_profile(power_gamma(std), t, 500) @ trajectory for t, std in stored])
    for std in (0.06, 0.08, 0.12):
        x = posthoc_coefficients(stored, (500, std))
        assert fit_error(stored, (500, std), x) < 0.05
        direct = power_profile(power_gamma(std), 500) @ trajectory
        np.testing.assert_allclose(x @ snaps, direct, atol=0.02 * np.abs(trajectory).max())


def test_rampup_half_life_is_a_fraction_of_the_images_seen():
    r = RampUp(ratio=0.05, halflife_nimg=500_000)
    # after 64,000 images at batch 64 the half-life is 3,200 images = 50 steps
    assert r.beta(1000, 64_000, 64) ** 50 == pytest.approx(0.5)
    assert r.beta(10**6, 10**9, 64) ** (500_000 / 64) == pytest.approx(0.5)  # capped at halflife_nimg
    assert r.beta(1, 64, 64) < 1e-5  # the first step starts from the online weights


def test_ema_class_tracks_every_profile():
    model = torch.nn.Linear(3, 1, bias=False)
    profiles = [FixedDecay(0.9), RampUp(), PowerEMA(0.1)]
    ema = EMA(model, profiles)
    assert ema.names == ["0.9", "rampup", "std=0.1"]
    thetas = []
    for t in range(1, 21):
        with torch.no_grad():
            model.weight.fill_(float(t))
        thetas.append(float(t))
        ema.update(model, t, 64 * t, 64)
    w = power_profile(power_gamma(0.1), 20)
    assert float(ema.weights("std=0.1")["weight"][0, 0]) == pytest.approx(float(w @ np.array(thetas)), rel=1e-6)
    with pytest.raises(ValueError, match="tracks the EMAs"):
        EMA(model, profiles[:2]).load_state_dict(ema.state_dict())
    assert default_ema(ema.names, None) == "rampup" and default_ema(ema.names, "0.9") == "0.9"
    assert default_ema(["0.99", "0.999"], None) == "0.999"


TINY = [*TINY_RUN, "logging.log_every_steps=2", "train.device=cpu", "train.batch_size=8", "checkpoint.every_steps=4"]


def test_posthoc_ema_from_a_run_samples_like_any_snapshot(tmp_path, capsys):
    sets = [*TINY, "train.total_steps=12", "train.ema_power_stds=[0.05,0.1]", "train.ema_power_every_steps=2"]
    train(load_config("slct", "digits", sets=sets), tmp_path, progress=False)
    files = sorted((tmp_path / "power-ema").glob("snapshot-*.pt"))
    assert [f.name for f in files] == [f"snapshot-{s:08d}.pt" for s in range(2, 13, 2)]
    assert main(["ema", str(tmp_path), "--std", "0.08"]) == 0
    out = capsys.readouterr().out
    assert "std=0.08 at step 12: 12 stored power EMAs" in out
    made = tmp_path / "posthoc-ema" / "snapshot-00000012-std0.08.pt"
    payload = torch.load(made, weights_only=True)
    assert payload["ema_default"] == "std=0.08" and payload["posthoc"]["fit_error"] < 0.2
    assert abs(sum(s["coefficient"] for s in payload["posthoc"]["sources"]) - 1) < 1e-6  # a weighted average
    assert main(["sample", str(made), "--n", "4", "--nfe", "1", "--device", "cpu", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "grid-nfe1.png").is_file()
    assert main(["ema", str(tmp_path), "--std", "0.4"]) == 2
    assert "std must be in" in capsys.readouterr().err


def test_one_default_ema_everywhere_and_early_stops_write_snapshots(tmp_path, capsys):
    from slct.sampling import load_snapshot

    cfg = load_config("slct", "digits", sets=[*TINY, "train.total_steps=12"])
    result = train(cfg, tmp_path, until_step=6, progress=False)
    assert result.stopped_by == "until_step"
    snap_file = tmp_path / "snapshot-00000006.pt"  # stopped early: a snapshot as well as the checkpoint
    payload = torch.load(snap_file, weights_only=True)
    assert payload["ema_default"] == cfg.train.ema_default == "rampup"
    assert set(payload["ema"]) == {"0.95", "0.99", "rampup", "online"}
    assert load_snapshot(tmp_path).ema == "rampup"
    online = load_snapshot(tmp_path, ema="online")
    ckpt = checkpoint.load(checkpoint.latest_checkpoint(tmp_path))
    for k, v in online.model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    # sampling from a training checkpoint works too, with any stored EMA or the online weights
    from_ckpt = load_snapshot(checkpoint.latest_checkpoint(tmp_path), ema=0.99)
    assert from_ckpt.ema == "0.99" and from_ckpt.step == 6
    out = tmp_path / "samples"
    argv = ["sample", str(checkpoint.latest_checkpoint(tmp_path)), "--ema", "online", "--n", "3", "--nfe", "1",
            "--device", "cpu", "--out", str(out), "--format", "grid", "npz", "png"]
    assert main(argv) == 0
    assert (out / "grid-nfe1.png").is_file() and (out / "samples-nfe1.npz").is_file()
    assert len(list((out / "nfe1").glob("*.png"))) == 3
    with pytest.raises(ValueError, match="available: 0.95, 0.99, rampup, online"):
        load_snapshot(tmp_path, ema="std=0.1")


def test_periodic_grids_and_evaluation_use_the_default_ema(tmp_path):
    from slct.eval import get_extractor
    from slct.eval.reference import compute_reference, save_reference

    ref = save_reference(compute_reference("builtin:digits8", get_extractor("pixels"), progress=False, limit=64),
                         tmp_path / "ref.npz")
    sets = [*TINY, "train.total_steps=4", "logging.eval_every_steps=4", f"logging.eval_reference={ref}",
            "logging.eval_n=16", "train.ema_default=0.95"]
    train(load_config("slct", "digits", sets=sets), tmp_path / "run", progress=False)
    rows = [json.loads(r) for r in open(tmp_path / "run" / "metrics.jsonl") if '"eval_step"' in r]
    assert rows[-1]["ema"] == "0.95"
    assert torch.load(tmp_path / "run" / "snapshot-00000004.pt", weights_only=True)["ema_default"] == "0.95"
    with pytest.raises(ValueError, match="train.ema_default 'std=0.1' is not a tracked EMA"):
        load_config("slct", "digits", sets=["train.ema_default=std=0.1"])


def test_sliced_runs_keep_only_their_newest_off_schedule_snapshot(tmp_path):
    cfg = load_config("slct", "digits", sets=[*TINY, "train.total_steps=12", "checkpoint.snapshot_every_steps=8"])
    for stop in (3, 5, 10):
        train(cfg, tmp_path, until_step=stop, progress=False)
    assert sorted(p.name for p in tmp_path.glob("snapshot-*.pt")) == ["snapshot-00000008.pt", "snapshot-00000010.pt"]
    train(cfg, tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.glob("snapshot-*.pt")) == ["snapshot-00000008.pt", "snapshot-00000012.pt"]
