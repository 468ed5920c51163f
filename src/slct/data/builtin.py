"""Built-in datasets that need no download, for the demo: ``LatentDataset("builtin:digits")``.

"digits" is scikit-learn's bundled 8x8 handwritten digits (1797 images, labels 0-9, grey levels
0..16), upsampled bilinearly to 16x16 (smooth strokes without the overshoot of bicubic), one channel,
pixel space (identity codec). It goes through the same ``encode_dataset`` path as real data, into
``$SLCT_CACHE/builtin-digits-16`` (default ``~/.cache/slct``) on first use, so it has an ordinary
manifest with statistics.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from slct.data.sources import ArraySource, ImageSource

DIGITS_RESOLUTION = 16


def cache_dir() -> Path:
    return Path(os.environ.get("SLCT_CACHE") or Path.home() / ".cache" / "slct")


def digits_source() -> ImageSource:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # grey levels 0..16 -> 0..255
    return ArraySource(images, digits.target, name="sklearn-digits", classes=[str(d) for d in range(10)])


# name -> (source factory, codec spec, resolution, resample)
BUILTINS: dict[str, tuple[Callable[[], ImageSource], dict, int, str]] = {
    "digits": (digits_source, {"name": "identity", "channels": 1}, DIGITS_RESOLUTION, "bilinear"),
    # the native 8x8 digits: a quarter of the compute per step, for the CPU demo and fast tests
    "digits8": (digits_source, {"name": "identity", "channels": 1}, 8, "nearest"),
}


def builtin_dataset_dir(name: str) -> Path:
    """The cache directory of built-in dataset ``name``, encoding it first if needed (safe across processes)."""
    if name not in BUILTINS:
        raise ValueError(f"builtin dataset must be one of {[f'builtin:{n}' for n in BUILTINS]}, got 'builtin:{name}'")
    make_source, codec, resolution, resample = BUILTINS[name]
    target = cache_dir() / f"builtin-{name}-{resolution}"
    if (target / "manifest.json").is_file():
        return target
    from slct.data.encode import encode_dataset

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".builtin-{name}-", dir=target.parent))
    try:
        encode_dataset(make_source(), tmp / "data", codec, resolution, batch_size=512, num_workers=0,
                       device="cpu", progress=False, resample=resample)
        try:
            os.rename(tmp / "data", target)  # atomic; fails if another process finished first
        except OSError:
            if not (target / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
