"""Class-conditional models end to end: labels from seeds, `slct sample --labels`, per-class evaluation and
classifier-free guidance for the ldm baseline (refused for consistency models)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slct.cli import main
from slct.config import load_config
from slct.sampling import labels_for_seeds, load_snapshot
from slct.training import train
from tiny_run import TINY_RUN

TINY = [*TINY_RUN, "logging.log_every_steps=5", "train.device=cpu", "checkpoint.every_steps=1000",
        "train.batch_size=16", "data.conditional=true"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A conditional sLCT run and a conditional ldm run with label dropout, 12 steps each on the digits."""
    out = {}
    for method, extra in (("slct", []), ("ldm", ["network.label_dropout=0.2"])):
        run = tmp_path_factory.mktemp(method)
        train(load_config(method, "digits", sets=[*TINY, "train.total_steps=12", *extra]), run, progress=False)
        out[method] = run
    return out


def test_labels_are_a_function_of_the_seed():
    seeds = list(range(100, 130))
    balanced = labels_for_seeds(None, seeds, 10)
    assert balanced.tolist() == [s % 10 for s in seeds] and np.bincount(balanced.numpy()).tolist() == [3] * 10
    assert torch.equal(labels_for_seeds("balanced", seeds[7:9], 10), balanced[7:9])  # any batch split
    random = labels_for_seeds("random", seeds, 10)
    assert torch.equal(labels_for_seeds("random", seeds[::-1], 10), random.flip(0))
    assert len(set(random.tolist())) > 3
    assert labels_for_seeds(["3"], seeds, 10).tolist() == [3] * 30
    assert labels_for_seeds(["cat", "dog"], [0, 1, 2], 2, ["cat", "dog"]).tolist() == [0, 1, 0]
    assert labels_for_seeds(["7"], [0], 2, ["3", "7"]).tolist() == [1]  # names first: class folders named by numbers
    assert labels_for_seeds("none", seeds, 10) is None and labels_for_seeds(None, seeds, 0) is None
    with pytest.raises(ValueError, match="unconditional"):
        labels_for_seeds(["3"], seeds, 0)
    with pytest.raises(ValueError, match="not one of this model.s 10 classes \\(ids 0..9"):
        labels_for_seeds(["12"], seeds, 10)
    with pytest.raises(ValueError, match="cannot be combined"):
        labels_for_seeds(["random", "3"], seeds, 10)


def test_labels_steer_a_conditional_snapshot(runs):
    snap = load_snapshot(runs["slct"])
    assert snap.num_classes == 10 and snap.class_names == [str(i) for i in range(10)]
    seeds = [0, 1, 2, 3]
    a = snap.sample_latents(seeds, 1, snap.labels(seeds, ["3"]))
    b = snap.sample_latents(seeds, 1, snap.labels(seeds, ["8"]))
    assert (a - b).abs().max() > 1e-4  # the label reaches the network
    again = snap.sample_latents(seeds[2:], 1, snap.labels(seeds[2:], ["3"]))
    torch.testing.assert_close(again, a[2:])  # a sample depends on its seed (and label) alone


def test_cli_sample_with_labels_writes_them(runs, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(["sample", str(runs["slct"]), "--n", "12", "--nfe", "1", "--labels", "balanced", "--format", "npz",
                 "grid", "--out", str(out)]) == 0
    data = np.load(out / "samples-nfe1.npz")
    assert data["labels"].tolist() == [s % 10 for s in range(12)] and list(data["class_names"])[:2] == ["0", "1"]
    assert (out / "grid-nfe1.png").is_file()
    assert main(["sample", str(runs["slct"]), "--n", "4", "--labels", "11", "--out", str(out)]) == 2
    assert "not one of this model" in capsys.readouterr().err
    assert main(["sample", str(runs["slct"]), "--n", "4", "--guidance", "2", "--out", str(out)]) == 2
    assert "consistency model" in capsys.readouterr().err


def test_guidance_for_the_ldm_baseline(runs, tmp_path):
    snap = load_snapshot(runs["ldm"])
    seeds = [0, 1, 2]
    labels = snap.labels(seeds, ["4"])
    plain = snap.sample_latents(seeds, 3, labels)
    guided = snap.sample_latents(seeds, 3, labels, guidance=3.0)
    assert (plain - guided).abs().max() > 1e-4
    torch.testing.assert_close(snap.sample_latents(seeds, 3, labels, guidance=1.0), plain)
    # the guided denoiser is uncond + w (cond - uncond), from one batched call
    from slct.sampling import Guided

    x, sigma = torch.randn(3, *snap.latent_shape), torch.full((3,), 2.0)
    with torch.no_grad():
        cond, uncond = snap.model(x, sigma, labels), snap.model(x, sigma, None)
        torch.testing.assert_close(Guided(snap.model, 3.0)(x, sigma, labels), uncond + 3 * (cond - uncond),
                                   atol=1e-5, rtol=1e-5)
    assert main(["sample", str(runs["ldm"]), "--n", "4", "--labels", "4", "--guidance", "2", "--format", "npz",
                 "--out", str(tmp_path / "g")]) == 0


def test_guidance_needs_label_dropout(tmp_path, capsys):
    run = tmp_path / "ldm-no-dropout"
    train(load_config("ldm", "digits", sets=[*TINY, "train.total_steps=2"]), run, progress=False)
    assert main(["sample", str(run), "--n", "2", "--guidance", "2", "--out", str(tmp_path / "s")]) == 2
    assert "label dropout" in capsys.readouterr().err


def test_per_class_evaluation_against_a_class_reference(runs, tmp_path, capsys):
    ref = tmp_path / "digit3.npz"
    assert main(["eval", "ref", "builtin:digits8", "--extractor", "pixels", "--class", "3", "--out", str(ref),
                 "--no-progress"]) == 0
    manifest = json.loads(ref.with_suffix(".json").read_text())
    assert manifest["class"] == "3" and 150 < manifest["count"] < 200  # the 183 threes of the 1,797 digits
    out = tmp_path / "fd.json"
    assert main(["eval", "--snapshot", str(runs["slct"]), "--ref", str(ref), "--n", "20", "--nfe", "1",
                 "--out", str(out), "--no-progress"]) == 0
    record = json.loads(out.read_text())
    assert record["labels"] == ["3"]  # taken from the reference's class
    assert main(["eval", "--snapshot", str(runs["slct"]), "--ref", str(ref), "--n", "20", "--nfe", "1",
                 "--labels", "5", "--no-progress"]) == 2
    assert "class '3'" in capsys.readouterr().err
    out_all = tmp_path / "all.json"
    assert main(["eval", "--snapshot", str(runs["slct"]), "--ref", str(ref), "--n", "20", "--nfe", "1",
                 "--labels", "3", "--out", str(out_all), "--no-progress"]) == 0
    assert json.loads(out_all.read_text())["results"][0]["fd"] == pytest.approx(record["results"][0]["fd"])


def test_training_grids_of_a_conditional_model_are_class_balanced(tmp_path, monkeypatch):
    import slct.sampling

    seen = []
    real = slct.sampling.sample_latents

    def spy(model, seeds, *args, **kwargs):
        labels = args[4] if len(args) > 4 else kwargs.get("class_labels")
        seen.append(None if labels is None else labels.tolist())
        return real(model, seeds, *args, **kwargs)

    monkeypatch.setattr(slct.sampling, "sample_latents", spy)
    cfg = load_config("slct", "digits", sets=[*TINY, "train.total_steps=2", "logging.sample_every_steps=2",
                                              "logging.grid_size=20"])
    train(cfg, tmp_path, progress=False)
    assert seen and all(labels == [s % 10 for s in range(20)] for labels in seen)


def test_class_references_decide_the_labels_of_an_evaluation():
    from types import SimpleNamespace

    from slct.commands.eval import _labels_for_references

    ref = lambda cls: SimpleNamespace(manifest={} if cls is None else {"class": cls})  # noqa: E731
    assert _labels_for_references(None, [ref(None)], ["all.npz"], 2) is None
    assert _labels_for_references(["cat"], [ref(None)], ["all.npz"], 2) == ["cat"]
    assert _labels_for_references(None, [ref("cat"), ref("cat")], ["a.npz", "b.npz"], 2) == ["cat"]
    with pytest.raises(ValueError, match="all-class reference cannot share"):
        _labels_for_references(None, [ref("cat"), ref(None)], ["a.npz", "b.npz"], 2)
    with pytest.raises(ValueError, match="different classes \\(cat, dog\\)"):
        _labels_for_references(None, [ref("dog"), ref("cat")], ["a.npz", "b.npz"], 2)
    with pytest.raises(ValueError, match="holds the images of class 'cat'"):
        _labels_for_references(["dog"], [ref("cat")], ["a.npz"], 2)
