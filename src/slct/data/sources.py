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
from PIL import Image, ImageOps

# raster formats worth reading as training images; kept to those this PIL build can open (AVIF needs a plugin)
_RASTER_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".dib", ".gif", ".tif",
                      ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k", ".jpx", ".jpf", ".jpc", ".j2c",
                      ".qoi", ".sgi", ".rgb", ".rgba", ".bw", ".pcx", ".psd", ".ico", ".dds", ".avif", ".heic")
IMAGE_EXTENSIONS = tuple(e for e in _RASTER_EXTENSIONS if Image.registered_extensions().get(e) in Image.OPEN)
LABEL_MODES = ("none", "folder")
# --alpha-background: what transparent pixels become (transparency has no colour of its own; the RGB hidden under
# alpha 0 is arbitrary, often black or garbage)
ALPHA_BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0),
                                                      "grey": (128, 128, 128)}
# images whose shorter side is below resolution / MIN_SIZE_FRACTION are skipped by default: upscaled more than 4x
# they carry almost nothing (a 1x1 image becomes a solid square)
MIN_SIZE_FRACTION = 4


def min_side(resolution: int, min_size: int | None = None) -> int:
    """The smallest usable shorter side in px: ``min_size`` (0: any), or by default resolution / 4."""
    return max(1, resolution // MIN_SIZE_FRACTION) if min_size is None else int(min_size)


class SkipImage(Exception):
    """An image that is readable but not usable (``reason``: a short category; the message: the details)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason

# name -> PIL filter; PIL's resize antialiases when it shrinks
RESAMPLE: dict[str, int] = {
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}

COLOR_MODES = {1: "L", 3: "RGB"}  # image channels -> PIL mode
# modes whose conversion changes what the pixels mean (listed in the manifest): mode -> reason
COLOUR_CONVERSIONS = {"CMYK": "cmyk", "P": "palette", "PA": "palette", "YCbCr": "colour-space", "LAB": "colour-space",
                      "HSV": "colour-space", "1": "bilevel"}


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not Path(name).name.startswith(".")


def _ignored(files: list[str]) -> dict[str, int]:
    """Files that are not read as images, counted by extension (hidden files aside)."""
    out: dict[str, int] = {}
    for name in files:
        base = Path(name).name
        if not _is_image(name) and not base.startswith("."):
            ext = Path(base).suffix.lower() or "(none)"
            out[ext] = out.get(ext, 0) + 1
    return dict(sorted(out.items()))


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


def walk_folder(root: Path) -> tuple[list[str], list[dict]]:
    """Every regular file below ``root`` (sorted, root-relative, '/'-separated) and what could not be read, each as
    {"name", "reason", "detail"}: directory symlinks are followed (a class assembled from links is read), each real
    directory once (a link back up is a symlink loop, not an endless walk); unreadable directories, broken links
    and image-named entries that are not regular files (a FIFO, a socket) are listed, never silently dropped."""
    files: list[str] = []
    problems: list[dict] = []
    seen: set[tuple[int, int]] = set()
    # the real (not linked) directories of the tree first: a link to one of them is reported as the link, and the
    # folder is read (and names its class) under its real name, whichever of the two the walk meets first
    real: dict[tuple[int, int], str] = {}
    for dirpath, _, _ in os.walk(root, followlinks=False):
        try:
            st = os.stat(dirpath)
        except OSError:
            continue
        rel_path = os.path.relpath(dirpath, root).replace(os.sep, "/")
        real[(st.st_dev, st.st_ino)] = "" if rel_path == "." else rel_path

    def visit(folder: Path, rel: str) -> None:
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen:
            problems.append({"name": rel or ".", "reason": "symlink-loop",
                             "detail": f"links to {os.path.realpath(folder)}, a directory already read"})
            return
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            problems.append({"name": rel or ".", "reason": "unreadable-directory",
                             "detail": f"{type(e).__name__}: {e.strerror or e}"})
            return
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            try:
                if entry.is_dir(follow_symlinks=True):
                    st = os.stat(entry.path)
                    target = real.get((st.st_dev, st.st_ino))
                    if entry.is_symlink() and target is not None:  # read under its real name instead
                        problems.append({"name": name, "reason": "symlink-loop",
                                         "detail": f"links to {os.path.realpath(entry.path)}, read as "
                                                   f"{target or 'the top folder'}"})
                        continue
                    visit(Path(entry.path), name)
                elif entry.is_file(follow_symlinks=True):
                    files.append(name)
                elif entry.is_symlink() and not os.path.exists(entry.path):
                    problems.append({"name": name, "reason": "broken-link",
                                     "detail": f"links to {os.readlink(entry.path)}, which does not exist"})
                elif _is_image(name):
                    kind = _file_kind(entry.path)
                    problems.append({"name": name, "reason": "not-a-file", "detail": f"a {kind}, not a regular file"})
            except OSError as e:  # a link loop of files, a permission error on stat
                reason = "symlink-loop" if e.errno == 40 else "unreadable"
                problems.append({"name": name, "reason": reason, "detail": f"{type(e).__name__}: {e.strerror or e}"})

    visit(root, "")
    return sorted(files), problems


def _file_kind(path: str) -> str:
    import stat

    mode = os.stat(path).st_mode
    for test, kind in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return "special file"


class ImageSource:
    """Base: ``names`` (sorted, one per image), ``labels`` (int64 array or None), ``classes``."""

    kind = "images"
    names: list[str]
    ignored: dict[str, int] = {}  # files that are not images PIL reads, counted by extension
    not_read: list[dict] = []  # entries that could not be listed or read as files: {"name", "reason", "detail"}
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
        files, self.not_read = walk_folder(self.root)
        self.names = [n for n in files if _is_image(n)]
        self.ignored = _ignored(files)
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
                files = [n for n in z.namelist() if not n.endswith("/") and not n.startswith("__MACOSX/")]
        except zipfile.BadZipFile as e:
            raise ValueError(f"{path} is not a readable zip file: {e}") from e
        members = sorted(n for n in files if _is_image(n))
        self.ignored = _ignored(files)
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


def normalize_image(image: Image.Image, channels: int = 3, alpha_background: str = "white",
                    notes: list | None = None) -> Image.Image:
    """Any PIL image -> mode L (channels 1) or RGB (3), converting what ``Image.convert`` gets wrong.

    - 16-bit greyscale (modes I;16*, I) is scaled by 255/65535 (``convert`` clips it to 255: almost white);
      32-bit float (F) is read as [0, 1] when its maximum is at most 1, else as [0, 255].
    - Transparent pixels (RGBA, LA, PA, or a palette/tRNS transparency) are composited on ``alpha_background``
      (``ALPHA_BACKGROUNDS``); an alpha channel that is fully opaque is dropped as is.
    - Animated or multi-page files give their first frame; the EXIF orientation is applied.
    ``notes`` (if given) receives one (reason, detail) pair per such conversion, for the manifest.
    """
    notes = [] if notes is None else notes
    if alpha_background not in ALPHA_BACKGROUNDS:
        raise ValueError(f"alpha_background must be one of {list(ALPHA_BACKGROUNDS)}, got {alpha_background!r}")
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
        notes.append(("first-frame", f"{image.n_frames} frames: the first one is used"))
    orientation = image.getexif().get(0x0112, 1) if hasattr(image, "getexif") else 1
    if orientation not in (None, 1):
        image = ImageOps.exif_transpose(image)
        notes.append(("exif-orientation", f"EXIF orientation {orientation} applied"))
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(image).astype(np.float64)
        if mode == "I" and a.max() <= 255:  # 32-bit container of 8-bit values
            image = Image.fromarray(a.clip(0, 255).astype(np.uint8))
        else:
            image = Image.fromarray(np.round(a.clip(0, 65535) * (255 / 65535)).astype(np.uint8))
            notes.append(("16-bit", f"mode {mode}: 16-bit values scaled to 8 bits"))
    elif mode == "F":
        a = np.asarray(image).astype(np.float64)
        scale = 255.0 if a.max() <= 1.0 else 1.0
        image = Image.fromarray(np.round((a * scale).clip(0, 255)).astype(np.uint8))
        notes.append(("float", f"32-bit float values read as [0, {1 if scale == 255 else 255}]"))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"))
        if alpha.min() < 255:
            background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUNDS[alpha_background], 255))
            image = Image.alpha_composite(background, rgba)
            notes.append(("alpha", f"{float(np.mean(alpha < 255)):.0%} of pixels transparent: composited on "
                                   f"{alpha_background}"))
        else:
            image = rgba
    if image.mode in COLOUR_CONVERSIONS:
        notes.append((COLOUR_CONVERSIONS[image.mode], f"mode {image.mode} converted to {COLOR_MODES[channels]}"))
    return image.convert(COLOR_MODES[channels])


def prepare_image(image: Image.Image, resolution: int, channels: int = 3, resample: str = "bicubic",
                  alpha_background: str = "white", min_size: int | None = 0,
                  notes: list | None = None) -> np.ndarray:
    """PIL image -> uint8 (channels, resolution, resolution): normalise (``normalize_image``), center crop to a
    square, then resize. An image whose shorter side is below ``min_side(resolution, min_size)`` raises
    ``SkipImage``."""
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {list(RESAMPLE)}, got {resample!r}")
    image.load()  # decode now, so a truncated file fails here and not later
    w, h = image.size
    smallest = min_side(resolution, min_size)
    if min(w, h) < smallest:
        raise SkipImage("too-small", f"{w}x{h} px, below the minimum side of {smallest} px (--min-size)")
    image = normalize_image(image, channels, alpha_background, notes)
    w, h = image.size  # an EXIF rotation may have swapped them
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), RESAMPLE[resample])
    array = np.asarray(image, np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()
