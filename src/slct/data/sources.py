"""Image sources for ``slct encode``: a folder (recursive), a .zip, a class folder, or an in-memory array.

A source is an indexable list of images in a fixed, sorted order; ``load(i)`` returns a PIL image.
``prepare_image`` turns one into the uint8 (C, R, R) array the encoder consumes: center crop to a
square, then resize to the requested resolution. Reading and resizing run in DataLoader worker
processes, so every source must be picklable (zip handles are reopened per process).
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
LABEL_MODES = ("none", "folder")

# name -> PIL filter; PIL's resize antialiases when it shrinks
RESAMPLE: dict[str, int] = {
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}

COLOR_MODES = {1: "L", 3: "RGB"}  # image channels -> PIL mode


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not Path(name).name.startswith(".")


def _folder_labels(names: list[str], root: str, labels: str) -> tuple[np.ndarray | None, list[str]]:
    """Labels from the first path component of each (sorted, root-relative, '/'-separated) name."""
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {list(LABEL_MODES)}, got {labels!r}")
    if labels == "none":
        return None, []
    loose = [n for n in names if "/" not in n]
    if loose:
        raise ValueError(f"labels='folder' needs every image inside a class sub-folder of {root}; "
                         f"{loose[0]!r} is not")
    classes = sorted({n.split("/", 1)[0] for n in names})
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[n.split("/", 1)[0]] for n in names], np.int64), classes


def looks_like_class_folder(names: list[str]) -> bool:
    """True when every image sits exactly one level down and there are at least two such folders."""
    parts = [n.split("/") for n in names]
    return len(parts) > 0 and all(len(p) == 2 for p in parts) and len({p[0] for p in parts}) >= 2


class ImageSource:
    """Base: ``names`` (sorted, one per image), ``labels`` (int64 array or None), ``classes``."""

    kind = "images"
    names: list[str]
    labels: np.ndarray | None = None
    label_mode: str = "none"  # where the labels come from: "none", "folder", "array"
    classes: list[str] = []

    def __len__(self) -> int:
        return len(self.names)

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def label(self, i: int) -> int:
        return int(self.labels[i]) if self.labels is not None else -1

    def describe(self) -> dict[str, Any]:
        """JSON-able description for the manifest."""
        return {"kind": self.kind, "path": getattr(self, "path", None), "num_images": len(self),
                "labels": self.label_mode}


class FolderSource(ImageSource):
    """All jpg/png/webp files below ``root``, recursively, in sorted relative-path order."""

    kind = "folder"

    def __init__(self, root: str | os.PathLike, labels: str = "none"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.path = str(self.root.resolve())
        self.names = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                            if p.is_file() and _is_image(p.name))
        self.labels, self.classes = _folder_labels(self.names, str(self.root), labels)
        self.label_mode = labels

    def load(self, i: int) -> Image.Image:
        return Image.open(self.root / self.names[i])


class ZipSource(ImageSource):
    """All jpg/png/webp members of a .zip in sorted order; a single top folder (``utkface/``) is ignored."""

    kind = "zip"

    def __init__(self, path: str | os.PathLike, labels: str = "none"):
        self.path = str(Path(path).resolve())
        if not Path(path).is_file():
            raise FileNotFoundError(f"zip file {path} does not exist")
        try:
            with zipfile.ZipFile(path) as z:
                members = sorted(n for n in z.namelist() if not n.endswith("/") and _is_image(n)
                                 and not n.startswith("__MACOSX/"))
        except zipfile.BadZipFile as e:
            raise ValueError(f"{path} is not a readable zip file: {e}") from e
        self.members = members
        tops = {m.split("/", 1)[0] for m in members}
        strip = len(tops) == 1 and all("/" in m for m in members)
        self.names = [m.split("/", 1)[1] if strip else m for m in members]
        self.labels, self.classes = _folder_labels(self.names, self.path, labels)
        self.label_mode = labels
        self._zip: zipfile.ZipFile | None = None

    def __getstate__(self):
        return {**self.__dict__, "_zip": None}  # each worker process opens its own handle

    def load(self, i: int) -> Image.Image:
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        return Image.open(io.BytesIO(self._zip.read(self.members[i])))


class ArraySource(ImageSource):
    """In-memory uint8 images (N, H, W) grey or (N, H, W, 3) RGB, with optional int labels."""

    kind = "array"

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, name: str = "array",
                 classes: list[str] | None = None):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}")
        self.images, self.path = images, name
        self.names = [f"{name}[{i}]" for i in range(len(images))]
        self.labels = None if labels is None else np.asarray(labels, np.int64)
        if self.labels is not None:
            self.label_mode = "array"
            self.classes = classes or [str(c) for c in range(int(self.labels.max()) + 1)]

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])


def open_source(source: str | os.PathLike | ImageSource, labels: str = "none") -> ImageSource:
    """A folder, a .zip or an ImageSource; raises ValueError when it holds no images."""
    if isinstance(source, ImageSource):
        src = source
    else:
        path = Path(source)
        if path.is_dir():
            src = FolderSource(path, labels)
        elif path.suffix.lower() == ".zip":
            src = ZipSource(path, labels)
        elif not path.exists():
            raise FileNotFoundError(f"source {path} does not exist (expected an image folder or a .zip)")
        else:
            raise ValueError(f"source must be an image folder or a .zip of images, got {path}")
    if len(src) == 0:
        raise ValueError(f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) found in {src.path}")
    return src


def prepare_image(image: Image.Image, resolution: int, channels: int = 3, resample: str = "bicubic") -> np.ndarray:
    """PIL image -> uint8 (channels, resolution, resolution): center crop to a square, then resize."""
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {list(RESAMPLE)}, got {resample!r}")
    image.load()  # decode now, so a truncated file fails here and not later
    image = image.convert(COLOR_MODES[channels])
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), RESAMPLE[resample])
    array = np.asarray(image, np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()
