"""``slct analyze``: box-plot statistics, the temporal difference, the report files and the command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch

from slct.analyze import analyze, box_stats, channel_box_stats, format_table, temporal_differences
from slct.data import encode_dataset
from slct.data.sources import ArraySource


def test_box_stats_hand_computed():
    # sorted: -100 1 2 3 4 5 6 7 15 100; linear quantiles at positions 2.25, 4.5, 6.75
    s = box_stats(np.array([5, 1, 100, 3, 2, 7, -100, 4, 15, 6], float))
    assert (s["q1"], s["median"], s["q3"], s["iqr"]) == (2.25, 4.5, 6.75, 4.5)
    assert (s["inner_fence_lo"], s["inner_fence_hi"]) == (2.25 - 6.75, 6.75 + 6.75)   # 1.5 IQR
    assert (s["outer_fence_lo"], s["outer_fence_hi"]) == (2.25 - 13.5, 6.75 + 13.5)   # 3 IQR
    assert s["beyond_inner"] == 0.3 and s["beyond_outer"] == 0.2   # {-100, 15, 100} and {-100, 100}
    assert (s["whisker_lo"], s["whisker_hi"], s["min"], s["max"]) == (1, 7, -100, 100)
    v = np.array([5, 1, 100, 3, 2, 7, -100, 4, 15, 6], float)
    assert s["excess_kurtosis"] == pytest.approx(scipy.stats.kurtosis(v, fisher=True, bias=True), rel=1e-12)


def test_gaussian_fence_fractions_match_theory():
    x = np.random.default_rng(0).standard_normal(400_000)
    s = box_stats(x)
    z_q3 = scipy.stats.norm.ppf(0.75)
    inner = 2 * scipy.stats.norm.sf(z_q3 + 1.5 * 2 * z_q3)  # 0.70% of a Gaussian lies beyond the inner fences
    assert s["beyond_inner"] == pytest.approx(inner, abs=6e-4)
    assert s["beyond_outer"] < 2e-5 and abs(s["excess_kurtosis"]) < 0.05


def test_channel_box_stats_layout():
    x = np.random.default_rng(0).standard_normal((5, 3, 2, 2))
    x[:, 2] *= 10
    stats = channel_box_stats(x)
    assert len(stats["channels"]) == 3 and stats["all"]["count"] == 60
    assert stats["channels"][2]["max"] == x[:, 2].max()


class Identity(torch.nn.Module):
    """f(x, t) = x: the TD then equals (t_{i+1} - t_i) z."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma, class_labels=None):
        return x


def test_temporal_difference_uses_adjacent_karras_levels():
    from slct import karras_sigmas, sample_timestep_indices

    x0 = torch.randn(6, 2, 3, 3)
    td = temporal_differences(Identity(), x0, 11, torch.Generator().manual_seed(5), batch_size=4)
    # replay the draws: per batch one index draw then one noise draw
    g = torch.Generator().manual_seed(5)
    sigmas = karras_sigmas(11)
    expected = []
    for size in (4, 2):
        i = sample_timestep_indices(11, size, generator=g)
        z = torch.randn(size, 2, 3, 3, generator=g)
        expected.append((sigmas[i + 1] - sigmas[i]).float().view(-1, 1, 1, 1) * z)
    torch.testing.assert_close(td, torch.cat(expected), rtol=1e-5, atol=1e-5)
    assert math.isclose(float(sigmas[-1]), 80.0)


@pytest.fixture(scope="module")
def tiny_latents(tmp_path_factory):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(24, 8, 8, 3), dtype=np.uint8)
    out = tmp_path_factory.mktemp("an") / "ds"
    encode_dataset(ArraySource(images), out, {"name": "identity"}, 8, num_workers=0, progress=False)
    return out


def test_analyze_writes_figure_and_json_with_td(tiny_latents, tmp_path):
    report = analyze(tiny_latents, tmp_path / "a", limit=16, network="unet-tiny", n_scales=21, td_samples=8)
    assert (tmp_path / "a" / "analysis.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved["panels"]) == {"latents data", "latents td"} and saved["samples"] == {"latents": 16}
    assert saved["td"]["n_scales"] == 21 and saved["td"]["samples"] == 8
    data = saved["panels"]["latents data"]["all"]
    assert data["count"] == 16 * 3 * 64 and abs(data["mean"]) < 1e-9 and data["std"] == pytest.approx(1)
    table = format_table(report)
    assert "latents data" in table and "latents td" in table and ">outer" in table


def test_analyze_command(tiny_latents, tmp_path, capsys):
    from slct.cli import main

    assert main(["analyze", str(tiny_latents), "--out", str(tmp_path / "o"), "--limit", "0"]) == 0
    out = capsys.readouterr().out
    assert "latents data" in out and "standard deviations" in out and (tmp_path / "o" / "analysis.png").exists()
    assert main(["analyze", str(tiny_latents), "--out", str(tmp_path / "p"), "--pixels"]) == 2  # array source
    assert "not readable here" in capsys.readouterr().err


def test_pixels_of_a_held_out_encode_show_progress_and_are_the_encoded_images(tmp_path, capsys):
    """`analyze --pixels` reads the images that were encoded (the train split, not the whole source) with a
    progress bar (it once ran 21 minutes without one)."""
    from PIL import Image

    from slct.analyze import load_pixels
    from slct.cli import main
    from slct.data import read_manifest

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(20):
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(folder / f"{i:02d}.png")
    data = tmp_path / "latents"
    encode_dataset(folder, data, {"name": "identity", "channels": 3}, 8, num_workers=0, progress=False, holdout=5,
                   split="train")
    pixels = load_pixels(read_manifest(data), limit=None, num_workers=0)
    from slct.data.encode import split_indices

    expected = split_indices(20, 5, "train") * 10 / 127.5 - 1
    np.testing.assert_allclose(pixels[:, 0, 0, 0], expected, atol=1e-12)
    assert main(["analyze", str(data), "--out", str(tmp_path / "o"), "--pixels", "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "pixels: read images" in err and "15/15" in err and "box statistics of" in err


def test_plain_and_outlier_latents_side_by_side(tmp_path, capsys):
    """`slct analyze A B --out DIR`: both analysed, one comparison figure and JSON; the spike codec's latents of the
    same images are impulsive (the paper's Fig. 1 premise, controlled)."""
    from slct.cli import main

    rng = np.random.default_rng(0)
    images = rng.normal(127, 30, (64, 8, 8, 3)).clip(0, 255).astype(np.uint8)
    plain, spiky = tmp_path / "plain", tmp_path / "spiky"
    encode_dataset(ArraySource(images), plain, {"name": "identity"}, 8, num_workers=0, progress=False)
    encode_dataset(ArraySource(images), spiky, {"name": "outliers", "base": {"name": "identity"}, "strength": 20.0},
                   8, num_workers=0, progress=False)
    assert main(["analyze", str(plain), str(spiky), "--no-progress"]) == 2  # several datasets need --out
    assert "pass --out DIR" in capsys.readouterr().err
    assert main(["analyze", str(plain), str(spiky), "--out", str(tmp_path / "cmp"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "plain latents data" in out and "spiky latents data" in out
    summary = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["datasets"]
    kurt = {name: d["panels"]["latents data"]["excess_kurtosis"] for name, d in summary.items()}
    assert kurt["spiky"] > kurt["plain"] + 10 and summary["spiky"]["codec"]["strength"] == 20.0
    advice = {name: d["advice"] for name, d in summary.items()}  # each dataset's recipe, printed too
    assert advice["spiky"]["kurtosis"] > advice["plain"]["kurtosis"] + 10
    assert f"spiky: {advice['spiky']['text']}" in out
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 0 and (tmp_path / "cmp" / "plain").is_dir()


def test_recipe_advice_follows_the_nearest_finding_at_or_below():
    """`slct analyze`'s advice: at the measured kurtosis at or below the latents' (below every one: the lowest), the
    recipe that beat iLCT by the most beyond 2 pooled sd, else ilct; beyond the range said so."""
    from slct.analyze import PremiseFinding, recipe_advice

    F = PremiseFinding
    findings = (F("1", 0.2, "slct", 30.0, 8.0), F("1", 0.2, "ladder-cauchy", 9.0, 4.0),
                F("spike:10", 100.0, "slct", 1.0, 6.0), F("spike:10", 100.0, "ladder-cauchy", -2.0, 6.0),
                F("spike:30", 200.0, "slct", -12.0, 6.0), F("spike:30", 200.0, "ladder-cauchy", -20.0, 6.0),
                F("spike:30", 200.0, "ladder-diff", -3.0, 6.0))
    assert [f.verdict for f in findings] == ["ilct", "ilct", "tie", "tie", "slct", "ladder-cauchy", "tie"]
    low = recipe_advice(0.1, findings)
    assert low["preset"] == "ilct" and "no recipe beat iLCT; it beat ladder-cauchy, slct" in low["text"]
    tie = recipe_advice(150.0, findings)
    assert tie["preset"] == "ilct" and "no recipe beat iLCT, and it is the simplest" in tie["text"]
    assert tie["threshold"] == 200.0 and tie["threshold_preset"] == "ladder-cauchy"
    assert "from kurtosis 200.0 on (ladder-cauchy)" in tie["text"]
    high = recipe_advice(250.0, findings)  # the larger of the two wins
    assert high["preset"] == "ladder-cauchy" and "beyond the measured range" in high["text"]
    assert "ladder-cauchy beat iLCT by 20.0, 2 pooled sd 6.0" in recipe_advice(200.0, findings)["text"]
    assert "200.00: ladder-cauchy -20.0 (6.0), slct -12.0 (6.0), ladder-diff -3.0 (6.0)" in high["text"]
    assert recipe_advice(5.0, findings[:4])["threshold"] is None
    assert "at any kurtosis measured (up to 100.0)" in recipe_advice(5.0, findings[:4])["text"]
    assert recipe_advice(5.0, ())["preset"] is None


def test_latent_kurtosis_is_the_per_element_statistic():
    from slct.analyze import STANDARDIZE, box_stats, latent_kurtosis

    x = np.random.default_rng(0).standard_t(3, (256, 2, 3, 3)) * np.arange(1, 19).reshape(1, 2, 3, 3)
    assert latent_kurtosis(x) == box_stats(STANDARDIZE["per-element"](x))["excess_kurtosis"]
    assert abs(latent_kurtosis(np.random.default_rng(1).normal(size=(4096, 2, 3, 3)))) < 0.2


def test_the_advice_rests_on_the_committed_premise_report():
    """slct.analyze.PREMISE_FINDINGS are the findings of benchmarks/results/premise-utkface64-2000steps.json (the
    command `python benchmarks/premise.py`), rounded: the advice `slct analyze` prints is measured, not typed in."""
    from pathlib import Path

    from slct.analyze import PREMISE_FINDINGS

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "premise-utkface64-2000steps.json"
    measured = json.loads(path.read_text())["findings"]
    assert [(f.strength, f.method) for f in PREMISE_FINDINGS] == [(m["strength"], m["method"]) for m in measured]
    assert measured
    for f, m in zip(PREMISE_FINDINGS, measured):
        assert f.kurtosis == pytest.approx(m["kurtosis"], abs=0.01)
        assert f.minus_ilct == pytest.approx(m["minus_ilct"], abs=0.05)
        assert f.two_pooled_sd == pytest.approx(m["two_pooled_sd"], abs=0.05)
