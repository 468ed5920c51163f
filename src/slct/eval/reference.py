"""Reference statistics: features of the real images, computed once and cached (REFERENCE.md [10]).

A reference is a :class:`~slct.eval.metrics.FeatureStats` of the training images in one extractor's
space (mean and covariance for FID/FD, plus up to ``max_features`` raw features for precision/recall),
saved as ``.npz`` with a JSON manifest beside it (``FILE.json``; the same JSON is also stored inside
the ``.npz`` as ``manifest``). The manifest records the source path, image count, extractor spec
(weights sha256 included), resolution, resize policy, slct version and creation time, and is the
cache key: the same source, extractor, resolution and resize method give the same default file.

Sources: a folder of images (recursive, sorted by path), a ``.zip`` of images (sorted by name), both
read as ``slct encode`` reads them, or a latent dataset directory / ``builtin:<name>`` (its stored
latents decoded through the codec recorded with them). With ``resolution``, real images are first
center-cropped and resized to the training resolution exactly as ``slct encode`` prepares them
(``resample``, default bicubic); then real and generated images go through the same extractor resize.

A pytorch-fid ``.npz`` (only ``mu`` and ``sigma``) also loads: FID works, precision/recall do not.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

from slct.data.labels import resolve_class
from slct.eval.extractors import PROTOCOLS, Extractor, Images
from slct.eval.metrics import FeatureStats

MANIFEST_FORMAT = "slct-reference-v1"
DEFAULT_MAX_FEATURES = 50_000  # real features kept for precision/recall (NVlabs' pr50k3_full keeps up to 200k)


@dataclass
class Reference:
    """Real-data statistics in one feature space.

    Attributes:
        mu: (D,) feature mean.  sigma: (D, D) feature covariance.  n: number of images.
        features: (M, D) float32 raw features for precision/recall, or None (e.g. a pytorch-fid file).
        manifest: provenance (see the module docstring); {} for foreign files.
        path: the ``.npz`` it was loaded from, if any.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: np.ndarray | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def from_stats(cls, stats: FeatureStats, manifest: dict[str, Any] | None = None,
                   path: Path | None = None) -> "Reference":
        return cls(stats.mean, stats.cov, stats.n, stats.features, dict(manifest or {}), path)


# ----------------------------------------------------------------------------------------------
# Reading sources: image folders and zips through ``slct.data.sources`` (the reader ``slct encode``
# uses, so a reference sees the training images in the same order and with the same crop), latent
# datasets through ``slct.data.LatentDataset`` and their codec.


def _image_channels(image: PIL.Image.Image) -> int:
    return 1 if image.mode in ("1", "L", "LA", "I", "I;16", "F") else 3


def load_image(image: PIL.Image.Image, resolution: int | None = None, resample: str = "bicubic",
               loader: str = "slct") -> np.ndarray:
    """A PIL image -> uint8 (H, W, C), C = 1 for grey files and 3 otherwise.

    With ``resolution``: center crop to a square and resize with ``resample``, exactly as ``slct encode``
    prepares training images; without: the image as stored, decoded as the protocol ``loader`` says
    (``slct``: as ``slct encode`` reads files; ``pytorch-fid``: PIL's ``convert("RGB")``, pytorch-fid's).
    """
    from slct.data.sources import normalize_image, prepare_image

    if PROTOCOLS[loader].loader == "pil-rgb" and resolution is None:
        return np.asarray(image.convert("RGB"))
    channels = _image_channels(image)
    if resolution is None:  # 16-bit, transparency, animations: as `slct encode` converts them
        arr = np.asarray(normalize_image(image, channels))
        return arr[..., None] if arr.ndim == 2 else arr
    return prepare_image(image, resolution, channels, resample, min_size=None).transpose(1, 2, 0)


def list_images(source: str | os.PathLike) -> list[str]:
    """Image names of a folder (recursive) or zip, in the sorted order they are read."""
    from slct.data.sources import open_source

    return list(open_source(source).names)


def image_reader(source: str | os.PathLike, limit: int | None = None, resolution: int | None = None,
                 resample: str = "bicubic", holdout: int = 0, split: str = "all",
                 loader: str = "slct", class_name: str | int | None = None,
                 ) -> tuple[int, Callable[[Sequence[int]], list[np.ndarray]]]:
    """(count, read) for a folder or zip: ``read(indices)`` -> the uint8 HWC images at those positions
    of the :func:`list_images` order restricted to ``split`` (as ``slct encode --holdout``), thinned to
    ``limit`` images spread evenly over it (as ``slct encode --limit``: one meaning everywhere). ``loader``:
    the protocol whose file decoding is used (:func:`load_image`). ``class_name``: only that class's images
    (class sub-folders, as ``slct encode --labels folder``), selected before ``limit`` thins them."""
    from slct.data.encode import select_indices, split_indices
    from slct.data.sources import open_source

    if class_name is None:
        src = open_source(source)
        positions = split_indices(len(src), holdout, split, limit)
    else:
        src = open_source(source, labels="folder")
        positions = split_indices(len(src), holdout, split)
        positions = positions[src.labels[positions] == resolve_class(class_name, src.classes)]
        positions = positions[select_indices(len(positions), limit)]
    count = len(positions)

    def read(indices: Sequence[int]) -> list[np.ndarray]:
        out = []
        for i in indices:
            if not 0 <= i < count:
                raise IndexError(f"image index {i} out of range [0, {count}) of {source}")
            with src.load(int(positions[i])) as image:
                out.append(load_image(image, resolution, resample, loader))
        return out

    return count, read


def is_latent_dataset(source: str | os.PathLike) -> bool:
    """A directory with a latent-dataset manifest (written by ``slct encode``), or ``builtin:<name>``."""
    from slct.data.encode import MANIFEST

    return str(source).startswith("builtin:") or (Path(source) / MANIFEST).is_file()


def iter_latent_batches(source: str | os.PathLike, batch_size: int = 64, limit: int | None = None,
                        device: str | torch.device = "cpu",
                        class_name: str | int | None = None) -> tuple[int, Any, Iterator[torch.Tensor]]:
    """(count, the LatentDataset, batches of decoded images NCHW in [-1, 1]) of a latent dataset.

    The stored latents (before any training normalisation) are decoded with the codec they were
    encoded with, so the reference sees what the codec can reproduce.
    """
    from slct.data import LatentDataset

    dataset = LatentDataset(str(source) if str(source).startswith("builtin:") else Path(source))
    codec = dataset.make_codec().to(device)
    from slct.data.encode import select_indices

    positions = np.arange(len(dataset))
    if class_name is not None:
        names = dataset.manifest.get("class_names") or [str(i) for i in range(dataset.num_classes)]
        positions = positions[dataset.labels == resolve_class(class_name, names)]
    positions = positions[select_indices(len(positions), limit)]  # spread evenly, as --limit everywhere
    count = len(positions)

    def batches() -> Iterator[torch.Tensor]:
        for i in range(0, count, batch_size):
            z = torch.from_numpy(dataset.raw(positions[i:i + batch_size]))
            with torch.no_grad():
                yield codec.decode(z.to(device))

    return count, dataset, batches()


# ----------------------------------------------------------------------------------------------
# Computing, saving and loading.


def stats_from_batches(batches: Iterable[Images], extractor: Extractor, max_features: int | None = DEFAULT_MAX_FEATURES,
                       total: int | None = None, progress: bool = True, desc: str = "features") -> FeatureStats:
    """Stream image batches through ``extractor`` into a FeatureStats that keeps ``max_features`` features."""
    stats = FeatureStats(extractor.dim, keep_features=bool(max_features), max_kept=max_features or None)
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for images in batches:
            feats = extractor(images)
            stats.update(feats)
            bar.update(len(feats))
    return stats


def reference_from_images(images: Images | Iterable[Images], extractor: Extractor,
                          max_features: int | None = DEFAULT_MAX_FEATURES, progress: bool = False) -> Reference:
    """An in-memory reference from a batch (or an iterable of batches) of images, e.g. a demo's dataset."""
    batches = [images] if isinstance(images, (torch.Tensor, np.ndarray)) else images
    sizes: set[tuple[int, int]] = set()
    stats = stats_from_batches(_sizes_seen(batches, sizes), extractor, max_features, progress=progress)
    return Reference.from_stats(stats, dict(format=MANIFEST_FORMAT, source="<in memory>", count=stats.n,
                                            extractor=extractor.spec(), protocol=extractor.protocol,
                                            resize=PROTOCOLS[extractor.protocol].policy,
                                            image_size=list(next(iter(sizes))) if len(sizes) == 1 else None,
                                            image_sizes=len(sizes)))


def default_reference_path(source: str | os.PathLike, extractor: Extractor, resolution: int | None = None,
                           resample: str = "bicubic", max_features: int | None = DEFAULT_MAX_FEATURES,
                           limit: int | None = None, holdout: int = 0, split: str = "all",
                           class_name: str | int | None = None) -> Path:
    """The cache file for these settings: ``$SLCT_CACHE`` (default ``~/.cache/slct``) ``/refs/...npz``.

    Named by source, extractor and resolution, plus a hash of every setting (source path, extractor
    spec with its weights hash and resize method, resample, feature cap, limit).
    """
    where = str(source) if str(source).startswith("builtin:") else str(Path(source).resolve())
    key = json.dumps(dict(source=where, extractor=extractor.spec(), resolution=resolution,
                          resample=resample if resolution else None, max_features=max_features, limit=limit,
                          **({"holdout": holdout, "split": split} if split != "all" else {}),
                          **({"class": str(class_name)} if class_name is not None else {})),
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    root = Path(os.environ.get("SLCT_CACHE") or Path.home() / ".cache" / "slct").expanduser()
    stem = Path(where.replace(":", "-")).stem
    return root / "refs" / f"{stem}-{extractor.name}-{f'{resolution}px' if resolution else 'native'}-{digest}.npz"


def manifest_path(npz_path: str | os.PathLike) -> Path:
    return Path(npz_path).with_suffix(".json")


def compute_reference(source: str | os.PathLike, extractor: Extractor, *, resolution: int | None = None,
                      resample: str = "bicubic", batch_size: int = 64,
                      max_features: int | None = DEFAULT_MAX_FEATURES, limit: int | None = None,
                      progress: bool = True, device: str | torch.device = "cpu", holdout: int = 0,
                      split: str = "all", class_name: str | int | None = None) -> Reference:
    """Reference statistics of an image folder / zip or a latent dataset (see the module docstring).

    ``resolution``/``resample`` apply to image sources (center crop and resize, as ``slct encode``);
    a latent dataset's images come at the resolution they were encoded at. ``holdout``/``split`` select
    images of a folder / zip as ``slct encode --holdout N --split ...`` does (e.g. the held-out faces).
    ``class_name``: one class's images only (a name or id), for per-class evaluation of a conditional model.
    """
    from slct import __version__

    if resolution is not None and (int(resolution) != resolution or resolution < 1):
        raise ValueError(f"resolution must be a positive integer or None, got {resolution!r}")
    if is_latent_dataset(source):
        if split != "all":
            raise ValueError("holdout/split select images of a folder or zip; a latent dataset is used whole "
                             "(encode the held-out split with `slct encode --holdout N --split holdout`)")
        count, dataset, batches = iter_latent_batches(source, batch_size, limit, device, class_name)
        classes = dataset.manifest.get("class_names") or [str(i) for i in range(dataset.num_classes)]
        if resolution is not None and resolution != dataset.image_resolution:
            raise ValueError(f"{source} holds {dataset.image_resolution} px images; a latent dataset is decoded at "
                             f"its own resolution, so drop resolution={resolution}")
        kind, codec_spec, resolution, resample = "latents", dict(dataset.codec_spec), dataset.image_resolution, None
        source_images = len(dataset)
        where = str(source) if str(source).startswith("builtin:") else str(Path(source).resolve())
    else:
        count, read = image_reader(source, limit, resolution, resample, holdout, split, loader=extractor.protocol,
                                   class_name=class_name)
        from slct.data.sources import open_source

        classes = open_source(source, labels="folder").classes if class_name is not None else []
        source_images = len(list_images(source))
        batches = (read(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size))
        kind, codec_spec, where = ("zip" if Path(source).is_file() else "folder"), None, str(Path(source).resolve())
        if resolution is None:
            resample = None
    sizes: set[tuple[int, int]] = set()
    stats = stats_from_batches(_sizes_seen(batches, sizes), extractor, max_features, total=count, progress=progress,
                               desc=f"reference {Path(str(source)).name}")
    manifest = dict(
        format=MANIFEST_FORMAT, source=where, source_kind=kind, codec=codec_spec,
        count=stats.n, features_kept=0 if stats.features is None else len(stats.features),
        extractor=extractor.spec(), resolution=resolution, resample=resample, protocol=extractor.protocol,
        image_size=list(next(iter(sizes))) if len(sizes) == 1 else None,  # [H, W]; None: sizes differ
        image_sizes=len(sizes),
        resize=PROTOCOLS[extractor.protocol].policy, limit=limit,
        holdout=holdout, split=split, source_images=source_images,
        **({} if class_name is None else {"class": classes[resolve_class(class_name, classes)],
                                          "class_index": resolve_class(class_name, classes)}), slct_version=__version__, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    return Reference.from_stats(stats, manifest)


def _sizes_seen(batches: Iterable[Images], sizes: set) -> Iterator[Images]:
    """The batches unchanged, noting each image's (height, width) in ``sizes``."""
    for images in batches:
        sizes.update(image_sizes(images))
        yield images


def image_sizes(images: Images) -> set[tuple[int, int]]:
    """The (height, width) of a batch's images: uint8 HWC lists and NHWC arrays, float NCHW tensors or arrays."""
    if isinstance(images, (list, tuple)):
        return {tuple(int(v) for v in np.shape(image)[:2]) for image in images}
    uint8 = images.dtype in (np.uint8, torch.uint8)
    return {tuple(int(v) for v in (images.shape[1:3] if uint8 else images.shape[-2:]))}


def reference_image_size(manifest: dict) -> tuple[int, int] | None:
    """The (height, width) of a reference's images: recorded, or implied by its resolution; None: not known (a
    reference of native-size images made before sizes were recorded, images of several sizes, a foreign file)."""
    if manifest.get("image_size"):
        return tuple(manifest["image_size"])
    if manifest.get("resolution"):
        return (int(manifest["resolution"]),) * 2
    return None


def check_image_size(manifest: dict, image_size: tuple[int, int], reference_path, what: str) -> None:
    """Refuse a reference of images of another size than ``what`` makes: the statistics differ (one line).

    A foreign reference (pytorch-fid's ``mu``/``sigma``, no manifest) cannot be checked and is accepted."""
    if not manifest:
        return
    have, want = reference_image_size(manifest), tuple(int(v) for v in image_size)
    if have == want:
        return
    source = manifest.get("source", "SOURCE")
    remedy = (f"make one at that size: slct eval ref {source} --resolution {want[0]} --extractor "
              f"{manifest.get('extractor', {}).get('name', 'NAME')}" + (f" --holdout {manifest['holdout']}"
                                                                        if manifest.get("holdout") else "")
              + " --out FILE.npz")
    if have is None:
        made = ("images of several sizes" if manifest.get("image_sizes", 0) > 1
                else "images at their native size, which it does not record")
        raise ValueError(f"{reference_path} holds statistics of {made}; {what} makes {want[0]}x{want[1]} px images: "
                         f"{remedy}")
    raise ValueError(f"{reference_path} holds statistics of {have[0]}x{have[1]} px images; {what} makes "
                     f"{want[0]}x{want[1]} px images: {remedy}")


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Write through a temporary file and rename: a concurrent reader sees the old file or the new one."""
    from slct.checkpoint import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def training_overlap(data_source: dict | None, reference_manifest: dict) -> int | None:
    """How many of a reference's images a run trained on; None when that cannot be told (other sources).

    ``data_source`` is what a snapshot records of its latent dataset (the manifest's ``source`` and ``selection``).
    Both selections are pure functions of (number of images, holdout, split, limit), so the overlap is exact.
    """
    from slct.data.encode import split_indices

    if not data_source or not data_source.get("source") or reference_manifest.get("source_kind") not in ("folder",
                                                                                                       "zip"):
        return None
    if reference_manifest.get("class") is not None:  # one class's images: the selection needs the labels too
        return None
    src, sel = data_source["source"], data_source.get("selection") or {}
    n = reference_manifest.get("source_images")
    if src.get("path") != reference_manifest.get("source") or n is None or src.get("num_images") != n:
        return None
    trained = split_indices(n, sel.get("holdout", 0), sel.get("split", "all"), sel.get("limit"))
    ref = split_indices(n, reference_manifest.get("holdout", 0), reference_manifest.get("split", "all"),
                        reference_manifest.get("limit"))
    return int(np.intersect1d(trained, ref).size)


def check_held_out(data_source: dict | None, reference_manifest: dict, reference_path) -> int | None:
    """``training_overlap``, raising ValueError when a reference made as held out (split "holdout") shares images
    with the training set: a silently leaked reference makes FD and recall look better than they are."""
    overlap = training_overlap(data_source, reference_manifest)
    if overlap and reference_manifest.get("split") == "holdout":
        sel = data_source.get("selection") or {}
        raise ValueError(
            f"{reference_path} is a held-out reference, but {overlap} of its {reference_manifest.get('count')} "
            f"images are in the training set (trained on --limit {sel.get('limit')}, --holdout {sel.get('holdout', 0)}"
            f"); encode the training images with --holdout {reference_manifest.get('holdout')} (the same N) so "
            "they exclude the reference's")
    return overlap


def save_reference(reference: Reference, path: str | os.PathLike) -> Path:
    """Write ``path`` (.npz, with the manifest inside) and the manifest ``path.with_suffix('.json')``."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"reference statistics are saved as .npz, got {path}")
    text = json.dumps(reference.manifest, indent=2, sort_keys=True)
    arrays = dict(n=np.int64(reference.n), mu=reference.mu, sigma=reference.sigma, manifest=np.array(text))
    if reference.features is not None:
        arrays["features"] = reference.features
    _atomic_write(path, lambda f: np.savez(f, **arrays))  # a file object keeps np.savez from adding ".npz"
    _atomic_write(manifest_path(path), lambda f: f.write(text.encode() + b"\n"))
    reference.path = path
    return path


def load_reference(path: str | os.PathLike) -> Reference:
    """Load a reference ``.npz`` written by :func:`save_reference` (or pytorch-fid's ``mu``/``sigma`` file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path} (make them with `slct eval ref SOURCE`)")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not an .npz of reference statistics: {e}") from e
    with data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path} holds no reference statistics (keys: {sorted(data.files)})")
        manifest = json.loads(str(data["manifest"])) if "manifest" in data else {}
        features = data["features"].astype(np.float32) if "features" in data else None
        n = int(data["n"]) if "n" in data else int(manifest.get("count", 0))
        return Reference(data["mu"].astype(np.float64), data["sigma"].astype(np.float64), n, features, manifest, path)
