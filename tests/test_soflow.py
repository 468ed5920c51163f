"""SoFlow (issue "Few-step models...", item 4): the draws, the surrogate's gradient, exactness on a closed-form flow,
training, resume and sampling on the same latents and networks."""

from __future__ import annotations

import math

import pytest
import torch

from slct import checkpoint
from slct.config import load_config
from slct.objectives import ObjectiveConfig, build_objective
from slct.objectives.soflow import MIN_GAP, soflow_draws, soflow_ratio
from slct.training import train
from tiny_run import TINY_RUN

TINY = [*TINY_RUN, "logging.log_every_steps=2", "train.device=cpu", "train.batch_size=8", "checkpoint.every_steps=2"]


def test_draws_put_l_between_s_and_t_and_walk_r_towards_t():
    cfg = ObjectiveConfig(kind="soflow")
    rows = soflow_draws(1000, cfg, 0, 100, torch.Generator().manual_seed(0))
    t, s, l = rows.T
    fm = s == t
    assert int(fm.sum()) == 750 and bool((l[fm] == t[fm]).all())  # 75% flow matching (their ImageNet ratio)
    sc = ~fm
    assert bool((s[sc] <= l[sc]).all() and (l[sc] <= t[sc] - MIN_GAP + 1e-12).all() and (t[sc] >= MIN_GAP).all())
    ratio = ((t - l) / (t - s))[sc & (t - s > 0.01)]
    assert torch.allclose(ratio, torch.full_like(ratio, 0.1), atol=1e-9)  # r(0) = r_init
    assert soflow_ratio(0, 100, 0.1, 0.002) == 0.1 and math.isclose(soflow_ratio(100, 100, 0.1, 0.002), 0.002)
    assert math.isclose(soflow_ratio(50, 100, 0.1, 0.002), math.sqrt(0.1 * 0.002))  # exponential in the step


def test_the_consistency_surrogate_has_the_gradient_of_the_squared_difference_quotient():
    """The term's gradient points along -d/dtheta of w ||q||^2 scaled by (t - l)/(t - s) (the official form)."""
    cfg = ObjectiveConfig(kind="soflow", soflow_fm_fraction=0.0, coupling="none")
    objective = build_objective(cfg, 10)
    a = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
    model = lambda x, t, labels=None, h=None: a * x + t.view(-1, 1, 1, 1) * 0.1  # noqa: E731
    x0, z = torch.randn(4, 1, 2, 2, dtype=torch.float64), torch.randn(4, 1, 2, 2, dtype=torch.float64)
    rows = soflow_draws(4, cfg, 3, 10, torch.Generator().manual_seed(1))
    terms = objective(model, x0, 3, noise=z, indices=rows, dropout_seed=0)
    (g_surrogate,) = torch.autograd.grad(terms.total.mean(), a)
    t, s, l = (rows[:, i].view(-1, 1, 1, 1) for i in range(3))
    xt, xl = x0 + t * (z - x0), x0 + l * (z - x0)
    f_t = xt - (t - s) * model(xt, t.flatten())
    f_l = (xl - (l - s) * model(xl, l.flatten())).detach()
    q = (f_t - f_l) / (t - l)
    w = 1 / (q.detach().pow(2).flatten(1).mean(1) + cfg.soflow_eps) ** cfg.soflow_p
    direct = (0.5 * w * q.pow(2).flatten(1).mean(1) * ((t - l) / (t - s)).flatten()).mean()
    (g_direct,) = torch.autograd.grad(direct, a)
    assert torch.allclose(g_surrogate, g_direct, rtol=1e-9)


def test_a_run_trains_resumes_bitwise_and_samples_in_1_and_2_steps(tmp_path):
    sets = [*TINY, "train.total_steps=6"]
    train(load_config("soflow", "digits", sets=sets), tmp_path / "whole", progress=False)
    train(load_config("soflow", "digits", sets=sets), tmp_path / "sliced", until_step=3, progress=False)
    train(load_config("soflow", "digits", sets=sets), tmp_path / "sliced", progress=False)
    a = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "whole"))["model"]
    b = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "sliced"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    from slct.sampling import load_snapshot

    snap = load_snapshot(tmp_path / "whole")
    for nfe in (1, 2):
        z = snap.sample_latents([0, 1], nfe)
        assert z.shape == (2, 1, 8, 8) and bool(torch.isfinite(z).all())


@pytest.mark.parametrize("key, value, message", [("soflow_fm_fraction", 1.5, "soflow_fm_fraction must be in"),
                                                 ("soflow_r_end", 0.0, "soflow_r_end must be in"),
                                                 ("soflow_eps", -1.0, "soflow_eps must be > 0")])
def test_its_fields_are_validated(key, value, message):
    with pytest.raises(ValueError, match=message):
        ObjectiveConfig(kind="soflow", **{key: value}).validate()
