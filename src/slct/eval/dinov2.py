"""DINOv2 ViT features for FD-DINOv2 (Stein et al. 2023; reported beside FID by EDM2 and later work).

The network is timm's implementation of the DINOv2 ViT (``vit_large_patch14_dinov2`` for ViT-L/14, the
metric's network); the weights come from a file the user has: Meta's released checkpoint
(``dinov2_vitl14_pretrain.pth``, what ``torch.hub`` caches) or timm's ``model.safetensors`` from the
Hugging Face hub cache. Nothing is fetched or executed from the hub at run time (``torch.hub.load``
would run the repository's code); ``.pth`` files load with ``weights_only=True``.

Features: the class token after the final LayerNorm (1024-d for ViT-L/14), of images resized to 224 x 224
and normalised with the ImageNet mean and std, as dgm-eval and EDM2 compute them. The checkpoints carry
a 37 x 37 positional grid (518 px); it is resampled once to 16 x 16 the way the DINOv2 code does at every
call (bicubic with scale factor (16 + 0.1) / 37, no antialiasing), so features match the hub model's.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 224
PATCH_SIZE = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATE_OFFSET = 0.1  # the DINOv2 code's offset on the target grid when resampling positions


@dataclass(frozen=True)
class Variant:
    timm_name: str
    dim: int
    file: str  # Meta's checkpoint name (the torch hub cache's)
    hf_repo: str  # timm's weights on the Hugging Face hub

    @property
    def url(self) -> str:
        return f"https://dl.fbaipublicfiles.com/dinov2/{self.file.removesuffix('_pretrain.pth')}/{self.file}"


VARIANTS: dict[str, Variant] = {
    "vitl14": Variant("vit_large_patch14_dinov2", 1024, "dinov2_vitl14_pretrain.pth", "timm/vit_large_patch14_dinov2.lvd142m"),
    "vitb14": Variant("vit_base_patch14_dinov2", 768, "dinov2_vitb14_pretrain.pth", "timm/vit_base_patch14_dinov2.lvd142m"),
    "vits14": Variant("vit_small_patch14_dinov2", 384, "dinov2_vits14_pretrain.pth", "timm/vit_small_patch14_dinov2.lvd142m"),
}


def get_variant(model: str) -> Variant:
    if model not in VARIANTS:
        raise ValueError(f"DINOv2 model must be one of {sorted(VARIANTS)} (FD-DINOv2 is vitl14), got {model!r}")
    return VARIANTS[model]


def hf_cache_file(variant: Variant) -> Path | None:
    """timm's ``model.safetensors`` in the Hugging Face hub cache, if a snapshot is there."""
    home = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
                / "hub")
    snapshots = home / f"models--{variant.hf_repo.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/model.safetensors")) if snapshots.is_dir() else []
    return found[-1] if found else None


def resample_positions(pos_embed: torch.Tensor, grid: int, prefix_tokens: int = 1) -> torch.Tensor:
    """(1, prefix + M*M, D) -> (1, prefix + grid*grid, D) as DINOv2's ``interpolate_pos_encoding``."""
    prefix, patches = pos_embed[:, :prefix_tokens], pos_embed[:, prefix_tokens:]
    m = math.isqrt(patches.shape[1])
    if m * m != patches.shape[1]:
        raise ValueError(f"positional embedding of {patches.shape[1]} patches is not a square grid")
    if m == grid:
        return pos_embed
    scale = (grid + INTERPOLATE_OFFSET) / m
    x = patches.float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if x.shape[-2:] != (grid, grid):
        raise RuntimeError(f"resampled positions have shape {tuple(x.shape[-2:])}, expected {(grid, grid)}")
    return torch.cat([prefix.float(), x.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1).to(pos_embed.dtype)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A DINOv2 checkpoint as tensors: ``.safetensors`` (timm) or ``.pth`` (Meta; loaded with weights_only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from slct.checkpoint import load_untrusted

    state = load_untrusted(path, what="DINOv2 checkpoint", mmap=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a DINOv2 state dict of tensors")
    return state


def load_dinov2(path: str | os.PathLike, model: str = "vitl14") -> nn.Module:
    """timm's DINOv2 ViT at 224 px with the checkpoint at ``path``; eval mode, no grad.

    Keys must match timm's layout after dropping ``mask_token`` (used only in DINOv2's training); every
    difference is listed in the ValueError.
    """
    from slct.compat import import_module

    timm = import_module("timm", extra="dinov2")
    variant = get_variant(model)
    with torch.device("meta"):  # shapes only: every tensor comes from the file
        net = timm.create_model(variant.timm_name, pretrained=False, img_size=INPUT_SIZE, num_classes=0)
    state = {k: v for k, v in read_state_dict(path).items() if k != "mask_token"}
    if "pos_embed" in state:
        state["pos_embed"] = resample_positions(state["pos_embed"], INPUT_SIZE // PATCH_SIZE, net.num_prefix_tokens)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not have the DINOv2 {model} layout: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shape {wrong[:5]}")
    net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return net.eval().requires_grad_(False)
