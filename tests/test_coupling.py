"""slct.coupling: exact minibatch OT between data and noise (REFERENCE.md [5])."""

import itertools

import numpy as np
import ot
import pytest
import torch

from slct.coupling import couple, ot_coupling


def _cost(x, noise, perm):
    return (x.double() - noise[perm].double()).flatten(1).square().sum().item()


def _is_permutation(perm, n):
    return perm.dtype == torch.int64 and perm.shape == (n,) and torch.equal(perm.sort().values, torch.arange(n))


def test_recovers_a_planted_permutation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, 4, 4, generator=g)
    planted = torch.randperm(32, generator=g)
    noise = x[planted] + 1e-3 * torch.randn(x.shape, generator=g)  # noise[k] is a jittered x[planted[k]]
    perm = ot_coupling(x, noise)
    assert torch.equal(planted[perm], torch.arange(32))  # noise[perm[j]] is x[j]'s copy


@pytest.mark.parametrize("seed,batch", [(0, 2), (1, 7), (2, 16), (3, 33), (4, 64)])
def test_optimal_cost_equals_pot_exact_solver(seed, batch):
    g = torch.Generator().manual_seed(seed)
    x, noise = torch.randn(batch, 3, 4, 4, generator=g) * 2 + 1, torch.randn(batch, 3, 4, 4, generator=g)
    perm = ot_coupling(x, noise)
    assert _is_permutation(perm, batch)
    # the paper's solver: POT's exact EMD with uniform marginals; its optimum times B is the assignment cost
    a, b = x.flatten(1).double().numpy(), noise.flatten(1).double().numpy()
    cost = np.square(a[:, None, :] - b[None, :, :]).sum(-1)
    uniform = np.full(batch, 1 / batch)
    emd_cost = batch * float(np.sum(ot.emd(uniform, uniform, cost) * cost))
    assert _cost(x, noise, perm) == pytest.approx(emd_cost, rel=1e-9)
    assert _cost(x, noise, perm) <= _cost(x, noise, torch.arange(batch)) + 1e-9


@pytest.mark.parametrize("batch", [2, 3, 5, 6])
def test_optimal_against_brute_force(batch):
    g = torch.Generator().manual_seed(batch)
    x, noise = torch.randn(batch, 5, generator=g), torch.randn(batch, 5, generator=g)
    best = min(_cost(x, noise, torch.tensor(p)) for p in itertools.permutations(range(batch)))
    assert _cost(x, noise, ot_coupling(x, noise)) == pytest.approx(best, rel=1e-12)


def test_deterministic_and_a_permutation_under_ties():
    g = torch.Generator().manual_seed(5)
    x, noise = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    assert torch.equal(ot_coupling(x, noise), ot_coupling(x, noise))
    same = torch.zeros(8, 3)  # every pairing has the same (zero) cost
    assert _is_permutation(ot_coupling(same, same), 8)
    pairs = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])  # duplicated points: tied optimal plans
    perm = ot_coupling(pairs, -pairs)
    assert _is_permutation(perm, 4) and _cost(pairs, -pairs, perm) == 0.0


def test_batch_size_one_and_shapes():
    assert ot_coupling(torch.randn(1, 4, 32, 32), torch.randn(1, 4, 32, 32)).tolist() == [0]
    assert _is_permutation(ot_coupling(torch.randn(5), torch.randn(5)), 5)  # scalar samples
    assert ot_coupling(torch.randn(0, 3), torch.randn(0, 3)).shape == (0,)


def test_no_gradient_needed_and_result_on_x_device():
    x = torch.randn(4, 3, requires_grad=True)
    perm = ot_coupling(x, torch.randn(4, 3))
    assert perm.device == x.device and _is_permutation(perm, 4)


@pytest.mark.parametrize("shapes", [((4, 3), (5, 3)), ((4, 3), (4, 2)), ((), ())])
def test_mismatched_shapes(shapes):
    with pytest.raises(ValueError, match="same batch-first shape"):
        ot_coupling(torch.randn(shapes[0]), torch.randn(shapes[1]))


def test_couple_permutes_noise_only():
    g = torch.Generator().manual_seed(9)
    x, noise, labels = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g), torch.arange(8)
    x2, noise2, labels2 = couple(x, noise, labels)
    assert x2 is x and labels2 is labels
    assert torch.equal(noise2, noise[ot_coupling(x, noise)])
    assert _cost(x, noise2, torch.arange(8)) <= _cost(x, noise, torch.arange(8))
