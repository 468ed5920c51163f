"""Dataset statistics in one streaming pass, in float64 (REFERENCE.md [7]).

The ``Normalizer`` reads its mean and std from these statistics; ``slct analyze`` and the manifest
report the rest. Means and variances are merged batch by batch with Chan et al.'s pairwise update
(no sum-of-squares cancellation). Quantiles come from a per-channel uniform sample of the values
(reservoir sampling, seeded): exact while a channel has at most ``sample_size`` values, a uniform
sample of that size beyond.
"""

from __future__ import annotations

from typing import Any

import numpy as np

QUANTILE_LEVELS = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)
SAMPLE_SIZE = 2 ** 18  # values kept per channel for quantiles: 2 MiB each in float64
CHUNK_VALUES = 2 ** 23  # values converted to float64 at a time (64 MiB), whatever the shard size


class _Moments:
    """Running (count, mean, M2, min, max) over axis 0 of the batches fed to ``update``."""

    def __init__(self, shape: tuple[int, ...]):
        self.count = 0
        self.mean = np.zeros(shape, np.float64)
        self.m2 = np.zeros(shape, np.float64)
        self.min = np.full(shape, np.inf)
        self.max = np.full(shape, -np.inf)

    def update(self, x: np.ndarray) -> None:
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(axis=0)
        m2_b = np.square(x - mean_b).sum(axis=0)
        n = self.count + n_b
        delta = mean_b - self.mean
        # Chan, Golub & LeVeque (1979): merge two partial (count, mean, M2)
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + np.square(delta) * (self.count * n_b / n)
        self.count = n
        np.minimum(self.min, x.min(axis=0), out=self.min)
        np.maximum(self.max, x.max(axis=0), out=self.max)

    def summary(self) -> dict[str, Any]:
        """Population statistics (ddof = 0) as nested lists."""
        std = np.sqrt(self.m2 / max(self.count, 1))
        return {"mean": self.mean.tolist(), "std": std.tolist(), "min": self.min.tolist(), "max": self.max.tolist()}


class _Reservoir:
    """A uniform sample of at most ``size`` values per channel (Vitter's algorithm R, vectorised)."""

    def __init__(self, channels: int, size: int, seed: int):
        self.values = np.empty((channels, 0), np.float64)  # grows to (channels, size) while filling
        self.size, self.seen = size, 0
        self.rng = np.random.default_rng(seed)

    def update(self, x: np.ndarray) -> None:
        """x: (channels, m) new values, in stream order."""
        m = x.shape[1]
        fill = min(max(self.size - self.seen, 0), m)
        if fill:
            self.values = np.concatenate([self.values, x[:, :fill]], axis=1)
        if fill < m:
            # value number j (0-based, j >= size) replaces a uniform slot with probability size / (j + 1)
            j = np.arange(self.seen + fill, self.seen + m)
            slot = self.rng.integers(0, j + 1)
            keep = slot < self.size
            slot, src = slot[keep], np.flatnonzero(keep) + fill
            # when a slot is hit twice in one batch the later value wins, as in the sequential algorithm
            last = len(slot) - 1 - np.unique(slot[::-1], return_index=True)[1]
            self.values[:, slot[last]] = x[:, src[last]]
        self.seen += m

    def sample(self) -> np.ndarray:
        return self.values


class StreamingStats:
    """Per-element, per-channel and global statistics of latents (N, C, H, W), fed batch by batch.

    Feeding the same batches in the same order gives bit-identical results (the encoder relies on this
    to resume). ``summary()`` returns a JSON-able dict::

        {"count": N, "quantile_levels": [...], "quantile_exact": bool,
         "per_element": {"mean", "std", "min", "max"}       # each (C, H, W) nested lists
         "per_channel": {"mean", "std", "min", "max"}       # each [C]
                         + {"quantiles"}                     # [C][levels]
         "global": {"mean", "std", "min", "max", "quantiles"}}

    Standard deviations are population ones (ddof = 0).
    """

    def __init__(self, shape: tuple[int, int, int], quantile_levels=QUANTILE_LEVELS,
                 sample_size: int = SAMPLE_SIZE, seed: int = 0):
        if len(shape) != 3:
            raise ValueError(f"shape must be (C, H, W), got {shape!r}")
        self.shape = tuple(int(s) for s in shape)
        self.levels = tuple(float(q) for q in quantile_levels)
        self.element = _Moments(self.shape)
        self.channel = _Moments((self.shape[0],))
        self.all = _Moments(())
        self.reservoir = _Reservoir(self.shape[0], sample_size, seed)

    @property
    def count(self) -> int:
        return self.element.count

    def update(self, latents: np.ndarray) -> None:
        """Add latents (N, C, H, W), any float dtype (a memory map is read in chunks)."""
        if tuple(latents.shape[1:]) != self.shape:
            raise ValueError(f"latents must have shape (N, {', '.join(map(str, self.shape))}), got {latents.shape}")
        rows = max(1, CHUNK_VALUES // int(np.prod(self.shape)))
        for start in range(0, len(latents), rows):
            self._update(np.asarray(latents[start:start + rows], dtype=np.float64))

    def _update(self, x: np.ndarray) -> None:
        per_channel = x.transpose(1, 0, 2, 3).reshape(self.shape[0], -1)  # (C, N*H*W), stream order
        self.element.update(x)
        self.channel.update(per_channel.T)
        self.all.update(per_channel.reshape(-1))
        self.reservoir.update(per_channel)

    def summary(self) -> dict[str, Any]:
        sample = self.reservoir.sample()
        levels = list(self.levels)
        channel = self.channel.summary()
        channel["quantiles"] = np.quantile(sample, levels, axis=1).T.tolist() if sample.size else []
        overall = self.all.summary()
        # every channel holds the same number of values, so the pooled samples are uniform over all values
        overall["quantiles"] = np.quantile(sample.reshape(-1), levels).tolist() if sample.size else []
        return {
            "count": self.count,
            "quantile_levels": levels,
            "quantile_exact": self.reservoir.seen <= self.reservoir.size,
            "per_element": self.element.summary(),
            "per_channel": channel,
            "global": overall,
        }
