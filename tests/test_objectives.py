"""slct.objectives: the sLCT consistency objective and the EDM baseline (REFERENCE.md [2]-[5])."""

import dataclasses
import math

import pytest
import torch

from slct.coupling import ot_coupling
from slct.curriculum import sample_timestep_indices
from slct.objectives import ConsistencyObjective, EDMObjective, LossTerms, ObjectiveConfig, build_objective
from slct.precond import PrecondModel
from slct.sigmas import karras_sigmas


class ScaleModel(torch.nn.Module):
    """f(x, sigma) = a * x (optionally times a dropout mask), recording every call."""

    def __init__(self, a=0.9, dropout=0.0, dtype=torch.float64):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=dtype))
        self.dropout = torch.nn.Dropout(dropout)
        self.calls = []

    def forward(self, x, sigma, class_labels=None):
        mask = self.dropout(torch.ones_like(x))
        out = self.a * x * mask
        self.calls.append(dict(x=x.detach().clone(), sigma=sigma.detach().clone(), grad=torch.is_grad_enabled(),
                               mask=mask, out=out.detach().clone(), labels=class_labels))
        return out


class TinyNet(torch.nn.Module):
    """A backbone with the project's signature net(x, noise_labels, class_labels=None)."""

    def __init__(self, channels=4):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = torch.nn.Linear(1, channels)

    def forward(self, x, noise_labels, class_labels=None):
        return self.conv(x) + self.emb(noise_labels[:, None] / 250)[:, :, None, None]


class DropoutNet(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.dropout = torch.nn.Dropout(p)

    def forward(self, x, noise_labels, class_labels=None):
        return self.dropout(x)


def _indices(seed, n_scales, batch):
    """The objective's index draw for a given generator seed when `noise` is passed in."""
    return sample_timestep_indices(n_scales, batch, generator=torch.Generator().manual_seed(seed))


def _call(objective, model, x0, step=0, seed=0, **kwargs):
    return objective(model, x0, step, generator=torch.Generator().manual_seed(seed), **kwargs)


# --- configuration --------------------------------------------------------------------------


def test_config_defaults_are_the_released_recipe():
    assert dataclasses.asdict(ObjectiveConfig()) == dict(
        kind="consistency", sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0, p_mean=-1.1, p_std=2.0,
        s0=10, s1=640, min_stage_steps=0, loss="cauchy", loss_reduction="mean", c_schedule="adaptive",
        c_calibration_quantile=0.5, c_calibration_batches=4, c_calibration_bounds=[1e-5, 1.0], c0=None,
        diffusion_r=0.25, diffusion_weight=5.0, diffusion_weighting="edm", diffusion_sigma="hi", target_ema=0.0,
        coupling="ot",
        teacher="", edm_p_mean=-1.2, edm_p_std=1.2, fm_t_mean=0.0, fm_t_std=1.0, flow_t_mean=-0.4, flow_t_std=1.0, meanflow_r_fraction=0.25,
        meanflow_p=1.0, meanflow_c=1e-3, meanflow_derivative="jvp", meanflow_fd_eps=1e-3,
        meanflow_boundary_fraction=0.0, shortcut_max_steps=128,
        shortcut_bootstrap=0.25, shortcut_targets="online", soflow_fm_fraction=0.75, soflow_t_mean=0.2,
        soflow_t_std=0.8, soflow_s_mean=-1.0, soflow_s_std=0.8, soflow_fm_t_mean=-0.2, soflow_fm_t_std=1.0,
        soflow_r_init=0.1, soflow_r_end=0.002, soflow_p=1.0, soflow_eps=0.01,
        soflow_target_rows="consistency")
    assert ObjectiveConfig().validate() == ObjectiveConfig()


@pytest.mark.parametrize("field,value,match", [
    ("kind", "vp", r"kind must be one of \['consistency', 'distillation', 'edm', 'fm', 'meanflow', 'shortcut', "
                   r"'soflow'\]"),
    ("meanflow_derivative", "reverse", "meanflow_derivative must be one of"), ("shortcut_max_steps", 96,
                                                                              "power of 2"),
    ("meanflow_r_fraction", 1.5, "meanflow_r_fraction"), ("flow_t_std", 0.0, "flow_t_std"),
    ("loss", "huber", r"loss must be one of \['cauchy', 'geman_mcclure', 'l1', 'l2', 'pseudo_huber'"),
    ("loss_reduction", "max", r"loss_reduction must be one of \['mean', 'sum'\]"),
    ("c_schedule", "cosine", r"c_schedule must be one of \['adaptive', 'adaptive-code', 'calibrated', 'fixed'\]"),
    ("c_calibration_quantile", 1.0, "c_calibration_quantile"), ("min_stage_steps", -1, "min_stage_steps"),
    ("diffusion_weighting", "snr", r"diffusion_weighting must be one of \['edm', 'none'\]"),
    ("diffusion_sigma", "mid", r"diffusion_sigma must be one of \['hi', 'lo'\]"),
    ("coupling", "sinkhorn", r"coupling must be one of \['none', 'ot'\]"),
    ("sigma_min", 0.0, "sigma_min"), ("sigma_max", 0.001, "sigma_max"), ("sigma_data", -0.5, "sigma_data"),
    ("rho", 0.0, "rho"), ("p_std", 0.0, "p_std"), ("p_mean", float("nan"), "p_mean"), ("s0", 0, "s0"),
    ("s1", 5, "s1"), ("s0", 2.5, "s0"), ("c0", 0.0, "c0"), ("diffusion_r", 1.5, "diffusion_r"),
    ("diffusion_r", -0.1, "diffusion_r"), ("diffusion_weight", -1.0, "diffusion_weight"),
    ("edm_p_std", 0.0, "edm_p_std"), ("edm_p_mean", float("inf"), "edm_p_mean"),
])
def test_validate_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(ObjectiveConfig(), **{field: value}).validate()
    with pytest.raises(ValueError, match=match):
        ConsistencyObjective(dataclasses.replace(ObjectiveConfig(), **{field: value}), 10)


def test_build_objective_registry():
    cons = build_objective(ObjectiveConfig(), 100)
    edm = build_objective(ObjectiveConfig(kind="edm"), 100)
    assert isinstance(cons, ConsistencyObjective) and cons.precond.kind == "consistency"
    assert isinstance(edm, EDMObjective) and edm.precond.kind == "edm"
    with pytest.raises(ValueError, match="kind must be one of"):
        build_objective(ObjectiveConfig(kind="flow"), 100)
    with pytest.raises(ValueError, match="total_steps"):
        build_objective(ObjectiveConfig(), 0)


# --- consistency objective: the loss and its gradient ---------------------------------------


def test_hand_computed_l2_loss_and_online_only_gradient():
    cfg = ObjectiveConfig(loss="l2", coupling="none", diffusion_r=0.0)
    objective, model = ConsistencyObjective(cfg, total_steps=700), ScaleModel(a=0.9)
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    z = torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    terms = _call(objective, model, x0, step=250, seed=5, noise=z)  # step 250 -> N = 41

    sigmas = karras_sigmas(41)
    idx = _indices(5, 41, 6)
    lo, hi = sigmas[idx], sigmas[idx + 1]
    online, target = model.calls
    assert online["grad"] and not target["grad"]
    assert torch.equal(online["sigma"], hi) and torch.equal(target["sigma"], lo)
    assert torch.allclose(online["x"], x0 + hi[:, None, None] * z)
    assert torch.allclose(target["x"], x0 + lo[:, None, None] * z)

    # lambda * mean((a x_hi - a x_lo)^2) = a^2 (t_{i+1} - t_i) mean(z^2)
    hand = 0.81 * (hi - lo) * z.square().mean((1, 2))
    assert torch.allclose(terms.consistency, hand, rtol=1e-10)
    assert torch.equal(terms.diffusion, torch.zeros(6, dtype=torch.float64))
    assert torch.equal(terms.total, terms.consistency)
    assert terms.stats["n_scales"] == 41 and terms.stats["diffusion_fraction"] == 0.0

    # gradient through the online pass only: d/da mean_i lambda_i mean(2 (a x_hi - a x_lo) x_hi)
    terms.total.mean().backward()
    x_hi = x0 + hi[:, None, None] * z
    grad = (2 * 0.9 * (z * x_hi).mean((1, 2))).mean()
    assert model.a.grad.item() == pytest.approx(grad.item(), rel=1e-10)

    # mu = 0: after the update the target is the updated network too
    with torch.no_grad():
        model.a -= 0.1 * model.a.grad
    a_new = model.a.item()
    again = _call(objective, model, x0, step=250, seed=5, noise=z)
    assert torch.allclose(again.consistency, a_new**2 * (hi - lo) * z.square().mean((1, 2)), rtol=1e-10)


def test_total_mean_is_the_authors_reduction():
    cfg = ObjectiveConfig(coupling="none")  # cauchy, r = 0.25, weight 5, EDM weighting, online pass
    objective, model = ConsistencyObjective(cfg, 700), ScaleModel(a=0.7)
    g = torch.Generator().manual_seed(2)
    x0, z = torch.randn(64, 3, generator=g, dtype=torch.float64), torch.randn(64, 3, generator=g, dtype=torch.float64)
    terms = _call(objective, model, x0, step=0, seed=8, noise=z)  # N = 11

    sigmas, idx = karras_sigmas(11), _indices(8, 11, 64)
    lo, hi = sigmas[idx], sigmas[idx + 1]
    online, target = model.calls[0]["out"], model.calls[1]["out"]
    c = math.exp(-1.18 * math.log(10) - 0.72)
    consistency = torch.log1p((online - target).square().mean(1) / (2 * c**2)) / (hi - lo)
    assert torch.allclose(terms.consistency, consistency, rtol=1e-10)

    selected = idx < 2  # floor(11 * 0.25)
    assert 0 < selected.sum() < 64
    mse = (online - x0).square().mean(1)
    diffusion = 5 * ((1 / hi**2 + 1 / 0.25) * mse)[selected].mean()
    assert terms.total.mean().item() == pytest.approx((consistency.mean() + diffusion).item(), rel=1e-10)
    assert torch.equal(terms.diffusion[~selected], torch.zeros(int((~selected).sum()), dtype=torch.float64))
    assert terms.stats["diffusion_fraction"] == selected.sum().item() / 64
    assert terms.stats["c"] == pytest.approx(c, rel=1e-12)


def test_paper_form_diffusion_loss_uses_an_extra_pass_at_t_i():
    cfg = ObjectiveConfig(coupling="none", diffusion_sigma="lo", diffusion_weighting="none", diffusion_weight=1.0,
                          diffusion_r=0.25)
    objective, model = ConsistencyObjective(cfg, 700), ScaleModel(a=1.1)
    g = torch.Generator().manual_seed(4)
    x0, z = torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randn(32, 5, generator=g, dtype=torch.float64)
    labels = torch.arange(32)
    terms = _call(objective, model, x0, step=0, seed=3, noise=z, labels=labels)

    sigmas, idx = karras_sigmas(11), _indices(3, 11, 32)
    selected = idx < 2
    extra = model.calls[2]
    assert len(model.calls) == 3 and extra["grad"]
    assert torch.equal(extra["sigma"], sigmas[idx][selected]) and torch.equal(extra["labels"], labels[selected])
    # || f(x_{t_i}, t_i) - x0 ||^2 (per-element mean), averaged over the selected samples only
    mse = ((1.1 * (x0 + sigmas[idx][:, None] * z) - x0).square().mean(1))[selected]
    assert terms.diffusion.sum().item() / 32 == pytest.approx(mse.mean().item(), rel=1e-10)


def test_empty_selection_contributes_exactly_zero():
    for r in (0.0, 0.05):  # floor(11 * 0.05) = 0: no pair qualifies
        objective, model = ConsistencyObjective(ObjectiveConfig(diffusion_r=r, diffusion_sigma="lo"), 700), ScaleModel()
        terms = _call(objective, model, torch.randn(8, 3, dtype=torch.float64), step=0)
        assert torch.equal(terms.diffusion, torch.zeros(8, dtype=torch.float64))
        assert torch.equal(terms.total, terms.consistency) and torch.isfinite(terms.total).all()
        assert len(model.calls) == 2  # no extra pass


# --- consistency objective: randomness ------------------------------------------------------


def test_dropout_mask_is_shared_by_both_passes():
    objective, model = ConsistencyObjective(ObjectiveConfig(), 700), ScaleModel(dropout=0.5)
    x0 = torch.randn(8, 16, dtype=torch.float64)
    _call(objective, model, x0, seed=1)
    _call(objective, model, x0, seed=2)
    (on1, tg1), (on2, tg2) = (model.calls[0], model.calls[1]), (model.calls[2], model.calls[3])
    assert torch.equal(on1["mask"], tg1["mask"]) and torch.equal(on2["mask"], tg2["mask"])
    assert (on1["mask"] == 0).any() and not torch.equal(on1["mask"], on2["mask"])  # real, fresh masks


def test_global_rng_advances_the_same_with_or_without_dropout():
    objective = ConsistencyObjective(ObjectiveConfig(), 700)
    x0 = torch.randn(8, 16, dtype=torch.float64)
    states = []
    for model in (ScaleModel(dropout=0.0), ScaleModel(dropout=0.5)):
        torch.manual_seed(123)
        objective(model, x0, 0)
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])


def test_deterministic_given_the_rng():
    objective = ConsistencyObjective(ObjectiveConfig(), 700)
    x0 = torch.randn(8, 4, 4, 4)
    model = PrecondModel(DropoutNet(0.3), objective.precond)
    a = _call(objective, model, x0, step=350, seed=9).total
    b = _call(objective, model, x0, step=350, seed=9).total
    torch.manual_seed(0)
    c = objective(model, x0, 350).total
    torch.manual_seed(0)
    assert torch.equal(a, b) and torch.equal(c, objective(model, x0, 350).total)


def test_noise_is_drawn_then_ot_coupled_or_used_as_given():
    objective, model = ConsistencyObjective(ObjectiveConfig(), 700), ScaleModel(dtype=torch.float32)
    x0 = torch.randn(16, 2, 2) * 3
    _call(objective, model, x0, seed=6)  # noise drawn from the generator, then re-paired by OT
    g = torch.Generator().manual_seed(6)
    z = torch.randn(x0.shape, generator=g)
    z = z[ot_coupling(x0, z)]
    hi = karras_sigmas(11)[sample_timestep_indices(11, 16, generator=g) + 1].float()
    assert torch.allclose(model.calls[0]["x"], x0 + hi[:, None, None] * z)

    given = torch.randn(16, 2, 2)  # given noise is used as is (the data pipeline coupled it)
    _call(objective, model, x0, seed=6, noise=given)
    hi = karras_sigmas(11)[_indices(6, 11, 16) + 1].float()
    assert torch.allclose(model.calls[2]["x"], x0 + hi[:, None, None] * given)


def test_objective_is_stateless():
    cfg = ObjectiveConfig()
    before = dataclasses.asdict(cfg)
    objective = ConsistencyObjective(cfg, 700)
    assert objective.cfg is not cfg
    for step in (0, 400, 10**6):
        _call(objective, ScaleModel(), torch.randn(4, 3, dtype=torch.float64), step=step)
    assert dataclasses.asdict(cfg) == before and dataclasses.asdict(objective.cfg) == before


# --- robustness -----------------------------------------------------------------------------


@pytest.mark.parametrize("loss,reduction,diffusion_sigma,step", [
    ("cauchy", "mean", "hi", 0), ("cauchy", "sum", "lo", 699), ("pseudo_huber", "mean", "hi", 699),
    ("geman_mcclure", "sum", "hi", 300), ("l2", "mean", "lo", 0),
])
def test_terms_finite_for_extreme_inputs(loss, reduction, diffusion_sigma, step):
    cfg = ObjectiveConfig(loss=loss, loss_reduction=reduction, diffusion_sigma=diffusion_sigma, diffusion_r=1.0)
    objective = ConsistencyObjective(cfg, 700)
    model = PrecondModel(TinyNet(), objective.precond)
    x0 = 50 * torch.randn(8, 4, 4, 4).sign()
    terms = objective(model, x0, step)
    for t in (terms.consistency, terms.diffusion, terms.total):
        assert t.shape == (8,) and torch.isfinite(t).all()
    terms.total.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert set(terms.stats) >= {"n_scales", "c", "mean_sigma", "mean_weight", "diffusion_fraction"}
    assert all(isinstance(v, float) for v in terms.stats.values())


def test_bad_input():
    objective, model = ConsistencyObjective(ObjectiveConfig(), 700), ScaleModel()
    x0 = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="x0"):
        objective(model, torch.tensor(1.0), 0)
    with pytest.raises(ValueError, match="x0"):
        objective(model, torch.randn(0, 3), 0)
    with pytest.raises(ValueError, match="noise"):
        objective(model, x0, 0, noise=torch.randn(4, 2))
    with pytest.raises(ValueError, match="labels"):
        objective(model, x0, 0, labels=torch.arange(5))
    with pytest.raises(ValueError, match="step"):
        objective(model, x0, -1)
    with pytest.raises(ValueError, match="total_steps"):
        ConsistencyObjective(ObjectiveConfig(), 0)


# --- EDM baseline ---------------------------------------------------------------------------


class ZeroModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.sigmas = []

    def forward(self, x, sigma, class_labels=None):
        self.sigmas.append(sigma.clone())
        return torch.zeros_like(x)


def test_edm_weight_golden_value():
    # sigma pinned at 0.5: weight (0.25 + 0.25) / (0.5 * 0.5)^2 = 8; D = 0, x0 = 0.5 -> mse 0.25
    cfg = ObjectiveConfig(kind="edm", edm_p_mean=math.log(0.5), edm_p_std=1e-12)
    objective, x0 = EDMObjective(cfg, 10), torch.full((3, 2, 2), 0.5)
    terms = objective(ZeroModel(), x0, 0)
    assert terms.total.tolist() == pytest.approx([2.0] * 3, rel=1e-5)
    assert torch.equal(terms.diffusion, terms.total) and torch.equal(terms.consistency, torch.zeros(3))
    summed = EDMObjective(dataclasses.replace(cfg, loss_reduction="sum"), 10)(ZeroModel(), x0, 0)
    assert summed.total.tolist() == pytest.approx([8.0] * 3, rel=1e-5)  # sum over 4 elements


def test_edm_sigma_distribution_and_weighting():
    objective, model = EDMObjective(ObjectiveConfig(kind="edm"), 10), ZeroModel()
    x0, z = torch.randn(512, 2, dtype=torch.float64), torch.randn(512, 2, dtype=torch.float64)
    terms = objective(model, x0, 0, noise=z, generator=torch.Generator().manual_seed(1))
    expected = (torch.randn(512, generator=torch.Generator().manual_seed(1)).double() * 1.2 - 1.2).exp()
    sigma = model.sigmas[0]
    assert torch.allclose(sigma, expected)
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.15)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.1)
    weight = (sigma**2 + 0.25) / (0.25 * sigma**2)
    assert torch.allclose(terms.total, weight * x0.square().mean(1), rtol=1e-10)


def test_edm_objective_trains_a_precond_model():
    objective = EDMObjective(ObjectiveConfig(kind="edm", coupling="none"), 10)
    model = PrecondModel(TinyNet(), objective.precond)
    terms = objective(model, 50 * torch.randn(4, 4, 4, 4).sign(), 3, labels=torch.arange(4))
    assert terms.total.shape == (4,) and torch.isfinite(terms.total).all()
    terms.total.mean().backward()
    assert isinstance(terms, LossTerms) and model.net.conv.weight.grad.abs().sum() > 0


# --- accelerator path (runs where CUDA exists) ----------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_shared_dropout_and_rng_restore():
    objective, model = ConsistencyObjective(ObjectiveConfig(), 700), ScaleModel(dropout=0.5, dtype=torch.float32).cuda()
    x0 = torch.randn(8, 16, device="cuda")
    state = torch.cuda.get_rng_state()
    terms = _call(objective, model, x0, seed=1)
    assert terms.total.device.type == "cuda" and torch.isfinite(terms.total).all()
    assert torch.equal(model.calls[0]["mask"], model.calls[1]["mask"]) and (model.calls[0]["mask"] == 0).any()
    assert torch.equal(torch.cuda.get_rng_state(), state)  # all draws came from the CPU generator
    torch.manual_seed(0)
    objective(model, x0, 0)  # global RNGs: noise from the CUDA stream, indices from the CPU one
    assert torch.equal(model.calls[2]["mask"], model.calls[3]["mask"])


# --- pre-drawn randomness (a data pipeline drawing for the global batch) ---------------------


def test_predrawn_indices_and_seed_draw_nothing():
    objective, model = ConsistencyObjective(ObjectiveConfig(), 700), ScaleModel(dropout=0.5)
    x0, z = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    indices = torch.tensor([0, 1, 2, 9, 9, 5])
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = objective(model, x0, 0, noise=z, indices=indices, dropout_seed=17)
    assert torch.equal(torch.get_rng_state(), before)
    sigmas = karras_sigmas(11)
    assert torch.equal(model.calls[0]["sigma"], sigmas[indices + 1])
    assert torch.equal(model.calls[1]["sigma"], sigmas[indices])
    assert first.stats["diffusion_fraction"] == 2 / 6  # indices 0 and 1 are below floor(11 / 4)
    again = objective(model, x0, 0, noise=z, indices=indices, dropout_seed=17)
    assert torch.equal(first.total, again.total) and torch.equal(model.calls[0]["mask"], model.calls[2]["mask"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(indices=torch.tensor([0, 10])), "indices must lie in"),  # N = 11: lower indices 0..9
    (dict(indices=torch.tensor([-1, 0])), "indices must lie in"),
    (dict(indices=torch.tensor([0.0, 1.0])), "integer tensor"),
    (dict(indices=torch.tensor([0, 1, 2])), "shape"),
    (dict(dropout_seed=-3), "dropout_seed"),
])
def test_predrawn_bad_input(kwargs, match):
    objective = ConsistencyObjective(ObjectiveConfig(), 700)
    with pytest.raises(ValueError, match=match):
        objective(ScaleModel(), torch.randn(2, 3, dtype=torch.float64), 0, **kwargs)


def test_edm_predrawn_seed_and_no_indices():
    objective = EDMObjective(ObjectiveConfig(kind="edm"), 10)
    x0 = torch.randn(4, 3)
    model = DropoutNet(0.5)
    a = objective(PrecondModel(model, objective.precond), x0, 0, noise=torch.ones(4, 3), dropout_seed=5,
                  generator=torch.Generator().manual_seed(0))
    b = objective(PrecondModel(model, objective.precond), x0, 0, noise=torch.ones(4, 3), dropout_seed=5,
                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.total, b.total)
    with pytest.raises(ValueError, match="indices must be None"):
        objective(ZeroModel(), x0, 0, indices=torch.zeros(4, dtype=torch.long))
