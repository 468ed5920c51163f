"""Training-time access to a latent dataset: ``LatentDataset`` and ``InfiniteSampler``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from slct.data.encode import read_manifest
from slct.data.normalize import Normalizer

BUILTIN_PREFIX = "builtin:"
FLIP_SAFE_CODECS = ("identity",)  # a mirrored latent decodes to the mirrored image only in pixel space


class LatentDataset(Dataset):
    """Normalised latents of a directory written by ``encode_dataset`` (or ``"builtin:digits"``).

    Shards are memory-mapped, never loaded whole. Items are ``(x, label)``: x float32 (C, H, W), the
    normalised latent (``normalizer.normalize(z)``); label an int64 scalar tensor, -1 when unlabeled.

    Args:
        path: the dataset directory, or ``"builtin:<name>"`` (see ``slct.data.builtin.BUILTINS``).
        normalization, sigma_data, scale: the ``Normalizer`` mode and its parameters (REFERENCE.md [7]).
        hflip: mirror each item with probability 1/2. Only valid in pixel space (identity codec):
            the latent of a mirrored image is not the mirrored latent; encode with hflip copies instead.
    """

    def __init__(self, path: str | os.PathLike, normalization: str = "per-element", sigma_data: float = 0.5,
                 scale: float | None = None, hflip: bool = False):
        if isinstance(path, str) and path.startswith(BUILTIN_PREFIX):
            from slct.data.builtin import builtin_dataset_dir
            path = builtin_dataset_dir(path[len(BUILTIN_PREFIX):])
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.codec_spec: dict = dict(self.manifest["codec"])
        if hflip and self.codec_spec["name"] not in FLIP_SAFE_CODECS:
            raise ValueError(f"hflip=True is only valid for codecs {list(FLIP_SAFE_CODECS)}, this dataset uses "
                             f"{self.codec_spec['name']!r}: encode with --hflip-copies instead")
        self.hflip = bool(hflip)
        self.normalizer = Normalizer.from_manifest(self.manifest, normalization, sigma_data, scale)
        self.latent_shape: tuple[int, int, int] = tuple(self.manifest["latent_shape"])
        self.image_resolution: int = int(self.manifest["image_resolution"])
        self.num_classes: int = int(self.manifest.get("num_classes") or 0)
        self._shards = self._open_shards()
        counts = [len(s) for s in self._shards]
        if counts != [s["count"] for s in self.manifest["shards"]]:
            raise ValueError(f"{self.path}: shard sizes {counts} do not match the manifest")
        self._offsets = np.cumsum([0, *counts])
        self._labels = (np.load(self.path / self.manifest["labels"]) if self.manifest.get("labels")
                        else np.full(len(self), -1, np.int64))

    def _open_shards(self) -> list[np.ndarray]:
        return [np.load(self.path / s["file"], mmap_mode="r") for s in self.manifest["shards"]]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": None}  # pickled for spawned workers: reopen the maps, do not copy

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._shards = self._open_shards()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def get_batch(self, indices, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Many items at once: indices (B,) -> x float32 (B, C, H, W), labels int64 (B,).

        One vectorised read per shard touched; ``generator`` draws the flips when ``hflip``.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        x = self.normalizer.normalize(torch.from_numpy(self.raw(idx)))
        if self.hflip:
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x[flip] = x[flip].flip(-1)
        return x, torch.from_numpy(self._labels[idx].copy())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, label = self.get_batch([int(i)])
        return x[0], label[0]

    def raw(self, indices) -> np.ndarray:
        """Stored latents z, not normalised: indices (B,) -> float32 (B, C, H, W)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices must be in [0, {len(self)}), got min {idx.min()} max {idx.max()}")
        z = np.empty((len(idx), *self.latent_shape), np.float32)
        shard = np.searchsorted(self._offsets, idx, side="right") - 1
        for k in np.unique(shard):
            rows = np.flatnonzero(shard == k)
            local = idx[rows] - self._offsets[k]
            order = np.argsort(local, kind="stable")  # ascending reads are kinder to the page cache
            z[rows[order]] = self._shards[k][local[order]]
        return z

    @property
    def labels(self) -> np.ndarray:
        """int64 (N,), -1 when unlabeled."""
        return self._labels

    def make_codec(self, **overrides):
        """The codec these latents came from, rebuilt from the manifest (``overrides`` e.g. weights_dir=...)."""
        from slct.codecs import get_codec
        return get_codec(**{**self.codec_spec, **overrides})

    def __repr__(self) -> str:
        return (f"LatentDataset({str(self.path)!r}, n={len(self)}, latent_shape={self.latent_shape}, "
                f"codec={self.manifest['codec_id']!r}, {self.normalizer!r})")


class InfiniteSampler:
    """Endless per-rank batches of dataset indices, defined over one global stream.

    Epoch e is a permutation of range(length) drawn from (seed, e) (or range(length) itself with
    ``shuffle=False``); the stream is the concatenation of the epochs. Global batch b is stream
    positions [b * batch_size, (b + 1) * batch_size) and rank r receives the r-th contiguous slice of
    ``batch_size // world_size`` of it, so all ranks together see exactly the single-process batches.
    ``start_nimg`` positions of the stream are skipped (images already seen globally: resume from a
    snapshot); ``nimg`` is the position after the batches yielded so far. Yields int64 arrays.
    """

    def __init__(self, length: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, start_nimg: int = 0):
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if batch_size < 1 or world_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size must be a positive multiple of world_size, got batch_size={batch_size}, "
                             f"world_size={world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if start_nimg < 0:
            raise ValueError(f"start_nimg must be >= 0, got {start_nimg}")
        self.length, self.batch_size, self.rank, self.world_size = length, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.nimg = int(start_nimg)
        self._epoch, self._perm = -1, np.empty(0, np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of range(length) used in ``epoch``."""
        if not self.shuffle:
            return np.arange(self.length, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.length).astype(np.int64)

    def _positions(self, start: int, stop: int) -> np.ndarray:
        out = []
        while start < stop:
            epoch, offset = divmod(start, self.length)
            if epoch != self._epoch:
                self._epoch, self._perm = epoch, self.epoch_order(epoch)
            take = min(stop - start, self.length - offset)
            out.append(self._perm[offset:offset + take])
            start += take
        return np.concatenate(out)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        local = self.batch_size // self.world_size
        start = self.nimg + self.rank * local
        batch = self._positions(start, start + local)
        self.nimg += self.batch_size
        return batch
