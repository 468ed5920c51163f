"""Latent data (REFERENCE.md [7]): encode images once, train on memory-mapped normalised latents.

- ``encode_dataset(source, out_dir, codec, resolution, ...)``: images -> latent dataset directory.
- ``LatentDataset(path, normalization, sigma_data, scale, hflip)``: its normalised latents (+ labels).
- ``InfiniteSampler(length, batch_size, rank, world_size, seed, shuffle, start_nimg)``: resumable batches.
- ``Normalizer``: the latent <-> model-data map, stored with every snapshot.
"""

from slct.data.dataset import InfiniteSampler, LatentDataset
from slct.data.encode import encode_dataset, read_manifest
from slct.data.normalize import MODES as NORMALIZATION_MODES
from slct.data.normalize import Normalizer
from slct.data.stats import StreamingStats

__all__ = ["encode_dataset", "read_manifest", "LatentDataset", "InfiniteSampler", "Normalizer",
           "NORMALIZATION_MODES", "StreamingStats"]
