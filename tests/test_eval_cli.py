"""The evaluation protocol and `slct eval`: reference statistics, folders, snapshots (with a fake snapshot API)."""

from __future__ import annotations

import hashlib
import json
import sys
import types
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from slct.cli import main
from slct.eval import (compute_reference, evaluate, get_extractor, load_reference, reference_from_images,
                       save_reference)
from slct.eval.evaluate import check_compatible


def _images_for(seeds: list[int], size: int = 4) -> torch.Tensor:
    """A deterministic 'generator': image i depends on seeds[i] only, NCHW in [-1, 1]."""
    out = [torch.rand(3, size, size, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in seeds]
    return torch.stack(out)


def _write_pngs(folder, images: torch.Tensor) -> None:
    folder.mkdir(parents=True)
    u8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, im in enumerate(u8):
        PIL.Image.fromarray(im).save(folder / f"{i:04d}.png")


@pytest.fixture()
def pixels():
    return get_extractor("pixels", size=4)  # 48-d: more samples than dimensions, and a cheap sqrtm


def test_results_do_not_depend_on_the_batch_size(pixels):
    reference = reference_from_images(_images_for(list(range(100, 160))), pixels)
    a = evaluate(_images_for, n=30, batch_size=4, extractor=pixels, reference=reference, seed=5, progress=False)
    b = evaluate(_images_for, n=30, batch_size=7, extractor=pixels, reference=reference, seed=5, progress=False)
    assert a["fd"] == pytest.approx(b["fd"], rel=1e-9)
    for key in ("precision", "recall", "density", "coverage", "n", "n_pr_fake"):
        assert a[key] == b[key], key
    assert a["n"] == 30 and a["n_pr_fake"] == 30 and a["n_pr_real"] == 60 and a["label"] == "FD-pixels"


def test_a_generator_scored_against_its_own_samples(pixels):
    reference = reference_from_images(_images_for(list(range(60))), pixels)
    same = evaluate(_images_for, n=60, batch_size=16, extractor=pixels, reference=reference, progress=False)
    assert abs(same["fd"]) < 1e-8
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    only_fd = evaluate(_images_for, n=60, batch_size=16, extractor=pixels, reference=reference,
                       max_pr_samples=0, progress=False)
    assert only_fd["precision"] is None and only_fd["fd"] == pytest.approx(same["fd"], abs=1e-9)


def test_a_reference_of_another_feature_space_is_refused(pixels):
    reference = reference_from_images(_images_for(list(range(10))), get_extractor("pixels", size=2))
    with pytest.raises(ValueError, match="input_size: reference 2 vs now 4"):
        check_compatible(pixels, reference)


def test_reference_of_a_zip_equals_that_of_the_folder_and_round_trips(tmp_path, pixels):
    images = _images_for(list(range(12)), size=6)
    _write_pngs(tmp_path / "real", images)
    with zipfile.ZipFile(tmp_path / "real.zip", "w") as z:
        for png in sorted((tmp_path / "real").iterdir()):
            z.write(png, f"real/{png.name}")
    from_folder = compute_reference(tmp_path / "real", pixels, progress=False)
    from_zip = compute_reference(tmp_path / "real.zip", pixels, progress=False)
    np.testing.assert_array_equal(from_folder.features, from_zip.features)
    np.testing.assert_array_equal(from_folder.features, pixels(images).astype(np.float32))  # same policy as generated
    assert from_zip.manifest["count"] == 12 and from_zip.manifest["source_kind"] == "zip"

    loaded = load_reference(save_reference(from_zip, tmp_path / "ref.npz"))
    np.testing.assert_array_equal(loaded.sigma, from_zip.sigma)
    assert loaded.manifest == json.loads((tmp_path / "ref.json").read_text())

    cropped = compute_reference(tmp_path / "real", pixels, resolution=3, progress=False)
    assert cropped.manifest["resolution"] == 3 and cropped.manifest["resample"] == "bicubic"


def test_cli_reference_then_folder_evaluation(tmp_path, capsys):
    _write_pngs(tmp_path / "real", _images_for(list(range(60))))
    ref = tmp_path / "ref.npz"
    assert main(["eval", "ref", str(tmp_path / "real"), "--extractor", "pixels", "--out", str(ref),
                 "--no-progress"]) == 0
    manifest = json.loads(ref.with_suffix(".json").read_text())
    assert manifest["count"] == 60 and manifest["extractor"]["name"] == "pixels"
    assert main(["eval", "ref", str(tmp_path / "real"), "--extractor", "pixels", "--out", str(ref)]) == 0
    assert "already computed" in capsys.readouterr().out

    small = tmp_path / "small.npz"  # the CLI rebuilds the reference's extractor: here pixels at 4x4
    save_reference(compute_reference(tmp_path / "real", get_extractor("pixels", size=4), progress=False), small)
    out = tmp_path / "res.json"
    assert main(["eval", "--images", str(tmp_path / "real"), "--ref", str(small), "--out", str(out),
                 "--no-progress"]) == 0
    record = json.loads(out.read_text())
    (row,) = record["results"]
    assert abs(row["fd"]) < 1e-8 and row["precision"] == row["recall"] == 1.0 and row["n"] == 60
    assert record["extractors"][0]["name"] == "pixels" and record["extractors"][0]["input_size"] == 4
    assert record["references"][0]["sha256"] == hashlib.sha256(small.read_bytes()).hexdigest()
    assert "FD-pixels" in capsys.readouterr().out


def test_cli_snapshot_evaluation_records_what_reproduces_it(tmp_path, monkeypatch, capsys):
    snapshot_file = tmp_path / "snapshot-000100.pt"
    snapshot_file.write_bytes(b"weights")
    calls = []

    class FakeSnapshot:
        num_classes = 0
        image_size = (4, 4)  # what _images_for makes

        def labels(self, seeds, spec=None):
            return None

        def check_guidance(self, guidance):
            assert guidance == 1

        def generate(self, seeds, nfe, class_labels=None, guidance=1.0):
            calls.append((list(seeds), nfe))
            return _images_for(list(seeds))

        def info(self):
            return {"path": str(snapshot_file), "step": 100, "codec": {"name": "identity", "channels": 3}}

    import slct.sampling

    fake = types.ModuleType("slct.sampling")
    fake.load_snapshot = lambda path, device=None: FakeSnapshot()
    fake.describe_labels = slct.sampling.describe_labels
    monkeypatch.setitem(sys.modules, "slct.sampling", fake)

    real = _images_for(list(range(1000, 1060)))
    refs = [save_reference(reference_from_images(real, get_extractor("pixels", size=size)), tmp_path / f"{size}.npz")
            for size in (4, 2)]  # two feature spaces, one pass of generation
    out = tmp_path / "results.json"
    assert main(["eval", "--snapshot", str(snapshot_file), "--ref", *map(str, refs), "--n", "10", "--nfe", "1", "2",
                 "--batch-size", "4", "--seed", "3", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    record = json.loads(out.read_text())
    assert [(r["nfe"], r["n"]) for r in record["results"]] == [(1, 10), (1, 10), (2, 10), (2, 10)]
    assert [e["input_size"] for e in record["extractors"]] == [4, 2] and record["nfe"] == [1, 2]
    assert record["n"] == 10 and record["seeds"]["first"] == 3 and record["seeds"]["last"] == 12
    assert record["snapshot"]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert record["codec"] == {"name": "identity", "channels": 3}
    assert record["references"][1]["manifest"]["extractor"]["input_size"] == 2
    assert record["arguments"]["n"] == 10 and record["arguments"]["batch_size"] == 4
    assert set(record) >= {"slct_version", "created", "k", "max_pr_samples", "wall_time_s"}
    assert sorted(s for seeds, nfe in calls if nfe == 1 for s in seeds) == list(range(3, 13))  # each seed once
    assert max(len(seeds) for seeds, _ in calls) == 4
    printed = capsys.readouterr().out
    assert "nfe" in printed and "precision" in printed


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["eval", "--images", str(tmp_path)]) == 2
    assert "--ref STATS.npz is required" in capsys.readouterr().err
    assert main(["eval", "--images", str(tmp_path), "--ref", str(tmp_path / "none.npz")]) == 2
    assert "slct eval ref" in capsys.readouterr().err
    assert main(["eval", "ref", str(tmp_path), "--extractor", "clip", "--out", str(tmp_path / "r.npz")]) == 2
    assert "extractor must be one of" in capsys.readouterr().err
    assert main(["eval", "--images", str(tmp_path), "--ref", "a.npz", "b.npz", "--extractor", "pixels"]) == 2
    assert "--extractor goes with a single --ref" in capsys.readouterr().err


def test_reference_of_a_latent_dataset_decodes_through_its_codec(tmp_path, pixels):
    from slct.data import encode_dataset

    images = _images_for(list(range(50)))
    _write_pngs(tmp_path / "real", images)
    encode_dataset(tmp_path / "real", tmp_path / "latents", {"name": "identity", "channels": 3}, resolution=4,
                   num_workers=0, device="cpu", progress=False)
    from_latents = compute_reference(tmp_path / "latents", pixels, progress=False)
    assert from_latents.manifest["source_kind"] == "latents"
    assert from_latents.manifest["codec"]["name"] == "identity"
    # the identity codec stores the images themselves: the decoded reference is the images' own
    np.testing.assert_allclose(from_latents.features, pixels(images).astype(np.float32), atol=1e-6)
