"""slct.curriculum: N(k), the lognormal timestep distribution, c and the diffusion mask
(REFERENCE.md [2]-[4]; paper eqs. 9-11)."""

import math

import pytest
import torch
from scipy.stats import chisquare

from slct.curriculum import (
    C_SCHEDULES,
    c_schedule,
    diffusion_loss_mask,
    num_scales,
    sample_timestep_indices,
    stage_length_steps,
    timestep_probabilities,
)

CURRICULUM_N = [11, 21, 41, 81, 161, 321, 641]


# --- eq. 10 ---------------------------------------------------------------------------------


def test_stage_length():
    assert stage_length_steps(700) == 100  # 700 / (log2 64 + 1) = 700 / 7
    assert stage_length_steps(699) == 99
    assert stage_length_steps(800, s1=1280) == 100  # 800 / (log2 128 + 1)
    assert stage_length_steps(3) == 1  # eq. 10 gives 0 here: one step per stage instead


def test_num_scales_at_stage_boundaries():
    # K = 700 -> K' = 100: N doubles its intervals at k = 100, 200, ..., 600 and then stays
    expected = {0: 11, 99: 11, 100: 21, 199: 21, 200: 41, 300: 81, 400: 161, 500: 321, 599: 321,
                600: 641, 699: 641, 700: 641, 10**15: 641}
    assert {k: num_scales(k, 700) for k in expected} == expected
    assert [num_scales(100 * j, 700) for j in range(7)] == CURRICULUM_N


def test_num_scales_ict_cifar_variant():
    assert [num_scales(100 * j, 800, s1=1280) for j in range(9)] == CURRICULUM_N + [1281, 1281]


def test_num_scales_short_run_walks_one_stage_per_step():
    assert [num_scales(k, 3) for k in range(9)] == CURRICULUM_N + [641, 641]


@pytest.mark.parametrize("kwargs", [dict(step=-1, total_steps=10), dict(step=0, total_steps=0),
                                    dict(step=0, total_steps=10, s0=0), dict(step=0, total_steps=10, s0=10, s1=5),
                                    dict(step=1.5, total_steps=10)])
def test_num_scales_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        num_scales(**kwargs)


# --- lognormal timestep distribution --------------------------------------------------------


def _erf_probs(sigmas, p_mean=-1.1, p_std=2.0):
    cdf = [math.erf((math.log(t) - p_mean) / (math.sqrt(2) * p_std)) for t in sigmas]
    mass = [b - a for a, b in zip(cdf[:-1], cdf[1:])]
    return [m / sum(mass) for m in mass]


def test_timestep_probabilities_by_hand():
    p = timestep_probabilities(3)
    assert p.dtype == torch.float64 and p.shape == (2,)
    # grid (0.002, 2.515219, 80): P(0) ∝ erf((ln 2.515219 + 1.1)/(2 sqrt2)) - erf((ln 0.002 + 1.1)/(2 sqrt2))
    assert p.tolist() == pytest.approx([0.8458119, 0.1541881], abs=1e-6)
    assert timestep_probabilities(2).tolist() == [1.0]
    p = timestep_probabilities(641)
    assert p.shape == (640,) and p.sum().item() == pytest.approx(1.0, abs=1e-12) and (p > 0).all()


def test_index_frequencies_match_erf_probabilities():
    n, draws = 11, 30000
    grid = [(0.002 ** (1 / 7) + j / (n - 1) * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7 for j in range(n)]
    probs = _erf_probs(grid)
    g = torch.Generator().manual_seed(1234)
    idx = sample_timestep_indices(n, draws, generator=g)
    assert idx.dtype == torch.int64 and idx.shape == (draws,)
    assert idx.min() >= 0 and idx.max() <= n - 2
    counts = torch.bincount(idx, minlength=n - 1).tolist()
    assert chisquare(counts, [p * draws for p in probs]).pvalue > 1e-3


def test_index_sampling_is_driven_by_the_given_rng():
    a = sample_timestep_indices(41, 64, generator=torch.Generator().manual_seed(7))
    b = sample_timestep_indices(41, 64, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    torch.manual_seed(3)
    c = sample_timestep_indices(41, 64)
    torch.manual_seed(3)
    assert torch.equal(c, sample_timestep_indices(41, 64, device="cpu"))
    assert sample_timestep_indices(41, 0).shape == (0,)


# --- c (eq. 11 and variants) ----------------------------------------------------------------


def test_c_schedules_golden_values():
    assert set(C_SCHEDULES) == {"fixed", "adaptive", "adaptive-code"}
    for n in (11, 21, 641):  # iCT's c0 = 0.00054 sqrt(4096) = 0.00054 * 64
        assert c_schedule("fixed", n, 4096) == pytest.approx(0.03456, rel=1e-12)
    # paper eq. 11: exp(-1.18 ln 10 - 0.72), exp(-1.18 ln 20 - 0.72), exp(-1.18 ln 640 - 0.72)
    assert c_schedule("adaptive", 11, 4096) == pytest.approx(0.0321594, rel=1e-5)
    assert c_schedule("adaptive", 21, 4096) == pytest.approx(0.0141936, rel=1e-5)
    assert c_schedule("adaptive", 641, 4096) == pytest.approx(0.000238, abs=5e-7)  # 3 significant figures
    # authors' code: c0 in the first stage, then exp(-1.15 ln(N-1) - 0.85)
    assert c_schedule("adaptive-code", 11, 4096) == pytest.approx(0.03456, rel=1e-12)
    assert c_schedule("adaptive-code", 21, 4096) == pytest.approx(0.0136, abs=5e-5)
    assert c_schedule("adaptive-code", 641, 4096) == pytest.approx(0.000253, abs=5e-7)


def test_c0_override_and_bad_arguments():
    assert c_schedule("fixed", 11, 4096, c0=0.1) == 0.1
    assert c_schedule("adaptive-code", 11, 4096, c0=0.1) == 0.1
    assert c_schedule("adaptive-code", 21, 4096, s0=20, c0=0.1) == 0.1  # first stage of s0 = 20
    with pytest.raises(ValueError, match="adaptive"):
        c_schedule("huber", 11, 4096)
    for kwargs in (dict(n_scales=1, dim=4), dict(n_scales=11, dim=0), dict(n_scales=11, dim=4, c0=-1.0),
                   dict(n_scales=11, dim=4, c0=float("nan"))):
        with pytest.raises(ValueError):
            c_schedule("fixed", **kwargs)


# --- eq. 9 selection ------------------------------------------------------------------------


@pytest.mark.parametrize("n", CURRICULUM_N)
def test_diffusion_mask_equals_authors_convention(n):
    i = torch.arange(n - 1)  # every ascending lower index
    k = n - 2 - i  # the same pairs indexed from sigma_max, as in the authors' code
    assert torch.equal(diffusion_loss_mask(i, n, 0.25), k >= int(0.75 * n))


def test_diffusion_mask_fraction():
    i = torch.arange(640)
    assert diffusion_loss_mask(i, 641, 0.25).sum() == 160  # floor(641 / 4)
    assert diffusion_loss_mask(i[:10], 11, 0.6).tolist() == [True] * 6 + [False] * 4  # floor(6.6)
    assert diffusion_loss_mask(i, 641, 1.0).all()
    assert not diffusion_loss_mask(i, 641, 0.0).any()
    assert diffusion_loss_mask(i.reshape(2, 320), 641, 0.25).shape == (2, 320)


@pytest.mark.parametrize("r", [-0.1, 1.5, float("nan"), "0.25"])
def test_diffusion_mask_bad_r(r):
    with pytest.raises(ValueError, match="r must"):
        diffusion_loss_mask(torch.arange(3), 11, r)


def test_diffusion_mask_bad_indices():
    with pytest.raises(ValueError, match="indices"):
        diffusion_loss_mask(torch.zeros(3), 11, 0.25)


def test_minimum_stage_length_keeps_the_doubling_and_walks_fewer_stages():
    from slct.curriculum import curriculum_stages

    # eq. 10 at K = 2,000: seven stages of 285 steps (the last one runs to K)
    stages = curriculum_stages(2000)
    assert [s["n_scales"] for s in stages] == [11, 21, 41, 81, 161, 321, 641]
    assert [s["steps"] for s in stages] == [285] * 6 + [290] and sum(s["steps"] for s in stages) == 2000
    # a floor of 500 steps per stage: the same doubling, four stages, N ends at 81
    assert stage_length_steps(2000, 10, 640, 500) == 500
    stages = curriculum_stages(2000, 10, 640, 500)
    assert [(s["start"], s["steps"], s["n_scales"]) for s in stages] == [
        (0, 500, 11), (500, 500, 21), (1000, 500, 41), (1500, 500, 81)]
    assert [num_scales(k, 2000, 10, 640, 500) for k in (0, 499, 500, 1999, 5000)] == [11, 11, 21, 81, 641]
    # a floor below eq. 10's own stage length changes nothing (the paper's runs)
    assert all(num_scales(k, 295_313, 10, 640, 1000) == num_scales(k, 295_313) for k in range(0, 295_313, 997))


def test_utkface64s_curriculum_end_leaves_runs_of_at_most_500_steps_unchanged():
    """The utkface64 preset stops eq. 10 at N = 81 (s1 = 80) with its 125-step floor: at 2,000 steps four stages of
    500, and any run of at most 500 steps (the leaderboard's tuned entries) walks exactly what s1 = 640 gives."""
    from slct.config import load_config
    from slct.curriculum import curriculum_stages

    obj = load_config("ilct", "utkface64").objective
    assert (obj.s0, obj.s1, obj.min_stage_steps) == (10, 80, 125)
    assert [(s["steps"], s["n_scales"]) for s in curriculum_stages(2000, obj.s0, obj.s1, obj.min_stage_steps)] == \
        [(500, 11), (500, 21), (500, 41), (500, 81)]
    for total in (1, 7, 100, 374, 375, 499, 500):
        assert curriculum_stages(total, 10, 80, 125) == curriculum_stages(total, 10, 640, 125)
        assert [num_scales(k, total, 10, 80, 125) for k in range(total)] == \
            [num_scales(k, total, 10, 640, 125) for k in range(total)]
    # beyond 500 steps they part: the paper's end keeps doubling past 81
    assert num_scales(700, 800, 10, 640, 125) == 321 and num_scales(700, 800, 10, 80, 125) == 81


def test_calibrated_c_puts_the_chosen_quantile_at_the_cauchy_knee():
    from slct.curriculum import calibrated_c

    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0, float("nan")])  # non-finite distances are ignored
    c = calibrated_c(r, 0.5)
    assert c == pytest.approx(math.sqrt(3.0 / 2))  # median 3 -> r / (2 c^2) = 1 there
    ratio = r[:5] / (2 * c * c)
    assert float((ratio <= 1).float().mean()) == pytest.approx(0.6)  # at or below the knee: the lower half
    assert calibrated_c(r, 0.9) > c
    with pytest.raises(ValueError, match="quantile"):
        calibrated_c(r, 1.0)


def test_the_run_says_when_its_curriculum_does_not_fit_its_length(capsys):
    """--dry-run (and train, before its first step) notes a short-run curriculum cap on a long run, and stages
    shorter than RAdam's memory; a run the settings fit gets no note."""
    from slct.cli import main
    from slct.commands.train import curriculum_notes
    from slct.config import load_config

    def notes(preset, data_preset, steps, **objective):
        return curriculum_notes(load_config(preset, data_preset, overrides={"train": {"total_steps": steps},
                                                                           "objective": objective}))

    assert notes("ilct", "utkface64", 2000) == []  # the preset's own length
    [long] = notes("slct", "utkface64", 30_000)
    assert "stops at N = 81" in long and "objective.s1=640" in long
    assert notes("slct", "utkface64", 30_000, s1=640) == [] and notes("ldm", "utkface64", 30_000) == []
    [short] = notes("slct", None, 2000)  # the paper's curriculum squeezed into 2,000 steps: stages of 285
    assert "stages of 285 steps" in short and "min_stage_steps" in short
    assert main(["train", "--preset", "slct", "--data-preset", "utkface64", "--steps", "30000", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stage length K': 7,500 steps" in out and "note: the curriculum stops at N = 81" in out
