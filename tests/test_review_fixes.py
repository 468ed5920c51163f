"""Fixes found in review (issue "Few-step models that beat the diffusion baseline", item 6): the no-decay group by
module type, post-hoc EMA weights that sum to 1, Shortcut targets from the EMA in eval mode, calibrated c with
bounds and each robust loss's own knee."""

from __future__ import annotations

import math

import pytest
import torch

from slct import checkpoint
from slct.config import load_config
from slct.training import train
from tiny_run import TINY_RUN

TINY = [*TINY_RUN, "logging.log_every_steps=1", "train.device=cpu", "train.batch_size=8", "checkpoint.every_steps=2"]


@pytest.mark.parametrize("preset", ["norm-layer-elementwise", "slct-authors-nsln"])
def test_no_decay_reaches_the_per_element_norms_whatever_their_shape(preset):
    from slct.model import build_model
    from slct.training import build_optimizer

    cfg = load_config(preset, "utkface64", sets=["optim.decay_norms_and_biases=false"])
    model = build_model(cfg, (32, 8, 8))
    decay, no_decay = build_optimizer(cfg.optim, model).param_groups
    exempt = {id(p) for p in no_decay["params"]}
    norms = [(n, p) for n, p in model.named_parameters() if ".norm" in n]
    assert any(p.ndim == 3 for _, p in norms)  # the (C, H, W) shifts this is about
    assert all(id(p) in exempt for _, p in norms), [n for n, p in norms if id(p) not in exempt]
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == cfg.optim.weight_decay
    assert all(p.ndim > 1 for p in decay["params"])  # convolution and linear weights only
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    assert biases and all(id(p) in exempt for p in biases)


def test_posthoc_weights_are_an_average_even_where_the_fit_is_not_exact():
    from slct.ema import posthoc_coefficients

    stored = [(t, s) for t in (100, 200, 300) for s in (0.05, 0.1)]
    x = posthoc_coefficients(stored, (320, 0.15))  # past the last store, a wider EMA: no exact fit
    assert math.isclose(float(x.sum()), 1.0, abs_tol=1e-12)


def test_shortcut_targets_from_the_ema_in_eval_mode():
    from slct.objectives import ObjectiveConfig, ShortcutObjective

    class Constant(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value
            self.modes = []

        def forward(self, x, t, labels=None, d=None):
            self.modes.append(self.training)
            return torch.full_like(x, self.value)

    cfg = ObjectiveConfig(kind="shortcut", shortcut_targets="ema", coupling="none", shortcut_bootstrap=0.5)
    objective = ShortcutObjective(cfg, 10)
    assert objective.target_weights == "ema"
    online, ema = Constant(0.0).train(), Constant(3.0).eval()
    x0 = torch.zeros(4, 1, 4, 4)
    terms = objective(online, x0, 0, noise=torch.zeros_like(x0), target_model=ema, dropout_seed=1)
    boot = terms.consistency > 0
    assert boot.sum() == 2  # the bootstrap rows regress the EMA's two half steps: (3 + 3) / 2 = 3 -> mse 9
    assert torch.allclose(terms.consistency[boot], torch.full((2,), 9.0))
    assert ema.modes == [False, False] and online.modes == [True]
    assert ShortcutObjective(ObjectiveConfig(kind="shortcut"), 10).target_weights is None  # the default: online


def test_a_run_with_ema_targets_resumes_bitwise(tmp_path):
    sets = [*TINY, "train.total_steps=6", "objective.shortcut_targets=ema"]
    train(load_config("shortcut", "digits", sets=sets), tmp_path / "whole", progress=False)
    train(load_config("shortcut", "digits", sets=sets), tmp_path / "sliced", until_step=3, progress=False)
    train(load_config("shortcut", "digits", sets=sets), tmp_path / "sliced", progress=False)
    a = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "whole"))["model"]
    b = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "sliced"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    online = load_config("shortcut", "digits", sets=[*TINY, "train.total_steps=6"])
    train(online, tmp_path / "online", progress=False)
    c = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "online"))["model"]
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the targets' source changes training


def test_calibrated_c_uses_each_losss_knee_and_its_bounds():
    from slct.curriculum import calibrated_c
    from slct.losses import LOSSES

    r = torch.full((100,), 0.08)
    assert math.isclose(calibrated_c(r, 0.5, LOSSES["cauchy"].knee), 0.2, rel_tol=1e-6)  # r = 2 c^2
    assert math.isclose(calibrated_c(r, 0.5, LOSSES["pseudo_huber"].knee), math.sqrt(0.08), rel_tol=1e-6)  # r = c^2
    assert math.isclose(calibrated_c(r, 0.5, LOSSES["geman_mcclure"].knee), math.sqrt(0.02), rel_tol=1e-6)  # r = 4 c^2
    assert calibrated_c(torch.zeros(10), 0.5, 2.0, (1e-5, 1.0)) == 1e-5  # a collapsed model: the floor
    assert calibrated_c(torch.full((10,), 1e6), 0.5, 2.0, (1e-5, 1.0)) == 1.0


def test_calibrated_c_is_refused_for_losses_without_a_scale():
    with pytest.raises(ValueError, match="the 'l2' loss has no c"):
        load_config("slct-calibrated-c", "digits", sets=["objective.loss=l2"])
    with pytest.raises(ValueError, match="c_calibration_bounds must be"):
        load_config("slct-calibrated-c", "digits", sets=["objective.c_calibration_bounds=[1.0, 0.1]"])
    cfg = load_config("slct-calibrated-c", "digits", sets=["objective.loss=pseudo_huber"])
    assert cfg.objective.loss == "pseudo_huber"
