"""``slct encode``: images -> a latent dataset directory (REFERENCE.md [7]).

Layout of the output directory::

    manifest.json          codec, resolution, latent shape, dtype, count, shards, source, skipped, stats
    shard-00000.npy ...    latents (n, C, H, W), float32 (or float16), memory-mappable
    labels.npy             int64 labels, only for labelled sources

Images are decoded and resized in DataLoader worker processes while the codec encodes the previous
batch, so the codec's arithmetic is the bottleneck. Shards are written atomically and recorded in
``encode-state.json``; a killed run, started again with the same arguments, continues after the
last complete shard and produces the same files as an uninterrupted one. The statistics are fed from
the stored shards, in order, in one streaming pass (``stats.StreamingStats``).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from slct.checkpoint import atomic_write as _atomic_write  # fsynced, renamed into place, cleaned up on failure
from slct.codecs import Codec, get_codec
from slct.data.sources import (ImageSource, SkipImage, looks_like_class_folder, min_side, open_source,
                               prepare_image)
from slct.data.stats import StreamingStats

MANIFEST = "manifest.json"
STATE = "encode-state.json"
LABELS = "labels.npy"
FORMAT = "slct-latents/1"
DTYPES = {"float32": np.float32, "float16": np.float16}
# keys that must match for a run to continue (or to be "already done") in an existing directory
IDENTITY_KEYS = ("codec_id", "image_resolution", "latent_shape", "dtype", "shard_size", "hflip_copies",
                 "source", "selection", "resample", "seed", "image_options")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.npy"


def _labels_part(k: int) -> str:
    return f"shard-{k:05d}.labels.npy"


def select_indices(n: int, limit: int | None) -> np.ndarray:
    """All of range(n), or ``limit`` indices spread evenly over it (a quick subset covers the whole set)."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


SPLITS = ("all", "train", "holdout")


def split_indices(n: int, holdout: int = 0, split: str = "all", limit: int | None = None) -> np.ndarray:
    """The sorted source positions of one split, optionally thinned to ``limit`` spread evenly over it.

    The held-out split is ``holdout`` images spread evenly over the sorted source (the same set for
    ``slct encode`` and ``slct eval ref``); "train" is everything else, "all" ignores ``holdout``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if holdout < 0 or holdout >= n and split != "all":
        raise ValueError(f"holdout must be in [0, {n}) for a source of {n} images, got {holdout}")
    if split != "all" and holdout == 0:
        raise ValueError(f"split={split!r} needs holdout > 0 (the number of held-out images)")
    held = select_indices(n, holdout) if holdout else np.zeros(0, np.int64)
    if split == "all":
        subset = np.arange(n)
    elif split == "holdout":
        subset = held
    else:
        subset = np.setdiff1d(np.arange(n), held)
    return subset[select_indices(len(subset), limit)]


class _Decoded(Dataset):
    """Worker-side: source index -> (index, uint8 (C, R, R) or None, label, skip record or None, conversion records).

    A record is {"name", "reason", "detail"}: ``reason`` a short category (unreadable, too-small, 16-bit, alpha,
    ...), counted per category on the console and listed file by file in the manifest.
    """

    def __init__(self, source: ImageSource, indices: np.ndarray, resolution: int, channels: int, resample: str,
                 alpha_background: str = "white", min_size: int | None = 0):
        self.source, self.indices = source, indices
        self.resolution, self.channels, self.resample = resolution, channels, resample
        self.alpha_background, self.min_size = alpha_background, min_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = int(self.indices[k])
        name, notes = self.source.names[i], []
        try:
            with self.source.load(i) as image:
                prepared = prepare_image(image, self.resolution, self.channels, self.resample,
                                         self.alpha_background, self.min_size, notes)
        except SkipImage as e:
            return i, None, self.source.label(i), {"name": name, "reason": e.reason, "detail": str(e)}, []
        except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable image"
            return i, None, self.source.label(i), {"name": name, "reason": "unreadable",
                                                   "detail": f"{type(e).__name__}: {e}"}, []
        converted = [{"name": name, "reason": reason, "detail": detail} for reason, detail in notes]
        return i, prepared, self.source.label(i), None, converted


def reason_counts(records: list[dict]) -> dict[str, int]:
    """{reason: how many records} in first-seen order."""
    out: dict[str, int] = {}
    for r in records:
        out[r["reason"]] = out.get(r["reason"], 0) + 1
    return out


def format_counts(records: list[dict]) -> str:
    """'3 (too-small 2, unreadable 1)'."""
    counts = reason_counts(records)
    return f"{sum(counts.values())} ({', '.join(f'{k} {v}' for k, v in counts.items())})" if counts else "0"


def _as_list(batch):
    return batch


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


# what every reader of a latent dataset relies on
REQUIRED_KEYS = ("codec", "codec_id", "image_resolution", "latent_shape", "shards", "stats")


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a latent dataset directory (or of the manifest file itself)."""
    path = Path(path)
    if path.is_file() and path.name != MANIFEST:
        raise ValueError(f"{path} is a file, not a latent dataset directory (make one from images with "
                         f"`slct encode IMAGES --out DIR`, then pass DIR)")
    file = path / MANIFEST if path.is_dir() else path
    if not file.is_file():
        hint = " (an unfinished encode: run the same `slct encode` again to finish it)" \
            if (path / STATE).is_file() else ""
        raise FileNotFoundError(f"{file} not found: not a latent dataset directory{hint}")
    try:
        manifest = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not a latent dataset manifest ({type(e).__name__})") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise ValueError(f"{file} lacks {', '.join(repr(k) for k in missing)}: not a manifest `slct encode` wrote, or "
                         "an edited or damaged one; encode the images again (same command, another --out)")
    return manifest


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _shard_generator(seed: int, k: int) -> torch.Generator:
    # one CPU generator per shard: a posterior sample does not depend on where the run was resumed
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))


def _check_same(existing: dict, config: dict, out_dir: Path) -> None:
    # a key an older dataset does not record is not compared (it was written before the option existed)
    diff = [k for k in IDENTITY_KEYS if k in existing and existing[k] != config.get(k)]
    if diff:
        details = "; ".join(f"{k}: existing {existing.get(k)!r}, requested {config.get(k)!r}" for k in diff)
        raise FileExistsError(f"{out_dir} already holds a different latent dataset ({details}). "
                              "Nothing was overwritten; choose another output directory.")


def encode_dataset(source: str | os.PathLike | ImageSource, out_dir: str | os.PathLike,
                   codec: Codec | str | dict, resolution: int, batch_size: int = 64, hflip_copies: bool = False,
                   strict: bool = False, num_workers: int | None = None, device: str | torch.device | None = None,
                   shard_size: int = 4096, progress: bool | str = True, *, labels: str = "none",
                   limit: int | None = None, dtype: str = "float32", resample: str = "bicubic",
                   seed: int = 0, holdout: int = 0, split: str = "all", alpha_background: str = "white",
                   min_size: int | None = None) -> dict:
    """Encode the images of ``source`` into a latent dataset at ``out_dir``; returns its manifest.

    Args:
        source: image folder (recursive), .zip of images, or an ``ImageSource``.
        codec: a Codec, a registry name, or a ``codec.spec()`` dict.
        resolution: images are center-cropped to a square and resized to this side (pixels).
        hflip_copies: also store the latent of each mirrored image, right after the original's
            (as the authors did for LSUN Church: augmentation that survives caching).
        strict: fail on the first unreadable image instead of skipping it (skips are listed in the manifest).
        num_workers: image-decoding processes; default min(4, cpu count); 0 decodes in this process.
        device: "auto" (default: CUDA when present), "cpu", "cuda", ...
        shard_size: latents per shard file (the last one may be shorter).
        labels: "none", or "folder" to label each image by its class sub-folder (torchvision ImageFolder).
        limit: encode only this many images, spread evenly over the sorted source (or split).
        holdout, split: keep ``holdout`` images (spread evenly over the sorted source) out of the "train"
            split, e.g. for reference statistics of unseen images; "holdout" encodes just those.
        dtype: "float32" or "float16" storage.
        resample: PIL filter for resizing (see ``sources.RESAMPLE``).
        seed: seeds the posterior sample of stochastic codecs, per shard.
        alpha_background: what transparent pixels are composited on ("white", "black", "grey").
        min_size: images whose shorter side is below this many px are skipped (0: none; None: resolution / 4).

    Every skipped image (unreadable, too small), every entry of a folder that could not be read (an unreadable
    directory, a symlink loop, a broken link, a FIFO named like an image) and every converted image (16-bit,
    transparency, first frame of an animation, EXIF rotation, CMYK, palette) is listed in the manifest with its
    reason; non-image files are counted there too.
    """
    out_dir = Path(out_dir)
    codec = _as_codec(codec)
    latent_shape = codec.latent_shape(resolution)  # validates resolution against the codec's downsampling
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    copies = 2 if hflip_copies else 1
    if shard_size < copies or shard_size % copies:
        raise ValueError(f"shard_size must be a positive multiple of {copies}, got {shard_size}")
    src = open_source(source, labels)
    if strict and src.not_read:
        first = src.not_read[0]
        raise ValueError(f"cannot read {first['name']!r} in {src.path}: {first['reason']}: {first['detail']} "
                         f"({len(src.not_read)} such entries; without --strict they are skipped and listed)")
    if labels == "none" and looks_like_class_folder(src.names):
        print(f"note: {src.path} looks like a class folder; pass labels='folder' (--labels folder) to keep labels",
              file=sys.stderr)
    selection = split_indices(len(src), holdout, split, limit)
    chosen = {"limit": limit, "count": len(selection)}
    if split != "all":  # recorded only when used, so older datasets still resume
        chosen.update(holdout=int(holdout), split=split)
    config = {
        "format": FORMAT, "codec": codec.spec(), "codec_id": codec.id, "image_resolution": int(resolution),
        "image_channels": codec.image_channels, "latent_shape": list(latent_shape), "dtype": dtype,
        "shard_size": int(shard_size), "hflip_copies": bool(hflip_copies), "source": src.describe(),
        "selection": chosen, "resample": resample, "seed": int(seed),
        "image_options": {"alpha_background": alpha_background, "min_size": min_side(resolution, min_size)},
        "batch_size": int(batch_size), "num_classes": len(src.classes), "class_names": list(src.classes),
    }
    finished = _finished_manifest(out_dir, config)
    if finished is not None:
        if progress:
            print(f"{out_dir} is already complete ({finished['count']} latents)", file=sys.stderr)
        return finished
    state = _open_state(out_dir, config)

    device = _resolve_device(device)
    writer = _ShardWriter(out_dir, state, codec.to(device), device, batch_size, shard_size // copies, seed)
    done = state["shards"][-1]["source_stop"] if state["shards"] else 0
    todo = selection[np.searchsorted(selection, done):]
    workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
    loader = DataLoader(_Decoded(src, todo, resolution, codec.image_channels, resample, alpha_background,
                                 config["image_options"]["min_size"]),
                        batch_size=batch_size,
                        num_workers=workers, collate_fn=_as_list, prefetch_factor=4 if workers > 0 else None)
    bar = _progress_bar(total=len(selection), initial=len(selection) - len(todo), enabled=progress,
                        desc=f"encode {codec.id} {resolution}px")
    with torch.inference_mode():
        for batch in loader:  # workers decode the next batches while the codec runs here
            for i, image, label, skip, converted in batch:
                if skip is None:
                    writer.add(i, image, label, converted)
                elif strict:
                    raise ValueError(f"cannot use image {src.names[i]!r}: {skip['reason']}: {skip['detail']} "
                                     "(without --strict such images are skipped and listed)")
                else:
                    writer.skipped.append(skip)
            bar.update(len(batch))
        writer.finish_shard()  # the last, shorter one
    bar.close()
    return _finish(out_dir, state, writer.stats, writer.skipped, writer.converted, src.ignored, src.not_read)


def _as_codec(codec: Codec | str | dict) -> Codec:
    if isinstance(codec, Codec):
        return codec
    return get_codec(codec) if isinstance(codec, str) else get_codec(**codec)


def _finished_manifest(out_dir: Path, config: dict) -> dict | None:
    """The manifest of a finished encode of the same dataset in ``out_dir``; FileExistsError for a different one."""
    if not (out_dir / MANIFEST).is_file():
        return None
    manifest = read_manifest(out_dir)
    _check_same(manifest, config, out_dir)
    _remove_leftovers(out_dir, len(manifest["shards"]))  # a run killed right after writing its manifest
    return manifest


def _open_state(out_dir: Path, config: dict) -> dict:
    """The progress record of an unfinished encode of the same dataset, or a new one in a new/empty directory."""
    if (out_dir / STATE).is_file():
        state = json.loads((out_dir / STATE).read_text())
        _check_same(state["config"], config, out_dir)
        from slct.checkpoint import remove_stale_temporaries

        remove_stale_temporaries(out_dir)  # half-written shards of a killed run: redone from the state below
        return state
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists, is not empty and is not a latent dataset; nothing was "
                              "overwritten. Choose an empty or new output directory.")
    out_dir.mkdir(parents=True, exist_ok=True)
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    state = {"config": config, "created": created, "shards": []}
    _write_json(out_dir / STATE, state)
    return state


class _ShardWriter:
    """Encodes prepared images batch by batch into shards; records each finished shard and feeds the statistics.

    A shard is the unit of resumption: its batches (counted from the shard's first image), its posterior
    noise (one generator per shard) and its place in the statistics depend only on its index, never on
    where an earlier run stopped. Memory: one batch of images and one shard of latents.
    """

    def __init__(self, out_dir: Path, state: dict, codec: Codec, device: torch.device, batch_size: int,
                 images_per_shard: int, seed: int):
        config = state["config"]
        self.out_dir, self.state, self.codec, self.device = out_dir, state, codec, device
        self.batch_size, self.images_per_shard, self.seed = batch_size, images_per_shard, seed
        self.hflip_copies, self.dtype = config["hflip_copies"], DTYPES[config["dtype"]]
        self.labelled = config["num_classes"] > 0
        self.skipped: list[dict] = []  # images not used since the last finished shard
        self.converted: list[dict] = []  # images converted (16-bit, alpha, ...) since the last finished shard
        self._start_shard()
        # replay the finished shards: the same arrays in the same order as an uninterrupted run
        self.stats = StreamingStats(tuple(config["latent_shape"]), seed=seed)
        for record in state["shards"]:
            self.stats.update(np.load(out_dir / record["file"], mmap_mode="r"))

    def _start_shard(self) -> None:
        self.generator = _shard_generator(self.seed, len(self.state["shards"]))
        self.batch: list[np.ndarray] = []
        self.chunks: list[np.ndarray] = []
        self.labels: list[int] = []
        self.count, self.last_index = 0, -1

    def add(self, index: int, image: np.ndarray, label: int, converted: list[dict] = ()) -> None:
        self.converted.extend(converted)
        self.batch.append(image)
        self.labels.append(label)
        self.count, self.last_index = self.count + 1, index
        if len(self.batch) == self.batch_size:
            self._encode_batch()
        if self.count == self.images_per_shard:
            self.finish_shard()

    def _encode_batch(self) -> None:
        x = torch.from_numpy(np.stack(self.batch)).to(self.device).float() / 127.5 - 1
        if self.hflip_copies:  # (original, mirrored) pairs, adjacent
            x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)
        self.chunks.append(self.codec.encode(x, generator=self.generator).float().cpu().numpy().astype(self.dtype))
        self.batch = []

    def finish_shard(self) -> None:
        """Write the current shard (if it holds any image) and record it as done."""
        if self.batch:
            self._encode_batch()
        if not self.chunks:
            return
        k = len(self.state["shards"])
        latents = np.concatenate(self.chunks)
        _atomic_write(self.out_dir / shard_name(k), lambda f: np.save(f, latents))
        if self.labelled:
            labels = np.repeat(np.array(self.labels, np.int64), 2 if self.hflip_copies else 1)
            _atomic_write(self.out_dir / _labels_part(k), lambda f: np.save(f, labels))
        self.stats.update(latents)
        self.state["shards"].append({"file": shard_name(k), "count": len(latents), "images": self.count,
                                     "source_stop": self.last_index + 1, "skipped": self.skipped,
                                     "converted": self.converted})
        _write_json(self.out_dir / STATE, self.state)  # the shard counts as done from here on
        self.skipped, self.converted = [], []
        self._start_shard()


def _progress_bar(total: int, initial: int, enabled: bool | str, desc: str):
    from slct.progress import progress_bar

    if enabled == "lines":
        return progress_bar(total, "lines", initial, desc, unit="images")
    return progress_bar(total, "bar" if enabled else "none", initial, desc, unit="img", smoothing=0.1,
                        dynamic_ncols=True)


def _finish(out_dir: Path, state: dict, stats: StreamingStats, trailing_skipped: list[dict],
            trailing_converted: list[dict], ignored: dict[str, int], not_read: list[dict] = ()) -> dict:
    config = state["config"]
    shards = state["shards"]
    # entries of the source that were never images to read (unreadable directories, links, FIFOs) come first
    skipped = list(not_read) + [s for r in shards for s in r["skipped"]] + trailing_skipped
    converted = [c for r in shards for c in r.get("converted", [])] + trailing_converted
    if not shards:
        raise ValueError(f"none of the {config['selection']['count']} images of {config['source']['path']} "
                         f"could be used (skipped: {format_counts(skipped)}; first: "
                         f"{(skipped[0]['name'] + ': ' + skipped[0]['detail']) if skipped else 'none'})")
    labels_file = None
    if config["num_classes"]:
        labels = np.concatenate([np.load(out_dir / _labels_part(k)) for k in range(len(shards))])
        _atomic_write(out_dir / LABELS, lambda f: np.save(f, labels))
        labels_file = LABELS
    from slct import __version__
    manifest = {
        **config,
        "slct_version": __version__,
        "created": state["created"],
        "count": sum(r["count"] for r in shards),
        "shards": [{"file": r["file"], "count": r["count"]} for r in shards],
        "labels": labels_file,
        "skipped": skipped,
        "skipped_counts": reason_counts(skipped),
        "converted": converted,
        "converted_counts": reason_counts(converted),
        "ignored_files": ignored,  # files in the source that are not images, by extension
        "stats": stats.summary(),
    }
    _write_json(out_dir / MANIFEST, manifest)
    _remove_leftovers(out_dir, len(shards))  # after the manifest: a crash before this line loses nothing
    return manifest


def _remove_leftovers(out_dir: Path, num_shards: int) -> None:
    for k in range(num_shards):
        (out_dir / _labels_part(k)).unlink(missing_ok=True)
    (out_dir / STATE).unlink(missing_ok=True)
