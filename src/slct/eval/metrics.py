"""Sample-quality metrics in a feature space (REFERENCE.md [10]).

* Frechet distance (FID when the features are Inception-V3 pool3; Heusel et al. 2017) between
  Gaussians fitted to two feature sets, from streaming float64 moments (:class:`FeatureStats`).
* Precision and recall (Kynkaanniemi et al. 2019; k = 3 is the paper's recall) and density and
  coverage (Naeem et al. 2020), all from k-nearest-neighbour balls in the same feature space.
  Distances are computed in ``chunk_size`` x ``chunk_size`` blocks, so 50k x 50k fits in memory.

Conventions: features are arrays of shape (N, D); a "ball" around a point has the radius of the
distance to its k-th nearest neighbour within its own set (the point itself excluded).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

# ----------------------------------------------------------------------------------------------
# Streaming moments.


class FeatureStats:
    """Running float64 sums of features and of their outer products, mergeable across processes.

    ``update`` adds a batch; ``merge`` adds another accumulator (what an all-reduce of the sums
    does), so the moments do not depend on how the samples were split into batches or ranks.
    With ``keep_features=True`` the first ``max_kept`` features (in update order) are also kept,
    as float32, for precision/recall.

    Args:
        dim: feature dimension D.
        keep_features: also keep raw features.
        max_kept: cap on the kept features (None: no cap).
    """

    def __init__(self, dim: int, keep_features: bool = False, max_kept: int | None = None):
        if int(dim) != dim or dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if max_kept is not None and max_kept < 0:
            raise ValueError(f"max_kept must be >= 0 or None, got {max_kept!r}")
        self.dim = int(dim)
        self.keep_features = bool(keep_features)
        self.max_kept = max_kept
        self.n = 0
        self.sum = np.zeros(self.dim, dtype=np.float64)
        self.sum_outer = np.zeros((self.dim, self.dim), dtype=np.float64)
        self._kept: list[np.ndarray] = []
        self._num_kept = 0

    def update(self, features: np.ndarray | torch.Tensor) -> "FeatureStats":
        """Add a batch of features, shape (N, D)."""
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must have shape (N, {self.dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf (are the generated images finite?)")
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x
        self._keep(x.astype(np.float32))
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add the samples of ``other`` (e.g. another rank's) to this accumulator, in place."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge FeatureStats of dim {other.dim} into dim {self.dim}")
        self.n += other.n
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        if other.features is not None:
            self._keep(other.features)
        return self

    def _keep(self, x: np.ndarray) -> None:
        if not self.keep_features:
            return
        room = x.shape[0] if self.max_kept is None else self.max_kept - self._num_kept
        if room > 0:
            self._kept.append(x[:room])
            self._num_kept += min(room, x.shape[0])

    @property
    def mean(self) -> np.ndarray:
        """(D,) float64 sample mean."""
        if self.n < 1:
            raise ValueError("FeatureStats is empty: no features were added")
        return self.sum / self.n

    @property
    def cov(self) -> np.ndarray:
        """(D, D) float64 unbiased sample covariance (divides by n - 1, as ``np.cov`` and pytorch-fid)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        mu = self.mean
        return (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    @property
    def features(self) -> np.ndarray | None:
        """(M, D) float32 kept features, or None when ``keep_features`` is off."""
        if not self.keep_features:
            return None
        if not self._kept:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(self._kept) > 1:
            self._kept = [np.concatenate(self._kept)]
        return self._kept[0]

    def save(self, path: str | os.PathLike, **extra: np.ndarray | str) -> Path:
        """Write an ``.npz`` with the sums, ``mu``/``sigma`` (readable by pytorch-fid) and the kept features."""
        path = Path(path)
        arrays = dict(n=np.int64(self.n), sum=self.sum, sum_outer=self.sum_outer, mu=self.mean, sigma=self.cov)
        if self.keep_features:
            arrays["features"] = self.features
            arrays["max_kept"] = np.int64(-1 if self.max_kept is None else self.max_kept)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # a file object keeps np.savez from appending a second ".npz"
            np.savez(f, **arrays, **extra)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        """Read a file written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as data:
            if "sum_outer" not in data:
                raise ValueError(f"{path} holds no slct FeatureStats (keys: {sorted(data.files)})")
            keep = "features" in data
            max_kept = int(data["max_kept"]) if keep else None
            stats = cls(data["sum"].shape[0], keep_features=keep,
                        max_kept=None if max_kept is None or max_kept < 0 else max_kept)
            stats.n = int(data["n"])
            stats.sum = data["sum"].astype(np.float64)
            stats.sum_outer = data["sum_outer"].astype(np.float64)
            if keep:
                stats._kept = [data["features"].astype(np.float32)]
                stats._num_kept = stats._kept[0].shape[0]
        return stats


# ----------------------------------------------------------------------------------------------
# Frechet distance.


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, max_imag: float = 1e-3) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017; REFERENCE.md [10]):

        d^2 = ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    The matrix square root is scipy's. When the product is singular (e.g. fewer samples than
    dimensions: scipy warns or returns non-finite values) ``eps * I`` is added to both covariances,
    as in pytorch-fid, and a RuntimeWarning says so. Rounding gives the root a small imaginary part;
    a diagonal imaginary part above ``max_imag`` means the inputs are not valid covariances and
    raises ValueError.

    Args:
        mu1, mu2: (D,) means.  sigma1, sigma2: (D, D) covariances.
    Returns:
        the squared distance d^2 (what "FID" reports), a float.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mu1 and mu2 must be vectors of one length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"sigma1 and sigma2 must be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
        try:
            covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
            singular = not np.isfinite(covmean).all()
        except scipy.linalg.LinAlgWarning:
            singular = True
    if singular:
        warnings.warn(f"frechet_distance: the covariance product is singular (fewer samples than dimensions?); "
                      f"adding {eps:g} * I to both covariances", RuntimeWarning, stacklevel=2)
        # the distance between the regularised Gaussians; pytorch-fid offsets only the root, which biases
        # the result by -2 d eps (never triggered by 50k samples of 2048-d features, which are full rank)
        sigma1, sigma2 = sigma1 + eps * np.eye(d), sigma2 + eps * np.eye(d)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > max_imag:
            raise ValueError(f"matrix square root has imaginary component {imag:.3g} > {max_imag}: "
                             "sigma1 and sigma2 must be symmetric positive semi-definite")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ----------------------------------------------------------------------------------------------
# k-NN metrics.


def _as_tensor(x: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    x = torch.as_tensor(x).to(device=device, dtype=dtype)
    if x.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {tuple(x.shape)}")
    return x


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _kth_nearest(x: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    n = x.shape[0]
    radii = torch.empty(n, dtype=x.dtype, device=x.device)
    for r0 in range(0, n, chunk_size):
        rows = x[r0:r0 + chunk_size]
        best = None
        for c0 in range(0, n, chunk_size):
            dist = torch.cdist(rows, x[c0:c0 + chunk_size])
            if c0 == r0:
                dist.fill_diagonal_(0.0)  # exact self-distance (the mm-based cdist leaves rounding)
            cand = dist if best is None else torch.cat([best, dist], dim=1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[r0:r0 + chunk_size] = best[:, k]
    return radii


def _check_knn_args(n: int, k: int, chunk_size: int) -> None:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if n <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} samples, got {n}")


def kth_nearest_distances(features: np.ndarray | torch.Tensor, k: int = 3, chunk_size: int = 4096,
                          device: str | torch.device | None = None,
                          dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Distance from every row of ``features`` (N, D) to its k-th nearest other row, shape (N,).

    Blocks of ``chunk_size`` x ``chunk_size`` distances; a running top-(k+1) per row keeps memory at
    O(chunk_size^2). The point itself (distance 0, set exactly) is the first of the k + 1.
    """
    x = _as_tensor(features, _default_device(device), dtype)
    _check_knn_args(x.shape[0], k, chunk_size)
    return _kth_nearest(x, int(k), int(chunk_size)).cpu().numpy()


def precision_recall(real_features: np.ndarray | torch.Tensor, fake_features: np.ndarray | torch.Tensor,
                     k: int = 3, chunk_size: int = 4096, device: str | torch.device | None = None,
                     dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Precision, recall (Kynkaanniemi et al. 2019), density and coverage (Naeem et al. 2020).

    With r_i the k-NN radius of real sample i and s_j that of fake sample j:

    * precision = mean_j [exists i: d(fake_j, real_i) <= r_i]  (fakes inside the real manifold)
    * recall    = mean_i [exists j: d(real_i, fake_j) <= s_j]  (reals inside the fake manifold)
    * density   = 1/(k M) sum_j #{i: d(fake_j, real_i) < r_i}
    * coverage  = mean_i [min_j d(real_i, fake_j) < r_i]

    ``<=`` for precision/recall as in the authors' (NVlabs) implementation, ``<`` for density/coverage
    as in Naeem et al.'s; they differ only on exact ties. Real and fake sets may differ in size.

    Args:
        real_features: (N, D) features of real images.
        fake_features: (M, D) features of generated images.
        k: neighbourhood size (3: the paper's recall).
        chunk_size: rows/columns per distance block (memory O(chunk_size^2)).
        device: where distances are computed (default: CUDA when available).
        dtype: distance precision (float32; float64 for exact comparisons).
    Returns:
        dict with float ``precision``, ``recall``, ``density``, ``coverage``.
    """
    device = _default_device(device)
    real = _as_tensor(real_features, device, dtype)
    fake = _as_tensor(fake_features, device, dtype)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    _check_knn_args(real.shape[0], k, chunk_size)
    _check_knn_args(fake.shape[0], k, chunk_size)
    k, chunk_size = int(k), int(chunk_size)
    r_real = _kth_nearest(real, k, chunk_size)
    r_fake = _kth_nearest(fake, k, chunk_size)

    in_real = torch.zeros(fake.shape[0], dtype=torch.bool, device=device)  # precision, per fake
    in_fake = torch.zeros(real.shape[0], dtype=torch.bool, device=device)  # recall, per real
    density_count = torch.zeros((), dtype=torch.float64, device=device)
    nearest_fake = torch.full((real.shape[0],), float("inf"), dtype=dtype, device=device)  # coverage
    for f0 in range(0, fake.shape[0], chunk_size):
        f1 = min(f0 + chunk_size, fake.shape[0])
        for r0 in range(0, real.shape[0], chunk_size):
            r1 = min(r0 + chunk_size, real.shape[0])
            dist = torch.cdist(fake[f0:f1], real[r0:r1])  # (fakes, reals)
            radius = r_real[r0:r1].unsqueeze(0)
            in_real[f0:f1] |= (dist <= radius).any(dim=1)
            in_fake[r0:r1] |= (dist <= r_fake[f0:f1].unsqueeze(1)).any(dim=0)
            density_count += (dist < radius).sum()
            nearest_fake[r0:r1] = torch.minimum(nearest_fake[r0:r1], dist.min(dim=0).values)
    return dict(
        precision=in_real.double().mean().item(),
        recall=in_fake.double().mean().item(),
        density=(density_count / (k * fake.shape[0])).item(),
        coverage=(nearest_fake < r_real).double().mean().item(),
    )
