"""Codecs: registry, identity, TAEF2 on the real weights, and the diffusers path with a tiny random VAE."""

from __future__ import annotations

import io
import json
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from slct.codecs import CODECS, Codec, get_codec


def test_registry_names_and_bad_name():
    assert {"identity", "taef2", "sd-vae-ft-ema", "sd-vae-ft-mse"} <= set(CODECS)
    with pytest.raises(ValueError, match="codec must be one of"):
        get_codec("vqgan")


def test_identity_round_trip_and_spec():
    codec = get_codec("identity")
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert codec.latent_shape(8) == (3, 8, 8) and codec.downsample == 1
    z = codec.encode(x)
    assert z.dtype == torch.float32 and torch.equal(z, x)
    assert torch.equal(codec.decode(z), x)
    assert torch.equal(codec.decode(torch.full((1, 3, 2, 2), 3.0)), torch.ones(1, 3, 2, 2))  # clamped
    grey = get_codec(**json.loads(json.dumps(get_codec("identity", channels=1).spec())))
    assert grey.latent_channels == grey.image_channels == 1 and grey.id == "identity-1ch"
    assert codec.to("cpu") is codec
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        get_codec("identity", channels=2)


def test_latent_shape_rejects_resolution_not_divisible_by_downsampling():
    class Eight(Codec):
        name, latent_channels, downsample = "eight", 4, 8

    assert Eight().latent_shape(256) == (4, 32, 32)
    with pytest.raises(ValueError, match="multiple of 8"):
        Eight().latent_shape(60)


# ---------------------------------------------------------------------------------------------------------------------
# TAEF2 on ../shared/weights


def _faces(zip_path, count: int, resolution: int = 64) -> torch.Tensor:
    with zipfile.ZipFile(zip_path) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
        picks = [names[i] for i in np.linspace(0, len(names) - 1, count).astype(int)]
        images = [Image.open(io.BytesIO(z.read(n))).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
                  for n in picks]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_taef2_reconstructs_utkface_above_28db(shared_weights, utkface_zip):
    codec = get_codec("taef2", weights_dir=shared_weights)
    x = _faces(utkface_zip, 8)
    z = codec.encode(x)
    assert z.shape == (8, 32, 8, 8) and z.dtype == torch.float32
    y = codec.decode(z)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    mse = ((y - x) / 2).pow(2).flatten(1).mean(1)  # images in [0, 1] units, peak 1
    psnr = 10 * torch.log10(1 / mse)
    assert psnr.mean() > 28, psnr  # README: 30.2 dB on UTKFace at 64 px
    assert get_codec(**codec.spec()).weights_dir == shared_weights


def test_taef2_missing_weights_says_what_and_where(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"taef2_encoder\.pth.*taef2_decoder\.pth"):
        get_codec("taef2", weights_dir=tmp_path)
    monkeypatch.setenv("SLCT_WEIGHTS", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        get_codec("taef2")


# ---------------------------------------------------------------------------------------------------------------------
# sd-vae-* through diffusers, offline with a tiny random AutoencoderKL


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    path = tmp_path_factory.mktemp("tiny-vae")
    vae.save_pretrained(path)
    return path, vae.eval()


def test_sd_vae_posterior_sample_and_mean(tiny_vae_dir):
    path, vae = tiny_vae_dir
    codec = get_codec("sd-vae-ft-ema", pretrained=str(path))
    assert codec.latent_shape(16) == (4, 8, 8) and codec.downsample == 2 and not codec.deterministic
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    expected = dist.mean + dist.std * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    z = codec.encode(x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, expected)
    mean_codec = get_codec("sd-vae-ft-ema", pretrained=str(path), posterior="mean")
    torch.testing.assert_close(mean_codec.encode(x), dist.mean)
    assert mean_codec.id == "sd-vae-ft-ema:mean" and codec.id == "sd-vae-ft-ema"
    images = codec.decode(z)
    assert images.shape == x.shape and images.dtype == torch.float32 and images.abs().max() <= 1
    rebuilt = get_codec(**json.loads(json.dumps(codec.spec())))
    torch.testing.assert_close(rebuilt.encode(x, generator=torch.Generator().manual_seed(3)), z)


def test_sd_vae_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="posterior must be one of"):
        get_codec("sd-vae-ft-mse", pretrained=str(tmp_path), posterior="mode")
    with pytest.raises(FileNotFoundError, match="could not load AutoencoderKL"):
        get_codec("sd-vae-ft-mse", pretrained=str(tmp_path / "missing"))
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(RuntimeError, match=r'pip install "slct\[sd-vae\]"'):
        get_codec("sd-vae-ft-ema", pretrained=str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# the outlier codec (the paper's premise, controlled)


def _kurtosis(z: torch.Tensor) -> float:
    z = z.double().flatten()
    z = (z - z.mean()) / z.std()
    return float(z.pow(4).mean() - 3)


@pytest.mark.parametrize("mode", ["spike", "tail"])
def test_outlier_codec_round_trips_and_is_impulsive(mode):
    from slct.codecs.outliers import OutlierCodec

    x = torch.rand(16, 3, 8, 8) * 2 - 1
    plain = get_codec("identity")
    codec = get_codec("outliers", base=plain.spec(), mode=mode, strength=20.0)
    z = codec.encode(x)
    torch.testing.assert_close(codec.decode(z), plain.decode(plain.encode(x)), rtol=0, atol=1e-6)
    assert _kurtosis(z) > _kurtosis(x) + (5 if mode == "spike" else 1)  # heavier tails (x is uniform)
    if mode == "spike":  # one element per image and channel, multiplied by k, the rest untouched
        changed = (z != x).flatten(2).sum(2)
        assert changed.max() == 1 and z.abs().amax((2, 3)).allclose(20 * x.abs().amax((2, 3)))
    rebuilt = get_codec(**json.loads(json.dumps(codec.spec())))
    assert isinstance(rebuilt, OutlierCodec) and rebuilt.spec() == codec.spec() and rebuilt.id == f"identity+{mode}20"
    one = get_codec("outliers", base=plain.spec(), mode=mode, strength=1)  # k = 1: the plain codec
    assert torch.equal(one.encode(x), plain.encode(x))


def test_outlier_codec_refuses_bad_settings(capsys):
    from slct.cli import main

    for kwargs, message in [(dict(mode="spiky"), "outlier mode must be one of spike, tail"),
                            (dict(strength=0.5), "strength must be a finite number >= 1"),
                            (dict(base={"name": "outliers", "base": {"name": "identity"}}), "not another outlier")]:
        with pytest.raises(ValueError, match=message):
            get_codec("outliers", **{"base": {"name": "identity"}, **kwargs})
    assert main(["encode", "nowhere", "--out", "x", "--codec", "identity", "--outliers", "spike"]) == 2
    assert "--outliers takes MODE:K" in capsys.readouterr().err


@pytest.mark.shared
def test_outlier_codec_around_taef2_decodes_as_taef2(shared_weights, utkface_zip):
    base = get_codec("taef2", weights_dir=shared_weights)
    codec = get_codec("outliers", base=base.spec(), mode="spike", strength=10.0)
    x = _faces(utkface_zip, 4)
    z = codec.encode(x)
    torch.testing.assert_close(codec.decode(z), base.decode(base.encode(x)), rtol=0, atol=1e-4)
    assert _kurtosis(z) > _kurtosis(base.encode(x)) + 3
