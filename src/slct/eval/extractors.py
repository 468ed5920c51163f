"""Feature extractors behind one interface, and the one resize policy (REFERENCE.md [10]).

An extractor maps a batch of images to features: ``extractor(images) -> np.ndarray`` float64 of shape
(N, ``dim``). It has a ``name``, ``dim``, ``input_size`` (side of the square it sees) and ``spec()``, a
JSON-able record that pins it (weights file and sha256 included) in results and reference statistics.

======================  =====  ======  ======================================================
name                    dim    input   what
======================  =====  ======  ======================================================
``inception``           2048   299     FID Inception-V3 pool3 (pytorch-fid weights): FID
``dinov2``              1024   224     DINOv2 ViT-L/14 class token (timm network, Meta's weights): FD-DINOv2
``vgg16``               4096   224     VGG16 fc2 (NVlabs or torchvision weights): the paper's recall
``mobilenetv2``         1280   224     ImageNet MobileNetV2 (LiteRT, offline): "FD-MobileNetV2"
``pixels``              s*s*c  s       the images themselves, downsampled (tests, the digits demo)
======================  =====  ======  ======================================================

**Protocols** (:data:`PROTOCOLS`): how images reach the network, identical for real and generated
images. Both first make images uint8, as saving a PNG does: float NCHW tensors in [-1, 1] (what codecs
decode to) become ``round((x + 1) * 127.5)`` clamped to [0, 255]; uint8 NHWC arrays are taken as they are.

* ``slct`` (default): each uint8 image is resized with PIL's bicubic filter straight to ``input_size`` x
  ``input_size`` (no crop, no JPEG round trip); grey images are repeated to RGB for the RGB networks.
  For FD-DINOv2 this is exactly dgm-eval's (and EDM2's reference) resize.
* ``pytorch-fid``: the paper authors' FID protocol. Images become float in [0, 1] (``x / 255``, files read
  with PIL's ``convert("RGB")``) and are resized inside the network input by bilinear interpolation in
  float (``F.interpolate``, ``align_corners=False``, no antialiasing), as pytorch-fid's ``resize_input``.
  Torch networks only (not the uint8 TFLite ``mobilenetv2``).

The protocol is part of :meth:`Extractor.spec`, so references and results record it and features made
under different protocols are never compared.

Weights (inception, vgg16, mobilenetv2) are looked up in order: the ``weights`` argument (``--weights``);
``$SLCT_WEIGHTS``; ``../shared/weights``; the torch hub cache ``~/.cache/torch/hub/checkpoints``. They are
downloaded into the hub cache only when asked (``download=True``, ``--download``); otherwise a missing
file raises FileNotFoundError naming the file, its published URL and where to put it.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

RESIZE_METHOD = "pil-bicubic"
RESIZE_POLICY = ("float [-1,1] -> uint8 round((x+1)*127.5) clamped; uint8 kept; "
                 "PIL bicubic resize to the extractor's input size; grey -> RGB; no JPEG")


@dataclass(frozen=True)
class Protocol:
    """How images reach an extractor: ``resize`` names the resize (recorded in specs), ``policy`` says it all."""

    name: str
    resize: str
    policy: str
    loader: str  # how image files are decoded: "slct" (slct encode's reader) or "pil-rgb" (PIL convert("RGB"))


PROTOCOLS: dict[str, Protocol] = {
    "slct": Protocol("slct", RESIZE_METHOD, RESIZE_POLICY, loader="slct"),
    "pytorch-fid": Protocol(
        "pytorch-fid", "torch-bilinear-float",
        "float [-1,1] -> uint8 round((x+1)*127.5) clamped (a saved PNG); files read with PIL convert('RGB'); "
        "x / 255 -> F.interpolate bilinear (align_corners=False, no antialias) to the input size in float",
        loader="pil-rgb"),
}
DEFAULT_PROTOCOL = "slct"


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {name!r}")
    return PROTOCOLS[name]

Images = torch.Tensor | np.ndarray | Sequence[np.ndarray]

# ----------------------------------------------------------------------------------------------
# The resize policy.


def _check_channels(c: int, layout: str, shape: tuple) -> None:
    if c not in (1, 3):
        raise ValueError(f"images must be float NCHW in [-1, 1] or uint8 NHWC with 1 or 3 channels; "
                         f"got {layout}-shaped {shape}")


def to_uint8(images: Images) -> np.ndarray | list[np.ndarray]:
    """Images -> uint8 NHWC: a (N, H, W, C) array, or a list of (H, W, C) arrays when sizes vary.

    Accepts float tensors/arrays NCHW in [-1, 1] (``round((x + 1) * 127.5)``, clamped), uint8
    arrays/tensors NHWC, and sequences of uint8 (H, W) or (H, W, C) arrays (e.g. from image files).
    """
    if isinstance(images, (list, tuple)):
        out = []
        for im in images:
            im = np.asarray(im)
            if im.dtype != np.uint8:
                raise ValueError(f"a list of images must hold uint8 HWC arrays, got {im.dtype}")
            im = im[..., None] if im.ndim == 2 else im
            if im.ndim != 3:
                raise ValueError(f"a list of images must hold (H, W) or (H, W, C) arrays, got {im.shape}")
            _check_channels(im.shape[-1], "HWC", im.shape)
            out.append(im)
        return out
    if isinstance(images, np.ndarray):
        if images.ndim == 4 and images.dtype == np.uint8:
            _check_channels(images.shape[3], "NHWC", images.shape)
            return images
        images = torch.from_numpy(np.array(images))  # a float NCHW array: the tensor path below
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a 4-d float NCHW / uint8 NHWC tensor or array, or a list of uint8 "
                         f"HWC arrays; got {type(images).__name__} {getattr(images, 'shape', '')}")
    if images.dtype == torch.uint8:
        _check_channels(images.shape[3], "NHWC", tuple(images.shape))
        return images.cpu().numpy()
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1] or uint8, got {images.dtype}")
    _check_channels(images.shape[1], "NCHW", tuple(images.shape))
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf (did sampling diverge?)")
    x = ((images.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def resize_uint8(images: np.ndarray | Sequence[np.ndarray], size: int, channels: int = 3) -> np.ndarray:
    """uint8 HWC images -> (N, size, size, channels) uint8 by the resize policy.

    Grey becomes RGB by repetition; RGB becomes grey (``channels=1``) by PIL's ITU-R 601 luma.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    out = np.empty((len(images), size, size, channels), dtype=np.uint8)
    for i, im in enumerate(images):
        if im.shape[:2] == (size, size) and im.shape[2] == channels:
            out[i] = im
            continue
        pil = PIL.Image.fromarray(np.ascontiguousarray(im[..., 0] if im.shape[2] == 1 else im))  # "L" or "RGB"
        pil = pil.convert("RGB" if channels == 3 else "L")
        if pil.size != (size, size):
            pil = pil.resize((size, size), PIL.Image.BICUBIC)
        out[i] = np.asarray(pil).reshape(size, size, channels)
    return out


def prepare_images(images: Images, size: int, channels: int = 3) -> np.ndarray:
    """The whole resize policy: any accepted image batch -> uint8 (N, size, size, channels)."""
    return resize_uint8(to_uint8(images), size, channels)


# ----------------------------------------------------------------------------------------------
# Weight files.


def weights_search_dirs() -> list[Path]:
    """Where weight files are looked for, in order (see the module docstring)."""
    dirs = [Path(os.environ["SLCT_WEIGHTS"])] if os.environ.get("SLCT_WEIGHTS") else []
    dirs += [Path.cwd().parent / "shared" / "weights",
             Path(__file__).resolve().parents[3].parent / "shared" / "weights",
             Path(torch.hub.get_dir()) / "checkpoints"]
    return list(dict.fromkeys(dirs))  # de-duplicated, order kept


def find_weights(weights: str | os.PathLike | None, *, filenames: Sequence[str], url: str, what: str,
                 download: bool = False, sha256_prefix: str | None = None) -> Path:
    """Resolve a weight file: explicit path, else the first of ``filenames`` in :func:`weights_search_dirs`,
    else download ``url`` (saved as ``filenames[0]``) into the torch hub cache when ``download``."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{what} weights not found: {path} (from --weights / weights=)")
        return path
    dirs = weights_search_dirs()
    for d in dirs:
        for name in filenames:
            if (d / name).is_file():
                return d / name
    target = Path(torch.hub.get_dir()) / "checkpoints" / filenames[0]
    if download:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), hash_prefix=sha256_prefix)
        return target
    also = f" (or {' / '.join(filenames[1:])})" if len(filenames) > 1 else ""
    raise FileNotFoundError(
        f"{what} weights {filenames[0]}{also} not found (looked in {', '.join(str(d) for d in dirs)}). "
        f"Download {url} and put it at {target} (or in $SLCT_WEIGHTS), pass --weights PATH, "
        f"or re-run with --download to fetch it.")


_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file (cached per path, size and mtime: weights are hashed once per process)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA256_CACHE[key] = h.hexdigest()
    return _SHA256_CACHE[key]


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------
# Extractors.


class Extractor:
    """Base class: images in, float64 features (N, dim) out.

    Subclasses implement :meth:`features_uint8` (the ``slct`` protocol's resized uint8 batch) or, for torch
    networks that also take the ``pytorch-fid`` protocol, :meth:`features_float` (float [0, 1] NCHW at
    ``input_size``) and list both in ``protocols``.
    """

    name: str = ""
    dim: int = 0
    input_size: int = 0
    channels: int = 3
    batch_size: int = 64
    weights_path: Path | None = None
    protocols: tuple[str, ...] = ("slct",)
    protocol: str = DEFAULT_PROTOCOL
    device: torch.device = torch.device("cpu")

    def _set_protocol(self, protocol: str) -> None:
        get_protocol(protocol)
        if protocol not in self.protocols:
            raise ValueError(f"extractor {self.name!r} supports the protocols {list(self.protocols)}, not {protocol!r}")
        if protocol == "pytorch-fid" and self.channels != 3:
            raise ValueError("the pytorch-fid protocol reads RGB images (channels=3)")
        self.protocol = protocol

    def __call__(self, images: Images) -> np.ndarray:
        if self.protocol == "slct":
            x = prepare_images(images, self.input_size, self.channels)
            run = self.features_uint8
        else:
            x = to_uint8(images)
            run = self._features_resized_in_float
        if len(x) == 0:
            return np.zeros((0, self.dim), dtype=np.float64)
        out = np.concatenate([np.asarray(run(x[i:i + self.batch_size]), dtype=np.float64)
                              for i in range(0, len(x), self.batch_size)])
        if out.shape != (len(x), self.dim):
            raise RuntimeError(f"extractor {self.name!r} returned {out.shape}, expected {(len(x), self.dim)}")
        return out

    def _features_resized_in_float(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """The pytorch-fid protocol: uint8 -> [0, 1] -> bilinear resize in float -> :meth:`features_float`."""
        def to_float(batch: np.ndarray) -> torch.Tensor:
            x = torch.from_numpy(np.array(batch)).to(self.device).permute(0, 3, 1, 2).float() / 255
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grey -> RGB, as PIL convert("RGB")
            # pytorch-fid resizes unconditionally; at the input size bilinear with align_corners=False is the identity
            return F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)

        if isinstance(images, np.ndarray):
            x = to_float(images)
        else:  # images of several sizes: each is resized on its own (bilinear has no cross-image effect)
            x = torch.cat([to_float(im[None]) for im in images])
        return self.features_float(x)

    def features_uint8(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, input_size, input_size, channels) -> (B, dim)."""
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float() / 255
        return self.features_float(x)

    def features_float(self, images: torch.Tensor) -> np.ndarray:
        """float (B, channels, input_size, input_size) in [0, 1] -> (B, dim)."""
        raise NotImplementedError

    @classmethod
    def options_from_spec(cls, spec: dict[str, Any]) -> dict[str, Any]:
        """Constructor options that rebuild the feature space ``spec`` describes (weights aside)."""
        return {"protocol": spec.get("protocol", DEFAULT_PROTOCOL)} if len(cls.protocols) > 1 else {}

    def spec(self) -> dict[str, Any]:
        """JSON-able identity of the feature space: equal specs give comparable features."""
        spec: dict[str, Any] = dict(name=self.name, dim=self.dim, input_size=self.input_size,
                                    channels=self.channels, resize=PROTOCOLS[self.protocol].resize,
                                    protocol=self.protocol)
        if self.weights_path is not None:
            spec.update(weights=self.weights_path.name, weights_sha256=file_sha256(self.weights_path))
        return spec

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, input_size={self.input_size}, protocol={self.protocol!r})"


class PixelExtractor(Extractor):
    """The pixels themselves at ``size`` x ``size``, scaled to [0, 1] and flattened (HWC order)."""

    name = "pixels"
    protocols = ("slct", "pytorch-fid")

    def __init__(self, size: int = 16, channels: int = 3, protocol: str = DEFAULT_PROTOCOL):
        if int(size) != size or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.input_size, self.channels = int(size), int(channels)
        self.dim = self.input_size * self.input_size * self.channels
        self.batch_size = 1024
        self._set_protocol(protocol)

    @classmethod
    def options_from_spec(cls, spec: dict[str, Any]) -> dict[str, Any]:
        return dict(super().options_from_spec(spec), size=spec["input_size"], channels=spec["channels"])

    def features_uint8(self, images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1) / 255.0

    def features_float(self, images: torch.Tensor) -> np.ndarray:
        return images.permute(0, 2, 3, 1).reshape(len(images), -1).double().cpu().numpy()  # HWC order, as uint8


class InceptionExtractor(Extractor):
    """FID Inception-V3 pool3, 2048-d (:mod:`slct.eval.inception`)."""

    name = "inception"
    protocols = ("slct", "pytorch-fid")

    def __init__(self, weights: str | os.PathLike | None = None, download: bool = False,
                 device: str | torch.device | None = None, batch_size: int = 64, protocol: str = DEFAULT_PROTOCOL):
        from slct.eval import inception

        self.dim, self.input_size, self.batch_size = inception.FEATURE_DIM, inception.INPUT_SIZE, batch_size
        self.weights_path = find_weights(weights, filenames=[inception.FID_WEIGHTS_FILE], url=inception.FID_WEIGHTS_URL,
                                         what="FID Inception-V3", download=download,
                                         sha256_prefix=inception.FID_WEIGHTS_SHA256_PREFIX)
        self.device = _default_device(device)
        self.model = inception.load_fid_inception(self.weights_path).to(self.device)
        self._set_protocol(protocol)

    @torch.no_grad()
    def features_uint8(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1  # the TF graph's [-1, 1]
        return self.model(x).double().cpu().numpy()

    @torch.no_grad()
    def features_float(self, images: torch.Tensor) -> np.ndarray:
        return self.model(2 * images - 1).double().cpu().numpy()  # [0, 1] -> [-1, 1] as pytorch-fid's normalize_input


class VGG16Extractor(Extractor):
    """VGG16 fc2, 4096-d, for precision/recall (:mod:`slct.eval.vgg`); NVlabs' file preferred."""

    name = "vgg16"
    protocols = ("slct", "pytorch-fid")

    def __init__(self, weights: str | os.PathLike | None = None, download: bool = False,
                 device: str | torch.device | None = None, batch_size: int = 64, protocol: str = DEFAULT_PROTOCOL):
        from slct.eval import vgg

        self.dim, self.input_size, self.batch_size = vgg.FEATURE_DIM, vgg.INPUT_SIZE, batch_size
        self.weights_path = find_weights(weights, filenames=[vgg.NVLABS_VGG16_FILE, vgg.TORCHVISION_VGG16_FILE],
                                         url=vgg.NVLABS_VGG16_URL, what="VGG16", download=download)
        self.device = _default_device(device)
        self.model, self.weights_format = vgg.load_vgg16(self.weights_path, self.device)
        self._set_protocol(protocol)

    @torch.no_grad()
    def features_uint8(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float()  # RGB in [0, 255]
        return self.model(x).double().cpu().numpy()

    @torch.no_grad()
    def features_float(self, images: torch.Tensor) -> np.ndarray:
        return self.model(images * 255).double().cpu().numpy()  # the detector takes RGB in [0, 255]

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "weights_format": self.weights_format}


class DINOv2Extractor(Extractor):
    """DINOv2 class token (ViT-L/14: 1024-d) for FD-DINOv2 (:mod:`slct.eval.dinov2`; ``pip install "slct[dinov2]"``).

    Weights: ``weights``, else Meta's checkpoint in the usual places (torch hub cache included), else timm's
    ``model.safetensors`` in the Hugging Face hub cache. ``model`` picks another size (vits14 for quick tests);
    FD-DINOv2 as published is vitl14.
    """

    name = "dinov2"
    protocols = ("slct", "pytorch-fid")

    def __init__(self, weights: str | os.PathLike | None = None, download: bool = False,
                 device: str | torch.device | None = None, batch_size: int = 32, protocol: str = DEFAULT_PROTOCOL,
                 model: str = "vitl14"):
        from slct.eval import dinov2

        variant = dinov2.get_variant(model)
        self.model_name, self.dim, self.input_size, self.batch_size = model, variant.dim, dinov2.INPUT_SIZE, batch_size
        try:
            self.weights_path = find_weights(weights, filenames=[variant.file], url=variant.url,
                                             what=f"DINOv2 {model}", download=download)
        except FileNotFoundError:
            cached = dinov2.hf_cache_file(variant) if weights is None else None
            if cached is None:
                raise
            self.weights_path = cached
        self.device = _default_device(device)
        self.model = dinov2.load_dinov2(self.weights_path, model).to(self.device)
        self.mean = torch.tensor(dinov2.IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(dinov2.IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self._set_protocol(protocol)

    @classmethod
    def options_from_spec(cls, spec: dict[str, Any]) -> dict[str, Any]:
        return dict(super().options_from_spec(spec), model=spec.get("model", "vitl14"))

    @torch.no_grad()
    def features_float(self, images: torch.Tensor) -> np.ndarray:
        return self.model((images - self.mean) / self.std).double().cpu().numpy()

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "model": self.model_name}


class MobileNetV2Extractor(Extractor):
    """ImageNet MobileNetV2 (uint8 TFLite via ai-edge-litert) average pool, 1280-d (:mod:`slct.eval.mobilenet`)."""

    name = "mobilenetv2"

    def __init__(self, weights: str | os.PathLike | None = None, download: bool = False,
                 num_threads: int | None = None):
        from slct.eval import mobilenet

        self.dim, self.input_size = mobilenet.FEATURE_DIM, mobilenet.INPUT_SIZE
        self.weights_path = find_weights(weights, filenames=[mobilenet.MOBILENET_V2_FILE], url=mobilenet.MOBILENET_V2_URL,
                                         what="MobileNetV2", download=download,
                                         sha256_prefix=mobilenet.MOBILENET_V2_SHA256)
        self.model = mobilenet.MobileNetV2Features(self.weights_path, num_threads=num_threads)

    def features_uint8(self, images: np.ndarray) -> np.ndarray:
        return self.model(images)


# name -> extractor class; ``get_extractor(name, **kwargs)`` builds one
EXTRACTORS: dict[str, type[Extractor]] = {
    "inception": InceptionExtractor,
    "vgg16": VGG16Extractor,
    "dinov2": DINOv2Extractor,
    "mobilenetv2": MobileNetV2Extractor,
    "pixels": PixelExtractor,
}


def get_extractor(name: str, **kwargs: Any) -> Extractor:
    """Build the extractor ``name`` (a key of :data:`EXTRACTORS`) with its keyword options.

    Options: inception / vgg16: ``weights``, ``download``, ``device``, ``batch_size``, ``protocol``; dinov2: the
    same and ``model``; mobilenetv2: ``weights``, ``download``, ``num_threads``; pixels: ``size``, ``channels``,
    ``protocol``. ``protocol`` (:data:`PROTOCOLS`) defaults to ``slct``.
    """
    if name not in EXTRACTORS:
        raise ValueError(f"extractor must be one of {sorted(EXTRACTORS)}, got {name!r}")
    cls = EXTRACTORS[name]
    if kwargs.get("protocol", DEFAULT_PROTOCOL) not in cls.protocols:
        get_protocol(kwargs["protocol"])
        raise ValueError(f"extractor {name!r} supports the protocols {list(cls.protocols)}, not {kwargs['protocol']!r}")
    if "protocol" in kwargs and len(cls.protocols) == 1:
        kwargs = {k: v for k, v in kwargs.items() if k != "protocol"}
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"extractor {name!r} does not take {unknown}; its options are {allowed}")
    return cls(**kwargs)
