"""``encode_dataset`` / ``slct encode``: sources, shards, manifest, statistics, resume, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from slct.codecs import Codec
from slct.codecs.identity import IdentityCodec
from slct.data import encode_dataset, read_manifest
from slct.data.encode import select_indices, split_indices
from slct.data.sources import ArraySource, prepare_image
from slct.data.stats import StreamingStats

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8)  # already at the target resolution


def _write_pngs(folder, images, prefix="img"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{prefix}{i:02d}.png")
    return folder


def _encode(source, out, **kw):
    kw = {"codec": IdentityCodec(), "resolution": 8, "num_workers": 0, "progress": False, "shard_size": 5, **kw}
    return encode_dataset(source, out, **kw)


def _latents(out):
    m = read_manifest(out)
    return np.concatenate([np.load(out / s["file"]) for s in m["shards"]])


def test_folder_encode_shards_values_and_manifest_round_trip(tmp_path):
    src = _write_pngs(tmp_path / "imgs" / "sub", IMAGES[:7]).parent
    _write_pngs(tmp_path / "imgs", IMAGES[7:], prefix="top")
    manifest = _encode(src, tmp_path / "out")
    assert manifest["count"] == 12 and [s["count"] for s in manifest["shards"]] == [5, 5, 2]
    assert manifest["latent_shape"] == [3, 8, 8] and manifest["dtype"] == "float32"
    assert manifest["codec"] == {"name": "identity", "channels": 3} and manifest["labels"] is None
    for key in ("codec_id", "image_resolution", "created", "slct_version", "source", "stats", "skipped"):
        assert key in manifest
    # sorted relative paths ("sub/img.." before "top.."); identity latents are the pixels mapped to [-1, 1]
    expected = IMAGES.transpose(0, 3, 1, 2) / 127.5 - 1
    np.testing.assert_allclose(_latents(tmp_path / "out"), expected, atol=1e-6)
    assert read_manifest(tmp_path / "out") == json.loads(json.dumps(manifest)) == manifest
    assert not (tmp_path / "out" / "encode-state.json").exists()


def test_statistics_equal_numpy(tmp_path):
    manifest = _encode(ArraySource(IMAGES), tmp_path / "out")
    z = _latents(tmp_path / "out").astype(np.float64)
    s = manifest["stats"]
    assert s["count"] == 12 and s["quantile_exact"]
    np.testing.assert_allclose(s["per_element"]["mean"], z.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(s["per_element"]["std"], z.std(0), rtol=1e-10)
    np.testing.assert_array_equal(s["per_element"]["min"], z.min(0))
    np.testing.assert_array_equal(s["per_element"]["max"], z.max(0))
    np.testing.assert_allclose(s["per_channel"]["mean"], z.mean((0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(s["per_channel"]["std"], z.std((0, 2, 3)), rtol=1e-10)
    per_channel = z.transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(s["per_channel"]["quantiles"], np.quantile(per_channel, s["quantile_levels"], axis=1).T,
                               rtol=1e-12)
    np.testing.assert_allclose(s["global"]["quantiles"], np.quantile(z, s["quantile_levels"]), rtol=1e-12)
    np.testing.assert_allclose([s["global"]["mean"], s["global"]["std"]], [z.mean(), z.std()], rtol=1e-12)


def test_streaming_quantiles_sample_uniformly_beyond_the_exact_limit():
    x = np.random.default_rng(1).standard_normal((400, 2, 4, 4))
    stats = StreamingStats((2, 4, 4), quantile_levels=(0.05, 0.5, 0.95), sample_size=1000)
    for batch in np.array_split(x, 7):
        stats.update(batch)
    s = stats.summary()
    assert not s["quantile_exact"]
    # a 1000-value uniform sample of N(0, 1): quantiles within a few standard errors of 1.645 and 0
    np.testing.assert_allclose(s["per_channel"]["quantiles"], [[-1.645, 0, 1.645]] * 2, atol=0.2)
    np.testing.assert_allclose(s["per_channel"]["mean"], x.mean((0, 2, 3)), rtol=1e-12)


def test_prepare_image_center_crops_then_resizes():
    wide = np.arange(4 * 6, dtype=np.uint8).reshape(4, 6) * 10
    out = prepare_image(Image.fromarray(wide), 4, channels=1)
    np.testing.assert_array_equal(out[0], wide[:, 1:5])  # the central 4x4, no resize needed
    rgb = prepare_image(Image.fromarray(np.zeros((10, 10, 3), np.uint8)), 5, channels=3)
    assert rgb.shape == (3, 5, 5) and rgb.dtype == np.uint8


def test_select_indices_spreads_evenly():
    np.testing.assert_array_equal(select_indices(10, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(select_indices(3, None), [0, 1, 2])
    with pytest.raises(ValueError, match="limit"):
        select_indices(3, 0)


def test_holdout_split_is_disjoint_and_shared_with_reference_reader(tmp_path):
    held, train = split_indices(10, 4, "holdout"), split_indices(10, 4, "train")
    np.testing.assert_array_equal(held, [0, 3, 6, 9])
    np.testing.assert_array_equal(train, [1, 2, 4, 5, 7, 8])
    np.testing.assert_array_equal(split_indices(10, 4, "all"), np.arange(10))
    np.testing.assert_array_equal(split_indices(10, 4, "train", limit=3), [1, 4, 8])
    for bad in (dict(holdout=0, split="train"), dict(holdout=10, split="holdout"), dict(split="test")):
        with pytest.raises(ValueError):
            split_indices(10, **bad)
    # the encoded training split and the reference reader's held-out split partition the images
    src = _write_pngs(tmp_path / "imgs", IMAGES)
    manifest = _encode(src, tmp_path / "train", holdout=4, split="train")
    assert manifest["count"] == 8 and manifest["selection"] == {"limit": None, "count": 8, "holdout": 4,
                                                                 "split": "train"}
    expected = IMAGES.transpose(0, 3, 1, 2) / 127.5 - 1
    np.testing.assert_allclose(_latents(tmp_path / "train"), expected[[1, 2, 3, 5, 6, 8, 9, 10]], atol=1e-6)
    from slct.eval.reference import image_reader

    count, read = image_reader(src, holdout=4, split="holdout")
    assert count == 4
    np.testing.assert_array_equal(np.stack(read(range(4))), IMAGES[[0, 4, 7, 11]])


def test_hflip_copies_and_class_folder_labels(tmp_path):
    root = tmp_path / "classes"
    _write_pngs(root / "cat", IMAGES[:3])
    _write_pngs(root / "dog", IMAGES[3:5])
    manifest = _encode(root, tmp_path / "out", hflip_copies=True, labels="folder", shard_size=4)
    z = _latents(tmp_path / "out")
    assert manifest["count"] == 10 and manifest["class_names"] == ["cat", "dog"] and manifest["num_classes"] == 2
    np.testing.assert_array_equal(z[1::2], z[0::2, :, :, ::-1])  # (original, mirrored) pairs
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "labels.npy"), [0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="shard_size must be a positive multiple of 2"):
        _encode(root, tmp_path / "odd", hflip_copies=True, shard_size=5)


def test_zip_source_matches_folder(tmp_path):
    folder = _write_pngs(tmp_path / "faces", IMAGES[:6])
    with zipfile.ZipFile(tmp_path / "faces.zip", "w") as z:
        for p in sorted(folder.iterdir()):
            z.write(p, f"faces/{p.name}")
    a = _encode(folder, tmp_path / "a", num_workers=1)  # through a worker process
    b = _encode(tmp_path / "faces.zip", tmp_path / "b")
    np.testing.assert_array_equal(_latents(tmp_path / "a"), _latents(tmp_path / "b"))
    assert b["source"]["kind"] == "zip" and a["stats"] == b["stats"]


class NoisyIdentity(Codec):
    """A stochastic codec (like a VAE posterior sample) to check that resuming reproduces the noise."""

    name, latent_channels, downsample, deterministic = "noisy", 3, 1, False

    def encode(self, images, generator=None):
        return images + 0.1 * torch.randn(images.shape, generator=generator)


class Interrupting(ArraySource):
    """Raises at image ``stop_at`` (a kill in the middle of a shard)."""

    stop_at = None

    def load(self, i):
        if i == self.stop_at:
            raise KeyboardInterrupt
        return super().load(i)


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    labels = np.arange(12) % 3
    _encode(Interrupting(IMAGES, labels, name="faces"), tmp_path / "full", codec=NoisyIdentity(), shard_size=4)
    source = Interrupting(IMAGES, labels, name="faces")
    source.stop_at = 9
    with pytest.raises(KeyboardInterrupt):
        _encode(source, tmp_path / "resumed", codec=NoisyIdentity(), shard_size=4)
    assert (tmp_path / "resumed" / "encode-state.json").exists()
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    # a shard written but not yet recorded when the process died is simply redone
    (tmp_path / "resumed" / "shard-00002.npy").write_bytes(b"partial")
    stale = tmp_path / "resumed" / ".shard-00003.npy.tmp-4242"  # a write that kill -9 interrupted
    stale.write_bytes(b"partial")
    source.stop_at = None
    resumed = _encode(source, tmp_path / "resumed", codec=NoisyIdentity(), shard_size=4)
    assert not stale.exists()
    full = read_manifest(tmp_path / "full")
    assert {k: v for k, v in resumed.items() if k != "created"} == {k: v for k, v in full.items() if k != "created"}
    for name in ["labels.npy"] + [s["file"] for s in full["shards"]]:
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name


KILLED_RUN = """
import os, signal, sys
from slct.codecs.identity import IdentityCodec
from slct.data import encode_dataset

class DiesOnThirdBatch(IdentityCodec):
    calls = 0
    def encode(self, images, generator=None):
        DiesOnThirdBatch.calls += 1
        if DiesOnThirdBatch.calls == 3:  # inside the second shard: no exception handler runs
            os.kill(os.getpid(), signal.SIGKILL)
        return super().encode(images, generator)

encode_dataset(sys.argv[1], sys.argv[2], DiesOnThirdBatch(), 8, batch_size=2, shard_size=4, num_workers=0,
               progress=False)
"""


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    folder = _write_pngs(tmp_path / "imgs", IMAGES[:10])
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(folder), str(tmp_path / "resumed")])
    assert killed.returncode == -9
    state = json.loads((tmp_path / "resumed" / "encode-state.json").read_text())
    assert [s["file"] for s in state["shards"]] == ["shard-00000.npy"]
    resumed = _encode(folder, tmp_path / "resumed", batch_size=2, shard_size=4)
    full = _encode(folder, tmp_path / "full", batch_size=2, shard_size=4)
    assert resumed["stats"] == full["stats"] and resumed["count"] == 10
    for s in full["shards"]:
        assert (tmp_path / "resumed" / s["file"]).read_bytes() == (tmp_path / "full" / s["file"]).read_bytes()


def test_corrupt_images_are_skipped_and_listed_or_fail_with_strict(tmp_path):
    folder = _write_pngs(tmp_path / "imgs", IMAGES[:4])
    (folder / "notes.jpg").write_text("not an image")
    buf = (folder / "img00.png").read_bytes()
    (folder / "img99.png").write_bytes(buf[: len(buf) // 2])  # truncated
    manifest = _encode(folder, tmp_path / "out")
    assert manifest["count"] == 4
    assert sorted(s["name"] for s in manifest["skipped"]) == ["img99.png", "notes.jpg"]
    assert all(s["reason"] for s in manifest["skipped"])
    with pytest.raises(ValueError, match="img99.png"):  # the first unreadable one in sorted order
        _encode(folder, tmp_path / "strict", strict=True)


def test_bad_input_is_a_clear_error_and_nothing_is_overwritten(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="no images"):
        _encode(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        _encode(tmp_path / "missing", tmp_path / "out")
    folder = _write_pngs(tmp_path / "imgs", IMAGES[:3])
    _encode(folder, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(FileExistsError, match="codec_id"):
        _encode(folder, tmp_path / "out", codec=IdentityCodec(channels=1))
    with pytest.raises(FileExistsError, match="image_resolution"):
        _encode(folder, tmp_path / "out", resolution=4)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert _encode(folder, tmp_path / "out")["count"] == 3  # same request: already complete
    with pytest.raises(FileExistsError, match="not empty"):
        _encode(folder, tmp_path / "imgs")


def test_encode_command(tmp_path, capsys):
    from slct.cli import main

    folder = _write_pngs(tmp_path / "imgs", IMAGES[:3])
    argv = ["encode", str(folder), str(tmp_path / "out"), "--codec", "identity", "--resolution", "8",
            "--workers", "0", "--no-progress"]
    assert main(argv) == 0
    assert "3 latents (3, 8, 8)" in capsys.readouterr().out
    assert main(["encode", str(tmp_path / "nothing"), str(tmp_path / "o2"), "--codec", "identity"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_encode_utkface_with_taef2(tmp_path, shared_weights, utkface_zip):
    from slct.codecs import get_codec

    manifest = encode_dataset(utkface_zip, tmp_path / "faces", get_codec("taef2", weights_dir=shared_weights), 64,
                              batch_size=8, limit=16, num_workers=2, progress=False, shard_size=8)
    assert manifest["count"] == 16 and manifest["latent_shape"] == [32, 8, 8] and not manifest["skipped"]
    assert manifest["source"]["num_images"] == 23317 and manifest["codec"] == {"name": "taef2",
                                                                               "weights_dir": str(shared_weights)}
    z = _latents(tmp_path / "faces")
    assert np.isfinite(z).all() and 0.5 < z.std() < 2


def _pixels(out, name_order):
    """Decoded uint8 images of an identity-codec dataset, keyed by source name (skipped ones absent)."""
    x = np.round((_latents(out) + 1) * 127.5).astype(np.int64)
    return dict(zip(name_order, x))


def test_odd_images_are_converted_or_skipped_with_a_reason(tmp_path, capsys):
    """16-bit grey, transparency, tiny images, other formats, animations: each converted right or skipped, and
    every one listed in the manifest with its reason; the console prints counts per reason."""
    from slct.cli import main

    folder = tmp_path / "odd"
    folder.mkdir()
    grey16 = np.full((16, 16), 126 * 257, np.uint16)  # mean 126/255 in 16 bits (was read as almost white)
    Image.fromarray(grey16).save(folder / "a-grey16.png")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 255  # red hidden under alpha 0 on the left half
    rgba[:, 8:, 1], rgba[:, 8:, 3] = 200, 255  # opaque yellow on the right half
    Image.fromarray(rgba, "RGBA").save(folder / "b-rgba.png")
    la = np.stack([np.full((16, 16), 30, np.uint8), np.full((16, 16), 0, np.uint8)], -1)
    Image.fromarray(la, "LA").save(folder / "c-la.png")  # fully transparent grey
    Image.fromarray(np.full((1, 1, 3), 90, np.uint8)).save(folder / "d-tiny.png")
    for ext in ("bmp", "tif", "ppm"):
        Image.fromarray(np.full((16, 16, 3), 77, np.uint8)).save(folder / f"e-plain.{ext}")
    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (40, 220)]
    frames[0].save(folder / "f-anim.gif", save_all=True, append_images=frames[1:])
    palette = Image.fromarray(np.zeros((16, 16), np.uint8), "P")
    palette.putpalette([10, 20, 30] * 256)
    palette.info["transparency"] = 0
    palette.save(folder / "g-palette-transparent.png", transparency=0)
    (folder / "h-notes.txt").write_text("not an image")

    code = main(["encode", str(folder), "--out", str(tmp_path / "out"), "--codec", "identity", "--resolution", "8",
                 "--workers", "0", "--no-progress"])
    assert code == 0
    console = capsys.readouterr().out
    manifest = read_manifest(tmp_path / "out")
    names = ["a-grey16.png", "b-rgba.png", "c-la.png", "e-plain.bmp", "e-plain.ppm", "e-plain.tif", "f-anim.gif",
             "g-palette-transparent.png"]
    assert manifest["count"] == len(names)  # .bmp, .tif, .ppm, .gif are read; the 1x1 image is not
    px = _pixels(tmp_path / "out", names)
    assert abs(px["a-grey16.png"].mean() - 126) <= 1
    b = px["b-rgba.png"]
    assert (b[:, :, :3] == 255).all()  # the transparent half is the white background, not the hidden red
    assert (b[:, :, 6:] == [[[255]], [[200]], [[0]]]).all()  # the opaque half keeps its colour (away from the edge)
    assert (px["c-la.png"] == 255).all() and (px["g-palette-transparent.png"] == 255).all()
    assert (px["e-plain.bmp"] == 77).all() and (px["e-plain.tif"] == 77).all()
    assert (px["f-anim.gif"] == 40).all()  # the first frame
    assert [(s["name"], s["reason"]) for s in manifest["skipped"]] == [("d-tiny.png", "too-small")]
    converted = {(c["name"], c["reason"]) for c in manifest["converted"]}
    assert converted == {("a-grey16.png", "16-bit"), ("b-rgba.png", "alpha"), ("c-la.png", "alpha"),
                         ("f-anim.gif", "first-frame"), ("f-anim.gif", "palette"),
                         ("g-palette-transparent.png", "alpha")}
    assert manifest["converted_counts"] == {"16-bit": 1, "alpha": 3, "first-frame": 1, "palette": 1}
    assert manifest["ignored_files"] == {".txt": 1}
    assert "skipped images: 1 (too-small 1)" in console
    assert "converted images: 6 (16-bit 1, alpha 3, first-frame 1, palette 1)" in console
    assert "ignored 1 file(s) that are not images: .txt 1" in console

    # the background and the minimum size are flags
    black = _encode(folder, tmp_path / "black", alpha_background="black", min_size=0)
    assert black["count"] == len(names) + 1 and not black["skipped"]
