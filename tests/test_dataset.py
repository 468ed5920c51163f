"""Normalizer, LatentDataset (memory-mapped shards, builtin:digits) and InfiniteSampler."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from slct.data import InfiniteSampler, LatentDataset, Normalizer, encode_dataset
from slct.data.sources import ArraySource

IMAGES = np.random.default_rng(0).integers(0, 256, size=(11, 4, 4, 3), dtype=np.uint8)


def _stats(z: np.ndarray) -> dict:
    """Manifest-shaped statistics of z (N, C, H, W), computed directly with numpy."""
    return {"per_element": {"mean": z.mean(0).tolist(), "std": z.std(0).tolist()},
            "per_channel": {"mean": z.mean((0, 2, 3)).tolist(), "std": z.std((0, 2, 3)).tolist()}}


Z = np.random.default_rng(1).normal(3.0, 2.0, size=(64, 2, 3, 3)) * np.array([1, 10]).reshape(1, 2, 1, 1)
MANIFEST = {"stats": _stats(Z)}


@pytest.mark.parametrize("mode, expected", [
    ("per-element", lambda z: (z - Z.mean(0)) / Z.std(0) * 0.5),                    # REFERENCE [7], authors
    ("per-channel", lambda z: (z - Z.mean((0, 2, 3)).reshape(2, 1, 1)) / Z.std((0, 2, 3)).reshape(2, 1, 1) * 0.5),
    ("scale", lambda z: z * 0.18215),
    ("none", lambda z: z),
])
def test_normalizer_modes_and_exact_inverse(mode, expected):
    n = Normalizer.from_manifest(MANIFEST, mode=mode, sigma_data=0.5, scale=0.18215 if mode == "scale" else None)
    z = torch.from_numpy(Z[:8])
    x = n.normalize(z)
    assert x.dtype == z.dtype and x.shape == z.shape
    np.testing.assert_allclose(x.numpy(), expected(Z[:8]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(n.denormalize(x), z, rtol=1e-14, atol=1e-13)  # float64: exact up to rounding
    z32 = z.float()
    torch.testing.assert_close(n.denormalize(n.normalize(z32)), z32, rtol=1e-6, atol=1e-5)
    rebuilt = Normalizer.from_dict(json.loads(json.dumps(n.to_dict())))
    assert torch.equal(rebuilt.normalize(z), x) and rebuilt.mode == mode


def test_per_element_with_manifest_statistics_has_unit_sigma_data_scale():
    x = Normalizer.from_manifest(MANIFEST).normalize(torch.from_numpy(Z)).numpy()
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(x.std(0), 0.5, rtol=1e-12)  # sigma_data


def test_normalizer_bad_arguments():
    with pytest.raises(ValueError, match="normalization mode must be one of"):
        Normalizer.from_manifest(MANIFEST, mode="minmax")
    with pytest.raises(ValueError, match="needs scale="):
        Normalizer.from_manifest(MANIFEST, mode="scale")
    with pytest.raises(ValueError, match="needs statistics"):
        Normalizer.from_manifest({}, mode="per-element")
    constant = Normalizer("per-element", mean=np.zeros((1, 1, 1)), std=np.zeros((1, 1, 1)))
    assert torch.equal(constant.normalize(torch.zeros(2, 1, 1, 1)), torch.zeros(2, 1, 1, 1))  # no inf / nan


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("latents") / "ds"
    encode_dataset(ArraySource(IMAGES, labels=np.arange(11) % 4), out, {"name": "identity"}, 4, num_workers=0,
                   progress=False, shard_size=3)
    return out


def test_dataset_items_batches_and_attributes(latent_dir):
    ds = LatentDataset(latent_dir)
    assert len(ds) == 11 and ds.latent_shape == (3, 4, 4) and ds.num_classes == 4 and ds.image_resolution == 4
    assert ds.codec_spec == {"name": "identity", "channels": 3} and len(ds.manifest["shards"]) == 4
    assert all(isinstance(s, np.memmap) for s in ds._shards)  # read by memory map, not loaded
    raw = IMAGES.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    mean, std = raw.astype(np.float64).mean(0), raw.astype(np.float64).std(0)
    x, label = ds[7]
    assert x.dtype == torch.float32 and x.shape == (3, 4, 4) and label.dtype == torch.int64 and label.item() == 3
    np.testing.assert_allclose(x.numpy(), (raw[7] - mean) / std * 0.5, rtol=1e-5, atol=1e-6)
    idx = np.array([10, 0, 4, 4, 9, 2])  # across shards, unordered, repeated
    xb, lb = ds.get_batch(idx)
    assert torch.equal(xb, torch.stack([ds[i][0] for i in idx])) and lb.tolist() == (idx % 4).tolist()
    np.testing.assert_array_equal(ds.raw(idx), raw[idx])
    with pytest.raises(IndexError):
        ds.get_batch([11])
    clone = pickle.loads(pickle.dumps(ds))  # as sent to spawned DataLoader workers: maps reopened
    assert isinstance(clone._shards[0], np.memmap) and torch.equal(clone.get_batch(idx)[0], xb)


def test_dataset_flips_only_in_pixel_space(latent_dir, tmp_path):
    ds = LatentDataset(latent_dir, normalization="none", hflip=True)
    x, _ = ds.get_batch(np.zeros(64, np.int64), generator=torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(xi, x[0].flip(-1)) and not torch.equal(xi, x[0]) for xi in x])
    base = torch.from_numpy(ds.raw([0])[0])
    assert all(torch.equal(xi, base) or torch.equal(xi, base.flip(-1)) for xi in x) and 10 < int(flipped.sum()) < 54
    manifest = json.loads((latent_dir / "manifest.json").read_text())
    manifest["codec"] = {"name": "taef2"}
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="hflip"):
        LatentDataset(fake, hflip=True)


def test_unlabeled_dataset_returns_minus_one(tmp_path):
    encode_dataset(ArraySource(IMAGES[:2]), tmp_path / "u", {"name": "identity"}, 4, num_workers=0, progress=False)
    ds = LatentDataset(tmp_path / "u", normalization="scale", scale=2.0)
    x, label = ds[1]
    assert label.item() == -1 and ds.num_classes == 0
    torch.testing.assert_close(x, torch.from_numpy(IMAGES[1].transpose(2, 0, 1) / 127.5 - 1).float() * 2)


def test_builtin_digits(tmp_path, monkeypatch):
    from PIL import Image
    from sklearn.datasets import load_digits

    monkeypatch.setenv("SLCT_CACHE", str(tmp_path))
    ds = LatentDataset("builtin:digits", normalization="none")
    assert len(ds) == 1797 and ds.latent_shape == (1, 16, 16) and ds.num_classes == 10
    assert (tmp_path / "builtin-digits-16" / "manifest.json").is_file()
    digits = load_digits()
    grey = Image.fromarray(np.round(digits.images[5] * 255 / 16).astype(np.uint8))
    expected = np.asarray(grey.resize((16, 16), Image.BILINEAR), np.float32) / 127.5 - 1
    x, label = ds[5]
    np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-6)
    assert label.item() == digits.target[5]
    assert LatentDataset("builtin:digits").manifest["created"] == ds.manifest["created"]  # cached, not rebuilt
    with pytest.raises(ValueError, match="builtin:digits"):
        LatentDataset("builtin:mnist")


# ---------------------------------------------------------------------------------------------------------------------
# InfiniteSampler


def _take(sampler, n):
    return [next(sampler) for _ in range(n)]


def test_sampler_epochs_are_permutations_of_one_stream():
    stream = np.concatenate(_take(InfiniteSampler(10, 5, seed=3), 6))  # 3 epochs of 10
    for e in range(3):
        assert sorted(stream[10 * e:10 * (e + 1)].tolist()) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:20])
    np.testing.assert_array_equal(stream[:10], np.random.default_rng([3, 0]).permutation(10))
    np.testing.assert_array_equal(next(InfiniteSampler(7, 4, shuffle=False, start_nimg=4)), [4, 5, 6, 0])


def test_sampler_resume_is_exact():
    full = _take(InfiniteSampler(13, 6, seed=1), 9)  # batches straddle epochs (13 is not a multiple of 6)
    resumed = InfiniteSampler(13, 6, seed=1, start_nimg=4 * 6)
    for a, b in zip(full[4:], _take(resumed, 5)):
        np.testing.assert_array_equal(a, b)
    assert resumed.nimg == 9 * 6


def test_sampler_rank_shards_are_disjoint_and_concatenate_to_the_global_batch():
    single = _take(InfiniteSampler(13, 8, seed=2), 5)
    ranks = [_take(InfiniteSampler(13, 8, rank=r, world_size=4, seed=2), 5) for r in range(4)]
    for b in range(5):
        parts = [ranks[r][b] for r in range(4)]
        assert all(len(p) == 2 for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), single[b])
    # within one epoch (13 positions), no index is served twice across ranks
    first_epoch = np.concatenate([np.concatenate([ranks[r][b] for r in range(4)]) for b in range(5)])[:13]
    assert sorted(first_epoch.tolist()) == list(range(13))


def test_sampler_bad_arguments():
    with pytest.raises(ValueError, match="multiple of world_size"):
        InfiniteSampler(10, 6, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        InfiniteSampler(10, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="length"):
        InfiniteSampler(0, 4)
