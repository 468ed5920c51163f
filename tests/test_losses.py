"""slct.losses: robust distances, paper eqs. 6-8, in both reductions (REFERENCE.md [3])."""

import math

import pytest
import torch

from slct.losses import LOSSES, register_loss, robust_loss

# two samples of 4 elements; residuals x - y = (1, 1, 1, 1) and (3, 0, 0, 1)
#   "mean": r = (1, 2.5)      "sum": r = (4, 10)       c = 0.5, so c^2 = 0.25
Y = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, -2.0, 0.25]], dtype=torch.float64)
X = Y + torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
HAND = {
    ("l2", "mean"): [1.0, 2.5],
    ("l2", "sum"): [4.0, 10.0],
    ("l1", "mean"): [1.0, 1.0],
    ("l1", "sum"): [4.0, 4.0],
    # sqrt(r + c^2) - c
    ("pseudo_huber", "mean"): [math.sqrt(1.25) - 0.5, math.sqrt(2.75) - 0.5],  # 0.618034, 1.158312
    ("pseudo_huber", "sum"): [math.sqrt(4.25) - 0.5, math.sqrt(10.25) - 0.5],  # 1.561553, 2.701562
    # log(1 + r / (2 c^2)) = log(1 + 2r)
    ("cauchy", "mean"): [math.log(3.0), math.log(6.0)],
    ("cauchy", "sum"): [math.log(9.0), math.log(21.0)],
    # 2r / (r + 4c^2) = 2r / (r + 1)
    ("geman_mcclure", "mean"): [1.0, 5.0 / 3.5],
    ("geman_mcclure", "sum"): [8.0 / 5.0, 20.0 / 11.0],
}


def test_registry_has_the_paper_losses():
    assert {"l2", "l1", "pseudo_huber", "cauchy", "geman_mcclure"} <= set(LOSSES)


@pytest.mark.parametrize("name,reduction", sorted(HAND))
def test_hand_values(name, reduction):
    out = robust_loss(name, X, Y, c=0.5, reduction=reduction)
    assert out.shape == (2,) and out.dtype == torch.float64
    assert out.tolist() == pytest.approx(HAND[(name, reduction)], rel=1e-12)


def test_mean_is_the_default_and_sample_shape_is_free():
    x4, y4 = X.reshape(2, 1, 2, 2), Y.reshape(2, 1, 2, 2)
    assert torch.equal(robust_loss("cauchy", x4, y4, 0.5), robust_loss("cauchy", X, Y, 0.5, "mean"))
    v = robust_loss("l2", torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0]))  # (B,): one element each
    assert v.tolist() == [4.0, 0.0]


def test_cauchy_grows_logarithmically_and_geman_mcclure_is_bounded():
    r = torch.tensor([1e2, 1e4, 1e6, 1e8], dtype=torch.float64)
    x, y = r.sqrt()[:, None], torch.zeros(4, 1, dtype=torch.float64)
    cauchy = robust_loss("cauchy", x, y, 1.0)
    assert cauchy.tolist() == pytest.approx([math.log1p(v / 2) for v in r.tolist()], rel=1e-12)
    assert cauchy[3] - cauchy[2] == pytest.approx(math.log(100), rel=1e-4)  # x100 in r adds ln 100
    gm = robust_loss("geman_mcclure", x, y, 1.0)
    assert (gm < 2).all() and gm[3] == pytest.approx(2.0, rel=1e-7)


def test_pseudo_huber_is_linear_for_large_and_quadratic_for_small_residuals():
    big = torch.tensor([[1e4]])
    assert robust_loss("pseudo_huber", big, torch.zeros(1, 1), 0.5).item() == pytest.approx(1e4 - 0.5, rel=1e-6)
    # r << c^2: sqrt(r + c^2) - c ~ r / (2c); float32 must not cancel to 0
    small = torch.full((1, 4), 1e-4, dtype=torch.float32)  # r = 1e-8
    value = robust_loss("pseudo_huber", small, torch.zeros(1, 4), 0.1).item()
    assert value == pytest.approx(1e-8 / 0.2, rel=1e-5)


def test_computes_in_float32_from_bf16():
    x, y = X.to(torch.bfloat16), Y.to(torch.bfloat16)
    out = robust_loss("cauchy", x, y, 0.5)
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx(HAND[("cauchy", "mean")], rel=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert robust_loss("pseudo_huber", X.float(), Y.float(), 0.5).dtype == torch.float32


def test_gradients_are_finite_at_zero_residual():
    x = Y.clone().requires_grad_(True)
    for name in ("pseudo_huber", "cauchy", "geman_mcclure", "l2"):
        robust_loss(name, x, Y, 0.5).sum().backward()
        assert torch.isfinite(x.grad).all() and (x.grad == 0).all()
        x.grad = None


def test_register_loss_adds_one_function():
    @register_loss("welsch_test")
    def welsch(residual, c, reduce):
        return 1 - torch.exp(-reduce(residual.square()) / (2 * c**2))

    try:
        assert robust_loss("welsch_test", X, Y, 0.5).tolist() == pytest.approx([1 - math.exp(-2), 1 - math.exp(-5)])
        with pytest.raises(ValueError, match="already registered"):
            register_loss("welsch_test")(welsch)
    finally:
        del LOSSES["welsch_test"]


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (("huber", X, Y, 0.5), {}, "loss name"),
        (("cauchy", X, Y, 0.5), {"reduction": "max"}, "reduction"),
        (("cauchy", X, Y[:1], 0.5), {}, "same batch-first shape"),
        (("cauchy", X, Y.T, 0.5), {}, "same batch-first shape"),
        (("cauchy", torch.tensor(1.0), torch.tensor(1.0), 0.5), {}, "same batch-first shape"),
        (("cauchy", X, Y, 0.0), {}, "c must"),
        (("cauchy", X, Y, -1.0), {}, "c must"),
        (("pseudo_huber", X, Y, float("inf")), {}, "c must"),
        (("geman_mcclure", X, Y, None), {}, "c must"),
        (("cauchy", X, Y, torch.tensor([0.5, 0.5])), {}, "c must"),
    ],
)
def test_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        robust_loss(*args, **kwargs)


def test_losses_without_c_accept_none():
    assert robust_loss("l2", X, Y).tolist() == HAND[("l2", "mean")]
    assert robust_loss("l1", X, Y, None, "sum").tolist() == HAND[("l1", "sum")]
