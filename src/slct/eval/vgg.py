"""VGG16 features for precision and recall (Kynkaanniemi et al. 2019; the paper's recall, REFERENCE.md [10]).

Two weight files are understood, told apart by their format:

* ``vgg16.pt`` from NVlabs (a TorchScript archive; the detector of the authors' evaluation code and of
  the StyleGAN papers). Called with ``return_features=True`` it returns the 4096-d fc2 features of
  the original TensorFlow VGG16 that Kynkaanniemi et al. used. **Use this one for comparable recall.**
* torchvision's ImageNet ``vgg16-397923af.pth`` (a state dict), loaded into :class:`VGG16` below;
  features are fc2 after its ReLU. Same architecture, different training run: recall values are
  close to but not interchangeable with the NVlabs detector's.

Both take images (N, 3, 224, 224) as float RGB in [0, 255] (the resize to 224 happens before, by the
one resize policy of :mod:`slct.eval.extractors`) and return (N, 4096).
"""

from __future__ import annotations

import os
import warnings
import zipfile
from typing import Callable

import torch
from torch import nn

NVLABS_VGG16_FILE = "vgg16.pt"
NVLABS_VGG16_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/vgg16.pt"
TORCHVISION_VGG16_FILE = "vgg16-397923af.pth"
TORCHVISION_VGG16_URL = f"https://download.pytorch.org/models/{TORCHVISION_VGG16_FILE}"
INPUT_SIZE = 224
FEATURE_DIM = 4096

# configuration "D" of Simonyan & Zisserman: conv widths, "M" = 2x2 max pool
_VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class VGG16(nn.Module):
    """torchvision's VGG16 layout (``features.N`` / ``classifier.N`` keys). forward -> fc2 features after ReLU."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in _VGG16_LAYERS:
            if width == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, FEATURE_DIM), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(FEATURE_DIM, FEATURE_DIM), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(FEATURE_DIM, num_classes),
        )
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, 224, 224) RGB in [0, 255] -> (N, 4096) fc2 features (post-ReLU)."""
        mean = torch.tensor(_IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(_IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
        x = self.avgpool(self.features((x - mean) / std)).flatten(1)
        return self.classifier[:5](x)  # up to fc2 and its ReLU; dropout is inactive in eval mode


def is_torchscript(path: str | os.PathLike) -> bool:
    """TorchScript archives are zips holding ``constants.pkl`` and compiled ``code/``; state dicts are not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in z.namelist())


def load_vgg16(path: str | os.PathLike,
               device: str | torch.device = "cpu") -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """Load either weight format. Returns (features_fn, format) with format "nvlabs-torchscript" or
    "torchvision-state-dict"; ``features_fn`` maps (N, 3, 224, 224) floats in [0, 255] to (N, 4096)."""
    if is_torchscript(path):
        with warnings.catch_warnings():  # TorchScript is deprecated in torch, but it is the format NVlabs published
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device).eval()
        return (lambda x: module(x, return_features=True)), "nvlabs-torchscript"
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} is neither NVlabs' vgg16.pt nor a state dict (got {type(state).__name__})")
    with torch.device("meta"):  # shapes only: every tensor is replaced by the file's below
        model = VGG16()
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{path} is neither NVlabs' vgg16.pt nor a torchvision vgg16 state dict: {e}") from e
    model = model.eval().requires_grad_(False).to(device)
    return model, "torchvision-state-dict"
