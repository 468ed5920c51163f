"""The backbones (REFERENCE.md [6]): presets, parameter counts, conditioning, wrapper, performance paths."""

from __future__ import annotations

import io
import math
import os

import pytest
import torch

from slct.nn import NETWORK_PRESETS, NORMS, build_network
from slct.nn.layers import Attention2d, FourierEmbedding, PositionalEmbedding, TokenAttention, label_features
from slct.precond import Precond, PrecondModel

TINY = ["unet-tiny", "dit-tiny"]
SLOW = os.environ.get("SLCT_SLOW") == "1"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks gain nothing from threads, and OpenMP threads on a shared 2-core box can stall for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _shape(name: str) -> tuple[int, int, int]:
    kwargs = NETWORK_PRESETS[name][1]
    return kwargs["in_channels"], kwargs["resolution"], kwargs["resolution"]


def _wake(net: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Give the zero-initialised layers (output convs, adaLN-Zero, shifts) random values: a fresh net outputs 0."""
    torch.manual_seed(123)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, std)
    return net


def _inputs(name: str, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    log_sigma = torch.rand(batch) * 8 - 6  # sigma in [e^-6, e^2]
    return torch.randn(batch, *_shape(name)), 250 * log_sigma  # c_noise = 250 ln(sigma)


def _num_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------------------------------
# presets, shapes and parameter counts


@pytest.mark.parametrize("name", list(NETWORK_PRESETS))
def test_every_preset_shape(name):
    with torch.device("meta"):  # shapes only: no memory, no compute, even for DiT-XL
        net = build_network(name)
        y = net(torch.empty(2, *_shape(name)), torch.empty(2))
    assert y.shape == (2, *_shape(name))


def test_paper_preset_parameter_count():
    with torch.device("meta"):
        net = build_network("unet-paper")
    # REFERENCE.md [6]: about 151M with GroupNorm at 4x32x32 (measured: 151,325,956)
    assert abs(_num_params(net) - 151e6) / 151e6 < 0.01


def _block(cin: int, cout: int, emb: int, attn: bool = False) -> int:
    """Parameters of an ADM residual block, from its definition (GroupNorm/LayerNorm: 2C per norm)."""
    n = 2 * cin + (9 * cin * cout + cout) + (emb * 2 * cout + 2 * cout) + 2 * cout + (9 * cout * cout + cout)
    n += cin * cout + cout if cin != cout else 0  # 1x1 skip projection
    n += (2 * cout + 3 * cout * cout + 3 * cout + cout * cout + cout) if attn else 0  # norm, qkv, proj
    return n


def test_tiny_unet_parameter_count_by_hand():
    # unet-tiny: 32 -> 32 ch at 8x8, 64 ch at 4x4 (attention), 1 block, emb 4 * 32; encoder outputs
    # (skips) 32, 32, 32, 64; decoder blocks take 64+64, 64+32 at 4x4 and 64+32, 32+32 at 8x8.
    e = 128
    expected = (32 * e + e) + (e * e + e)  # noise MLP
    expected += 9 * 32 * 32 + 32  # input conv
    expected += _block(32, 32, e) + _block(32, 32, e) + _block(32, 64, e, attn=True)  # block, down, block
    expected += _block(64, 64, e, attn=True) + _block(64, 64, e)  # middle
    expected += _block(128, 64, e, attn=True) + _block(96, 64, e, attn=True)
    expected += _block(64, 64, e) + _block(96, 32, e) + _block(64, 32, e)  # up, blocks
    expected += 2 * 32 + 9 * 32 * 32 + 32  # output norm and conv
    assert _num_params(build_network("unet-tiny")) == expected


@pytest.mark.parametrize(("name", "width", "depth", "patch"), [("dit-b2", 768, 12, 2), ("dit-xl2", 1152, 28, 2),
                                                                ("dit-s4", 384, 12, 4), ("dit-tiny", 64, 2, 2)])
def test_dit_parameter_count_by_hand(name, width, depth, patch):
    d, c = width, _shape(name)[0]
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
    expected = (c * patch * patch * d + d) + (256 * d + d) + (d * d + d) + depth * block
    expected += 2 * d + (2 * d * d + 2 * d) + (d * patch * patch * c + patch * patch * c)
    with torch.device("meta"):
        assert _num_params(build_network(name)) == expected


def test_nonscaling_norms_remove_exactly_the_scales():
    layer = build_network("unet-tiny", block_norm="layer", out_norm="layer")
    nsln = build_network("unet-tiny", block_norm="nonscaling-layer", out_norm="nonscaling-layer")
    scales = [p.numel() for n, p in layer.named_parameters() if "norm" in n and n.endswith("weight")]
    assert len(scales) == 2 * 10 + 4 + 1  # 2 per residual block, 1 per attention (4), the output norm
    assert _num_params(layer) - _num_params(nsln) == sum(scales)
    assert not [n for n, _ in nsln.named_parameters() if "norm" in n and n.endswith("weight")]


# ---------------------------------------------------------------------------------------------
# every norm through both architectures


# per-element norms need feature maps: UNets only (the DiT's refusal is tested in test_norms)
@pytest.mark.parametrize("name,norm", [(name, norm) for name in TINY for norm in sorted(NORMS)
                                       if not (name.startswith("dit") and norm.endswith("-elementwise"))])
def test_every_norm_forward_backward(name, norm):
    net = _wake(build_network(name, block_norm=norm, out_norm=norm))
    x, c_noise = _inputs(name)
    y = net(x, c_noise)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    y.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", TINY)
def test_nonscaling_scale_stays_one_in_training(name):
    net = _wake(build_network(name, block_norm="nonscaling-layer", out_norm="nonscaling-layer"))
    opt = torch.optim.RAdam(net.parameters(), lr=1e-2, weight_decay=1e-4)  # REFERENCE.md [8] optimizer
    x, c_noise = _inputs(name)
    net(x, c_noise).square().mean().backward()
    opt.step()
    norms = [m for m in net.modules() if type(m).__name__ == "NonScalingLayerNorm"]
    assert norms and all(m.weight is None for m in norms)
    # unit scale after the step: the normalised part of each output has exactly zero mean and unit variance
    for m in norms:
        z = torch.randn(3, m.num_channels, 4, 4) * 7 + 2
        shift = m.bias.detach().reshape(1, -1, 1, 1)
        u = m(z).detach() - shift
        torch.testing.assert_close(u.var(dim=(1, 2, 3), unbiased=False), torch.ones(3), rtol=1e-4, atol=1e-4)


def test_fresh_network_outputs_zero():
    # zero-initialised output conv (ADM) / output projection (DiT)
    for name in TINY:
        x, c_noise = _inputs(name)
        assert not build_network(name)(x, c_noise).any()


def test_any_channels_and_resolution():
    net = _wake(build_network("unet-tiny", in_channels=4, resolution=16, attn_resolutions=(8,)))
    assert net(torch.randn(2, 4, 16, 16), torch.zeros(2)).shape == (2, 4, 16, 16)
    dit = _wake(build_network("dit-tiny", in_channels=4, resolution=16, patch_size=4))
    assert dit(torch.randn(2, 4, 16, 16), torch.zeros(2)).shape == (2, 4, 16, 16)
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(2, 4, 8, 8), torch.zeros(2))


# ---------------------------------------------------------------------------------------------
# the consistency-model wrapper, conditioning, state


@pytest.mark.parametrize("name", TINY)
def test_boundary_condition_through_wrapper(name):
    """f(x, sigma_min) == x exactly (c_skip = 1, c_out = 0), for a network with a non-zero output."""
    model = PrecondModel(_wake(build_network(name)), Precond(sigma_data=0.5, sigma_min=0.002))
    x = torch.randn(3, *_shape(name))
    assert torch.equal(model(x, torch.full((3,), 0.002)), x)
    y = model(x, torch.full((3,), 80.0))
    assert torch.isfinite(y).all() and not torch.allclose(y, x)


@pytest.mark.parametrize("name", TINY)
def test_class_conditioning(name):
    net = _wake(build_network(name, label_dim=5)).eval()
    x, c_noise = _inputs(name, batch=3)
    ids = torch.tensor([0, 3, 4])
    y0 = net(x, c_noise, torch.zeros(3, dtype=torch.long))
    y = net(x, c_noise, ids)
    assert not torch.allclose(y, y0)  # the class changes the output
    torch.testing.assert_close(net(x, c_noise, torch.nn.functional.one_hot(ids, 5).float()), y)  # ids == one-hot
    torch.testing.assert_close(net(x, c_noise), net(x, c_noise, torch.zeros(3, 5)))  # None == the null label
    with pytest.raises(ValueError, match="unconditional"):
        build_network(name)(x, c_noise, ids)


def test_label_dropout():
    torch.manual_seed(5)
    ids = torch.randint(0, 4, (256,))
    kept = label_features(ids, 4, 256, dropout=0.25, training=True).sum(1)
    assert set(kept.tolist()) == {0.0, 1.0} and abs(kept.mean().item() - 0.75) < 0.08
    assert torch.equal(label_features(ids, 4, 256, dropout=0.25, training=False),
                       torch.nn.functional.one_hot(ids, 4).float())


def test_dropout_only_in_training():
    net = _wake(build_network("unet-tiny", dropout=0.5))
    x, c_noise = _inputs("unet-tiny")
    assert not torch.equal(net(x, c_noise), net(x, c_noise))
    net.eval()
    assert torch.equal(net(x, c_noise), net(x, c_noise))


@pytest.mark.parametrize("name", TINY)
def test_state_dict_round_trip(name):
    net = _wake(build_network(name, noise_embedding="fourier", block_norm="nonscaling-layer")).eval()
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    torch.manual_seed(999)  # a different random init (and Fourier frequencies) before loading
    other = build_network(name, noise_embedding="fourier", block_norm="nonscaling-layer").eval()
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    x, c_noise = _inputs(name)
    assert torch.equal(other(x, c_noise), net(x, c_noise))


# ---------------------------------------------------------------------------------------------
# layers against their formulas


def test_positional_embedding_formula():
    emb = PositionalEmbedding(4)  # frequencies 10000^(-j/2), j = 0, 1: 1 and 1/100
    x = torch.tensor([2.0, -250 * math.log(80)])
    expected = torch.stack([torch.tensor([math.cos(v), math.cos(v / 100), math.sin(v), math.sin(v / 100)])
                            for v in x.tolist()])
    torch.testing.assert_close(emb(x), expected)


def test_fourier_embedding_formula():
    torch.manual_seed(6)
    emb = FourierEmbedding(2048, scale=0.02)
    assert abs(emb.freqs.std().item() - 0.02) < 0.002  # f ~ N(0, 0.02^2) (iCT)
    x = torch.tensor([3.0])
    angles = 2 * math.pi * 3.0 * emb.freqs
    torch.testing.assert_close(emb(x), torch.cat([angles.cos(), angles.sin()])[None])


def test_attention2d_is_softmax_attention():
    torch.manual_seed(7)
    attn = Attention2d(64, num_heads=2, norm="group")
    torch.nn.init.normal_(attn.proj.weight, std=0.1)
    x = torch.randn(2, 64, 3, 5)
    qkv = attn.qkv(attn.norm(x)).reshape(2, 2, 32, 3, 15)  # (B, heads, C/heads, q|k|v, HW), EDM's layout
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    w = torch.softmax(torch.einsum("bhcq,bhck->bhqk", q, k) / math.sqrt(32), dim=-1)
    a = torch.einsum("bhqk,bhck->bhcq", w, v).reshape(2, 64, 3, 5)
    torch.testing.assert_close(attn(x), x + attn.proj(a), rtol=1e-4, atol=1e-5)


def test_token_attention_is_softmax_attention():
    torch.manual_seed(8)
    attn = TokenAttention(32, num_heads=4)
    x = torch.randn(2, 6, 32)
    q, k, v = attn.qkv(x).reshape(2, 6, 3, 4, 8).unbind(2)  # (B, N, heads, D/heads)
    w = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8), dim=-1)
    a = torch.einsum("bhqk,bkhd->bqhd", w, v).reshape(2, 6, 32)
    torch.testing.assert_close(attn(x), attn.proj(a), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# build_network validation


def test_build_network_validation():
    with pytest.raises(ValueError, match="allowed: .*attn_resolutions"):
        build_network("unet-tiny", patch_size=2)  # a DiT key on a UNet: named, allowed keys listed
    with pytest.raises(ValueError, match="allowed: .*patch_size"):
        build_network("dit-tiny", channel_mult=(1, 2))
    with pytest.raises(ValueError, match="model_channels must be int"):
        build_network("unet-tiny", model_channels=32.0)
    with pytest.raises(ValueError, match="unet-paper"):
        build_network("unet-huge")
    with pytest.raises(ValueError, match="nonscaling-layer"):
        build_network("unet-tiny", block_norm="batch")
    with pytest.raises(ValueError, match="attn_resolutions"):
        build_network("unet-tiny", attn_resolutions=(16,))  # not a resolution of an 8x8 UNet
    with pytest.raises(ValueError, match="divisible"):
        build_network("dit-tiny", patch_size=3)
    net = build_network("unet-tiny", channel_mult=[1, 1], emb_channels=None, dropout=0)  # YAML-style values
    assert net.map_layer0.out_features == 4 * 32


# ---------------------------------------------------------------------------------------------
# performance paths: channels_last, bf16 autocast, torch.compile


@pytest.mark.parametrize("name", TINY)
def test_channels_last(name):
    net = _wake(build_network(name))
    x, c_noise = _inputs(name)
    y = net(x, c_noise)
    net_cl = net.to(memory_format=torch.channels_last)
    y_cl = net_cl(x.to(memory_format=torch.channels_last), c_noise)
    torch.testing.assert_close(y_cl, y, rtol=1e-4, atol=1e-5)
    y_cl.square().mean().backward()


@pytest.mark.parametrize("name", TINY)
def test_bf16_autocast_norms_in_fp32(name):
    net = _wake(build_network(name, block_norm="nonscaling-layer", out_norm="nonscaling-layer"))
    x, c_noise = _inputs(name)
    y32 = net(x, c_noise)
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
             for m in net.modules() if type(m).__name__ == "NonScalingLayerNorm"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x, c_noise)
    for h in hooks:
        h.remove()
    assert y.dtype == torch.float32  # returned in x's dtype, ready for an fp32 loss
    assert seen and all(i == o for i, o in seen)  # each norm returns its input's dtype
    if name.startswith("unet"):  # the DiT's residual stream stays fp32; the UNet's activations are bf16
        assert {i for i, _ in seen} == {torch.bfloat16}
    assert (y - y32).norm() / y32.norm() < 0.05  # bf16 activations, fp32 statistics
    y.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_compile_traces_without_graph_breaks():
    """fullgraph=True fails on any graph break; the eager backend keeps this test fast on a CPU."""
    for name in TINY:
        net = _wake(build_network(name))
        x, c_noise = _inputs(name)
        compiled = torch.compile(net, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x, c_noise), net(x, c_noise))


@pytest.mark.skipif(not SLOW, reason="inductor compiling takes minutes on a 2-core CPU (3.5 min seen); SLCT_SLOW=1")
@pytest.mark.parametrize("name", TINY)
def test_compiled_matches_eager(name):
    net = _wake(build_network(name, block_norm="nonscaling-layer", out_norm="nonscaling-layer"))
    x, c_noise = _inputs(name)
    compiled = torch.compile(net)
    torch.testing.assert_close(compiled(x, c_noise), net(x, c_noise), rtol=1e-4, atol=1e-5)
