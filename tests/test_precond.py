"""slct.precond: the consistency / EDM parameterisation (REFERENCE.md [1])."""

import math

import pytest
import torch

from slct.precond import PRECOND_KINDS, Precond, PrecondModel
from slct.sigmas import karras_sigmas


class AffineNet(torch.nn.Module):
    """F(x, c_noise) = w * x + c_noise / 100 (per sample), recording what it was given."""

    def __init__(self, out_dtype=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(3.0))
        self.out_dtype = out_dtype
        self.calls = []

    def forward(self, x, noise_labels, class_labels=None):
        self.calls.append((x.detach().clone(), noise_labels.detach().clone(), class_labels))
        out = self.w * x + noise_labels.reshape(-1, *([1] * (x.ndim - 1))) / 100
        return out if self.out_dtype is None else out.to(self.out_dtype)


def test_golden_scalings_at_sigma_one_half():
    s = torch.tensor(0.5)
    p = Precond()
    # c_skip = 0.25 / (0.498^2 + 0.25), c_out = 0.498 * 0.5 / sqrt(0.5), c_in = 1 / sqrt(0.5), c_noise = 250 ln 0.5
    assert p.c_skip(s).item() == pytest.approx(0.25 / 0.498004, rel=1e-6)
    assert p.c_out(s).item() == pytest.approx(0.249 / math.sqrt(0.5), rel=1e-6)
    assert p.c_in(s).item() == pytest.approx(math.sqrt(2), rel=1e-6)
    assert p.c_noise(s).item() == pytest.approx(-173.28680, rel=1e-6)
    e = Precond(kind="edm")
    assert e.c_skip(s).item() == pytest.approx(0.5, rel=1e-6)
    assert e.c_out(s).item() == pytest.approx(0.25 / math.sqrt(0.5), rel=1e-6)
    assert e.c_in(s).item() == pytest.approx(math.sqrt(2), rel=1e-6)
    assert e.c_noise(s).item() == pytest.approx(-173.28680, rel=1e-6)
    assert set(PRECOND_KINDS) == {"consistency", "edm"}


def test_boundary_condition_is_exact():
    p = Precond()
    for s in (torch.tensor(0.002), torch.tensor(0.002, dtype=torch.float64), karras_sigmas(11)[0], 0.002):
        assert p.c_skip(s).item() == 1.0 and p.c_out(s).item() == 0.0
    model = PrecondModel(AffineNet(), p)
    x = torch.randn(3, 4, 5, 5) * 10
    grid64, grid32 = karras_sigmas(641), karras_sigmas(641, dtype=torch.float32)
    for sigma in (0.002, torch.full((3,), 0.002), grid64[:1].expand(3), grid32[0]):
        assert torch.equal(model(x, sigma), x)


def test_broadcast_shapes_and_large_sigma():
    s = karras_sigmas(5)
    p = Precond()
    assert p.c_skip(s).shape == (5,) and p.c_skip(s.reshape(5, 1, 1, 1)).shape == (5, 1, 1, 1)
    assert p.c_skip(80.0).item() == pytest.approx(0.25 / (79.998**2 + 0.25), rel=1e-5)
    assert p.c_out(80.0).item() == pytest.approx(79.998 * 0.5 / math.sqrt(6400.25), rel=1e-6)


def test_model_forward_by_hand():
    net = AffineNet()
    model = PrecondModel(net, Precond())
    x = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    sigma = torch.tensor([0.5, 2.0])
    labels = torch.tensor([3, 1])
    out = model(x, sigma, labels)
    for j, s in enumerate([0.5, 2.0]):
        c_skip = 0.25 / ((s - 0.002) ** 2 + 0.25)
        c_out = (s - 0.002) * 0.5 / math.sqrt(s**2 + 0.25)
        c_in, c_noise = 1 / math.sqrt(s**2 + 0.25), 250 * math.log(s)
        expected = [c_skip * v + c_out * (3.0 * c_in * v + c_noise / 100) for v in x[j].tolist()]
        assert out[j].tolist() == pytest.approx(expected, rel=1e-5)
    x_in, noise_labels, class_labels = net.calls[-1]
    assert noise_labels.shape == (2,) and class_labels is labels
    assert noise_labels.tolist() == pytest.approx([250 * math.log(0.5), 250 * math.log(2.0)], rel=1e-6)


def test_sigma_shapes_are_equivalent():
    model = PrecondModel(AffineNet())
    x = torch.randn(2, 3, 4, 4)
    ref = model(x, torch.tensor([0.7, 0.7]))
    for sigma in (0.7, torch.tensor(0.7), torch.full((2, 1, 1, 1), 0.7), torch.tensor([0.7], dtype=torch.float64)):
        assert torch.allclose(model(x, sigma), ref)
    with pytest.raises(ValueError, match="sigma must"):
        model(x, torch.ones(3))


def test_float32_math_around_a_low_precision_backbone():
    model = PrecondModel(AffineNet(out_dtype=torch.bfloat16))
    x = torch.randn(2, 3, dtype=torch.bfloat16)
    out = model(x, torch.tensor([1.0, 5.0]))
    assert out.dtype == torch.float32
    out.sum().backward()
    assert model.net.w.grad is not None


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        Precond(kind="vp")
    with pytest.raises(ValueError, match="sigma_data"):
        Precond(sigma_data=0.0)
    with pytest.raises(ValueError, match="sigma_min"):
        Precond(sigma_min=-1.0)
