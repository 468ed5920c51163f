"""slct.sigmas: the Karras grid and iCT's weight (REFERENCE.md [1], [2])."""

import math

import pytest
import torch

from slct.sigmas import ct_weight, karras_sigmas


@pytest.mark.parametrize("n", [2, 3, 11, 641])
def test_end_points_are_exact_and_grid_ascends(n):
    sigmas = karras_sigmas(n)
    assert sigmas.shape == (n,) and sigmas.dtype == torch.float64
    assert sigmas[0].item() == 0.002 and sigmas[-1].item() == 80.0
    assert (sigmas[1:] > sigmas[:-1]).all()


def test_middle_point_by_hand():
    # n = 3: t_2 = ((0.002^(1/7) + 80^(1/7)) / 2)^7 = ((0.411553 + 1.870116) / 2)^7 = 1.140835^7
    assert karras_sigmas(3)[1].item() == pytest.approx(2.515219, rel=1e-6)
    # n = 5, i = 2 sits at the same ramp position 1/2
    assert karras_sigmas(5)[2].item() == pytest.approx(2.515219, rel=1e-6)


def test_rho_one_is_uniform_and_dtype_device_options():
    uniform = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    assert torch.allclose(karras_sigmas(5, 1.0, 5.0, rho=1.0), uniform)
    s32 = karras_sigmas(11, dtype=torch.float32, device="cpu")
    assert s32.dtype == torch.float32 and s32[0].item() == pytest.approx(0.002)


@pytest.mark.parametrize("kwargs", [dict(n=1), dict(n=0), dict(n=2.0), dict(n=5, sigma_min=0.0),
                                    dict(n=5, sigma_min=80.0, sigma_max=1.0), dict(n=5, rho=0.0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        karras_sigmas(**kwargs)


def test_ct_weight():
    assert ct_weight(0.25, 0.5) == 4.0
    lo, hi = torch.tensor([0.002, 1.0]), torch.tensor([0.004, 3.0])
    assert torch.allclose(ct_weight(lo, hi), torch.tensor([500.0, 0.5]))
    # on the grid: lambda(t_1) for N = 641 is 1 / (t_2 - t_1), t_2 computed from the formula by hand
    t2 = (0.002 ** (1 / 7) + (80 ** (1 / 7) - 0.002 ** (1 / 7)) / 640) ** 7
    s = karras_sigmas(641)
    assert ct_weight(s[0], s[1]).item() == pytest.approx(1 / (t2 - 0.002), rel=1e-9)
    with pytest.raises(ValueError, match="sigma_hi > sigma_lo"):
        ct_weight(0.5, 0.5)
    assert math.isfinite(ct_weight(s[-2], s[-1]).item())
