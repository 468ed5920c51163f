"""The named norms (REFERENCE.md [6], paper eq. 12): formulas, trainable parameters, dtypes, registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slct.nn import NORMS, norm_layer
from slct.nn.dit import TokenNorm
from slct.nn.norms import group_count

EPS = 1e-5


def _standardise(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)  # biased, as every norm uses
    return (x - mean) / np.sqrt(var + EPS)


def _group_ref(x: np.ndarray, groups: int) -> np.ndarray:
    b, c, h, w = x.shape
    return _standardise(x.reshape(b, groups, c // groups, h, w), (2, 3, 4)).reshape(x.shape)


# name -> reference of the normalised (pre-affine) tensor for x (B, C, H, W), from the definitions
REFERENCE = {
    "group": lambda x: _group_ref(x, group_count(x.shape[1])),
    "instance": lambda x: _standardise(x, (2, 3)),
    "layer": lambda x: _standardise(x, (1, 2, 3)),
    "rms": lambda x: x / np.sqrt((x**2).mean(axis=(1, 2, 3), keepdims=True) + EPS),
    "nonscaling-layer": lambda x: _standardise(x, (1, 2, 3)),
    "nonscaling-group": lambda x: _group_ref(x, group_count(x.shape[1])),
}
HAS_SCALE = {"group": True, "instance": True, "layer": True, "rms": True,
             "nonscaling-layer": False, "nonscaling-group": False}
HAS_SHIFT = {name: name != "rms" for name in REFERENCE}


def test_registry_names():
    # the per-element norms need the feature-map size: tested on their own below
    assert set(NORMS) == set(REFERENCE) | {"layer-elementwise", "nonscaling-layer-elementwise"}
    with pytest.raises(ValueError, match="nonscaling-layer"):  # the message lists the allowed names
        norm_layer("batch", 8)
    with pytest.raises(ValueError, match="channels"):
        norm_layer("layer", 0)


@pytest.mark.parametrize(("channels", "groups"), [(512, 32), (384, 32), (128, 32), (96, 24), (64, 16),
                                                  (32, 8), (100, 25), (12, 3), (3, 1)])
def test_group_count(channels, groups):
    # 32 groups where possible, never fewer than 4 channels per group, always a divisor
    assert group_count(channels) == groups


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_norm_matches_its_formula(name):
    torch.manual_seed(1)
    x = torch.randn(3, 64, 5, 4, dtype=torch.float64) * 3 + 1
    x[0, 5, 2, 2] = 40.0  # an impulsive outlier, the paper's concern
    norm = norm_layer(name, 64)
    scale = torch.rand(64) + 0.5
    shift = torch.randn(64)
    with torch.no_grad():
        if HAS_SCALE[name]:
            norm.weight.copy_(scale)
        if HAS_SHIFT[name]:
            norm.bias.copy_(shift)
    expected = REFERENCE[name](x.numpy())
    if HAS_SCALE[name]:
        expected = expected * scale.numpy()[None, :, None, None]
    if HAS_SHIFT[name]:
        expected = expected + shift.numpy()[None, :, None, None]
    y = norm(x.float())
    assert y.shape == x.shape and y.dtype == torch.float32
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_trainable_parameters(name):
    norm = norm_layer(name, 16)
    params = dict(norm.named_parameters())
    assert ("weight" in params) == HAS_SCALE[name]
    assert ("bias" in params) == HAS_SHIFT[name]
    assert all(p.shape == (16,) for p in params.values())  # per channel: independent of the resolution


@pytest.mark.parametrize("name", ["nonscaling-layer", "nonscaling-group"])
def test_nonscaling_scale_stays_one_after_optimizer_step(name):
    """Eq. 12: the scale is fixed at 1 and not trained; the shift beta is trained."""
    torch.manual_seed(2)
    norm = norm_layer(name, 8)
    assert [n for n, _ in norm.named_parameters()] == ["bias"]
    assert not any("weight" in k for k in norm.state_dict())  # nothing to save or to restore wrongly
    opt = torch.optim.Adam(norm.parameters(), lr=0.1)
    x = torch.randn(4, 8, 3, 3)
    target = 5 * torch.randn(4, 8, 3, 3)
    (norm(x) - target).square().mean().backward()
    opt.step()
    beta = norm.bias.detach()
    assert beta.abs().min() > 0.05  # the shift moved (Adam: ~lr in magnitude)
    # still (x - u) / sqrt(var + eps) * 1 + beta: a unit scale, whatever was optimised
    x2 = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    expected = REFERENCE[name](x2.numpy()) + beta.numpy()[None, :, None, None]
    np.testing.assert_allclose(norm(x2.float()).detach().numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_bf16_input_computed_in_fp32(name):
    torch.manual_seed(3)
    norm = norm_layer(name, 32)
    x = (torch.randn(2, 32, 4, 4) * 100 + 50).bfloat16()  # a large mean: bf16 statistics would lose it
    y = norm(x)
    assert y.dtype == torch.bfloat16
    ref = norm(x.float())  # the same bf16 values, statistics in fp32
    torch.testing.assert_close(y, ref.bfloat16(), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not push the norm into bf16
        assert norm(x.float()).dtype == torch.float32
        torch.testing.assert_close(norm(x.float()), ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_shapes_and_channels_last(name):
    norm = norm_layer(name, 32)
    x = torch.randn(2, 32, 6, 6)
    y = norm(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(norm(x.to(memory_format=torch.channels_last)), y)
    assert norm(torch.randn(5, 32)).shape == (5, 32)  # single tokens
    assert norm(torch.randn(2, 32, 7)).shape == (2, 32, 7)  # token sequences, channels first


def test_token_norm_mapping():
    """DiT pre-norms: "layer" per token over D (nn.LayerNorm over the last dim), "instance" per channel over tokens."""
    torch.manual_seed(4)
    x = torch.randn(2, 5, 16)
    ln = TokenNorm("layer", 16)
    torch.testing.assert_close(ln(x), torch.nn.functional.layer_norm(x, (16,), eps=1e-6))
    ns = TokenNorm("nonscaling-layer", 16)
    with torch.no_grad():
        ns.norm.bias.fill_(0.5)
    torch.testing.assert_close(ns(x), torch.nn.functional.layer_norm(x, (16,), eps=1e-6) + 0.5)
    inorm = TokenNorm("instance", 16)
    expected = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(inorm(x), expected)
    rms = TokenNorm("rms", 16)
    torch.testing.assert_close(rms(x), x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6))


def test_elementwise_nonscaling_layernorm_is_the_authors_frozen_weight_layernorm():
    """The authors' NsLN: nn.LayerNorm([C, H, W]) with its weight frozen at 1 -> a per-element shift, no scale."""
    from slct.nn.norms import NonScalingElementwiseLayerNorm

    norm = norm_layer("nonscaling-layer-elementwise", 6, resolution=4)
    assert isinstance(norm, NonScalingElementwiseLayerNorm)
    assert [(n, tuple(p.shape)) for n, p in norm.named_parameters()] == [("bias", (6, 4, 4))]  # no trainable scale
    reference = torch.nn.LayerNorm([6, 4, 4], eps=1e-5)
    reference.weight.requires_grad_(False)
    with torch.no_grad():
        shift = torch.randn(6, 4, 4)
        norm.bias.copy_(shift)
        reference.bias.copy_(shift)
    x = torch.randn(3, 6, 4, 4) * 5 + 2
    torch.testing.assert_close(norm(x), reference(x), rtol=1e-5, atol=1e-5)
    scaled = norm_layer("layer-elementwise", 6, resolution=4)
    assert {n: tuple(p.shape) for n, p in scaled.named_parameters()} == {"weight": (6, 4, 4), "bias": (6, 4, 4)}
    with pytest.raises(ValueError, match="needs the feature-map size"):
        norm_layer("nonscaling-layer-elementwise", 6)


def test_unet_builds_elementwise_norms_at_every_level_and_dit_refuses_them():
    from slct.nn import build_network

    net = build_network("unet-tiny", in_channels=3, resolution=8, block_norm="nonscaling-layer-elementwise",
                        out_norm="nonscaling-layer-elementwise")
    shapes = {tuple(p.shape[1:]) for n, p in net.named_parameters() if n.endswith("norm0.bias") or
              n.endswith("norm1.bias")}
    assert shapes == {(8, 8), (4, 4)}  # both levels, including across the down/up resampling blocks
    assert not [n for n, _ in net.named_parameters() if "norm" in n and n.endswith("weight")]
    out = net(torch.randn(2, 3, 8, 8), torch.zeros(2))
    assert out.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="only the UNet provides it"):
        build_network("dit-tiny", block_norm="nonscaling-layer-elementwise")
