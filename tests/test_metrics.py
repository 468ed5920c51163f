"""FD, streaming feature statistics and the k-NN metrics (precision/recall/density/coverage).

Golden values come from the closed forms and from brute-force definitions written out here.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import torch

from slct.eval.metrics import FeatureStats, frechet_distance, kth_nearest_distances, precision_recall


def _features(n: int, d: int, seed: int = 0, offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + offset


# ---------------------------------------------------------------------------------------------- FD


def test_fd_of_a_set_with_itself_is_zero():
    x = _features(400, 8)
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_fd_between_diagonal_gaussians_is_the_closed_form():
    # ||mu1 - mu2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 = (1 + 0 + 4) + (1 + 1 + 4) = 11
    mu1, var1 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 4.0, 9.0])
    mu2, var2 = np.array([1.0, 1.0, 0.0]), np.array([4.0, 1.0, 1.0])
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(11.0, abs=1e-12)


def test_fd_with_scaled_full_covariance_is_the_closed_form():
    # sigma2 = 4 sigma1: tr(s1 + 4 s1 - 2 * 2 s1) = tr(s1)
    sigma1 = np.cov(_features(200, 5, seed=1), rowvar=False)
    mu1, mu2 = np.zeros(5), np.full(5, 0.5)
    expected = 5 * 0.25 + np.trace(sigma1)
    assert frechet_distance(mu1, sigma1, mu2, 4 * sigma1) == pytest.approx(expected, rel=1e-9)


def test_fd_rejects_a_large_imaginary_component():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))


@pytest.mark.filterwarnings("ignore:frechet_distance")
def test_fd_with_singular_covariances_is_the_closed_form():
    # duplicated feature columns: Sigma = [[S, S], [S, S]], singular; FD([x, x], [y, y]) = 2 FD(x, y)
    x, y = _features(50, 3, seed=2), _features(50, 3, seed=3, offset=0.5)
    fd = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    x2, y2 = np.hstack([x, x]), np.hstack([y, y])
    fd2 = frechet_distance(x2.mean(0), np.cov(x2, rowvar=False), y2.mean(0), np.cov(y2, rowvar=False))
    assert fd2 == pytest.approx(2 * fd, rel=1e-5)


def test_fd_retries_a_non_finite_root_with_eps_and_says_so(monkeypatch):
    import slct.eval.metrics as metrics

    roots = []
    real_sqrtm = scipy.linalg.sqrtm

    def sqrtm(a):
        roots.append(a)
        return np.full_like(a, np.nan) if len(roots) == 1 else real_sqrtm(a)

    monkeypatch.setattr(metrics.scipy.linalg, "sqrtm", sqrtm)
    with pytest.warns(RuntimeWarning, match="adding 0.01 \\* I"):
        value = frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2), np.diag([1.0, 0.0]), eps=0.01)
    np.testing.assert_allclose(roots[1], np.diag([1.01 ** 2, 0.01 ** 2]))
    assert value == pytest.approx(0.0, abs=1e-12)


def test_fd_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ---------------------------------------------------------------------------------------------- FeatureStats


def test_streaming_statistics_equal_batch_statistics_and_merge_equals_one_pass(tmp_path):
    x = _features(257, 6, seed=3, offset=10.0)
    one = FeatureStats(6)
    for lo, hi in [(0, 1), (1, 50), (50, 51), (51, 257)]:
        one.update(x[lo:hi])
    np.testing.assert_allclose(one.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(one.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    assert one.n == 257

    parts = [FeatureStats(6).update(x[:100]), FeatureStats(6).update(x[100:101]), FeatureStats(6).update(x[101:])]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.n == 257
    np.testing.assert_allclose(merged.mean, one.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.cov, one.cov, rtol=1e-9, atol=1e-9)

    loaded = FeatureStats.load(one.save(tmp_path / "stats.npz"))
    assert loaded.n == one.n
    np.testing.assert_array_equal(loaded.cov, one.cov)


def test_feature_stats_keep_the_first_features_up_to_the_cap(tmp_path):
    x = _features(30, 4, seed=4)
    stats = FeatureStats(4, keep_features=True, max_kept=12)
    for lo in range(0, 30, 7):
        stats.update(x[lo:lo + 7])
    np.testing.assert_array_equal(stats.features, x[:12].astype(np.float32))
    other = FeatureStats(4, keep_features=True, max_kept=20).update(x[:5])
    other.merge(stats)
    np.testing.assert_array_equal(other.features, np.concatenate([x[:5], x[:12]]).astype(np.float32)[:20])
    loaded = FeatureStats.load(stats.save(tmp_path / "kept.npz"))
    np.testing.assert_array_equal(loaded.features, stats.features)
    assert loaded.max_kept == 12


def test_feature_stats_validate_input():
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        FeatureStats(3).update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        FeatureStats(2).update(np.array([[np.nan, 0.0]]))
    with pytest.raises(ValueError, match="empty"):
        FeatureStats(2).mean


# ---------------------------------------------------------------------------------------------- k-NN metrics


def _brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """The four definitions, written out on full distance matrices."""
    rr = scipy.spatial.distance.cdist(real, real)
    ff = scipy.spatial.distance.cdist(fake, fake)
    fr = scipy.spatial.distance.cdist(fake, real)  # (fake, real)
    r_real = np.sort(rr, axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(ff, axis=1)[:, k]
    return dict(
        precision=float(np.mean((fr <= r_real[None, :]).any(axis=1))),
        recall=float(np.mean((fr <= r_fake[:, None]).any(axis=0))),
        density=float((fr < r_real[None, :]).sum() / (k * len(fake))),
        coverage=float(np.mean(fr.min(axis=0) < r_real)),
    )


def test_precision_recall_on_a_hand_computed_example():
    # k = 1. Real 0,1,2,3: radii 1. Fake 0.5, 10: radii 9.5.
    # precision: 0.5 lies in the ball of 0, 10 in none -> 1/2; recall: every real is within 9.5 of 0.5 -> 1
    # density: 0.5 is strictly inside the balls of 0 and 1, 10 in none -> 2 / (1 * 2) = 1
    # coverage: the nearest fake is closer than 1 only for reals 0 and 1 -> 1/2
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0]])
    out = precision_recall(real, fake, k=1, device="cpu", dtype=torch.float64)
    assert out == dict(precision=0.5, recall=1.0, density=1.0, coverage=0.5)


def test_precision_recall_are_one_for_identical_sets_and_zero_for_far_apart_sets():
    x = _features(60, 5, seed=5)
    same = precision_recall(x, x.copy(), k=3, device="cpu")
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = precision_recall(x, x + 1e4, k=3, device="cpu")
    assert far == dict(precision=0.0, recall=0.0, density=0.0, coverage=0.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_knn_equals_brute_force(dtype):
    real, fake = _features(70, 5, seed=6), _features(53, 5, seed=7, offset=0.3)
    expected = _brute_force(real, fake, k=3)
    got = precision_recall(real, fake, k=3, chunk_size=16, device="cpu", dtype=dtype)  # 16 divides neither set
    assert got == pytest.approx(expected, abs=1e-12)
    radii = kth_nearest_distances(real, k=3, chunk_size=16, device="cpu", dtype=dtype)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(radii, np.sort(scipy.spatial.distance.cdist(real, real), axis=1)[:, 3], rtol=rtol)


def test_knn_metrics_validate_arguments():
    x = _features(5, 2)
    with pytest.raises(ValueError, match="more than 5 samples"):
        precision_recall(x, x, k=5, device="cpu")
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(x, x, k=0, device="cpu")
    with pytest.raises(ValueError, match="dimension"):
        precision_recall(x, _features(5, 3), device="cpu")
