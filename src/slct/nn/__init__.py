"""Networks for sLCT: the ADM UNet, a DiT, and the named norms they use (REFERENCE.md [6]).

``build_network(name, **overrides)`` builds a preset from ``NETWORK_PRESETS``; ``norm_layer(name,
channels)`` a norm from ``NORMS``. Every backbone is called as ``net(x, noise_labels,
class_labels=None)`` with x (B, C, H, W) and returns a tensor shaped like x; wrap it in
``slct.precond.PrecondModel`` for a consistency model or an EDM denoiser.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from torch import nn

from slct.nn.dit import DIT_SIZES, DiT
from slct.nn.norms import NORMS, norm_layer
from slct.nn.unet import DhariwalUNet

__all__ = ["NETWORK_PRESETS", "NORMS", "DhariwalUNet", "DiT", "build_network", "follow_resolution", "network_kwargs",
           "norm_layer"]

# Default input shapes: the paper's SD-VAE latents (4x32x32), except for the CPU-sized presets,
# which take TAEF2 latents of 64 px images (32x8x8).
_TAEF2_64PX = dict(in_channels=32, resolution=8)

# preset name -> (backbone class, default constructor kwargs)
NETWORK_PRESETS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    # REFERENCE.md [6]: 128 ch, (1,2,3,4) over 32/16/8/4, 4 blocks, attention at 16, 8 (+ middle),
    # 64 ch/head, embedding 512, dropout 0, GroupNorm: 151,325,956 parameters at 4x32x32.
    "unet-paper": (DhariwalUNet, dict(
        in_channels=4, resolution=32, model_channels=128, channel_mult=(1, 2, 3, 4), num_blocks=4,
        attn_resolutions=(16, 8), channels_per_head=64, emb_channels=512, dropout=0.0)),
    # Trains on a 2-core CPU: two levels (8x8: 64 ch, 4x4: 128 ch), attention at 4x4; 4.6M parameters.
    "unet-small": (DhariwalUNet, dict(
        **_TAEF2_64PX, model_channels=64, channel_mult=(1, 2), num_blocks=2, attn_resolutions=(4,))),
    # Tests and the demo: 0.84M parameters, forward+backward of 8 samples in ~0.1 s on a CPU.
    "unet-tiny": (DhariwalUNet, dict(
        **_TAEF2_64PX, model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))),
    # DiT-{S,B,L,XL}/{2,4,8} on the paper's 4x32x32 latents (Peebles & Xie 2023, Table 1).
    **{f"dit-{size}{patch}": (DiT, dict(in_channels=4, resolution=32, patch_size=patch, hidden_size=width,
                                        depth=depth, num_heads=heads))
       for size, (width, depth, heads) in DIT_SIZES.items() for patch in (2, 4, 8)},
    # Tests: 2 blocks of width 64 on 16 tokens.
    "dit-tiny": (DiT, dict(**_TAEF2_64PX, patch_size=2, hidden_size=64, depth=2, num_heads=2)),
}


def network_kwargs(name: str, **overrides: Any) -> tuple[type[nn.Module], dict[str, Any]]:
    """The class and the complete, validated constructor kwargs of preset ``name`` with ``overrides``.

    Keys must be constructor arguments of the preset's class (ValueError naming the key and
    listing the allowed ones); values must match the annotated types (int, float, str, bool,
    tuple of ints, or None where allowed; lists are accepted for tuples), else ValueError.
    Values themselves (norm names, divisibility, ...) are checked by the constructor.
    """
    if name not in NETWORK_PRESETS:
        raise ValueError(f"network {name!r} is unknown; allowed: {', '.join(NETWORK_PRESETS)}")
    cls, defaults = NETWORK_PRESETS[name]
    hints = typing.get_type_hints(cls.__init__)
    hints.pop("return", None)
    kwargs = dict(defaults)
    for key, value in overrides.items():
        if key not in hints:
            raise ValueError(f"{key!r} is not an option of {cls.__name__} ({name!r}); "
                             f"allowed: {', '.join(sorted(hints))}")
        kwargs[key] = _coerce(key, value, hints[key])
    return cls, kwargs


def follow_resolution(name: str, resolution: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``overrides`` plus the preset's attention resolutions moved to the same UNet levels at ``resolution``.

    unet-small attends at 4x4 on 8x8 latents; on 16x16 latents the same level is 8x8. An explicit
    ``attn_resolutions`` (or a preset without them, e.g. a DiT) is left as it is.
    """
    out = dict(overrides or {})
    _, defaults = NETWORK_PRESETS[name] if name in NETWORK_PRESETS else (None, {})
    native = defaults.get("resolution")
    if defaults.get("attn_resolutions") and "attn_resolutions" not in out and native and native != resolution:
        out["attn_resolutions"] = tuple(max(1, r * resolution // native) for r in defaults["attn_resolutions"])
    return out


def build_network(name: str, **overrides: Any) -> nn.Module:
    """Build the network preset ``name`` (``NETWORK_PRESETS``) with constructor ``overrides``.

    Example: ``build_network("unet-paper", block_norm="nonscaling-layer", out_norm="nonscaling-layer")``
    is the paper's final network (Table 2d, NsLN). Common keys: in_channels (= out channels),
    resolution, label_dim, label_dropout, dropout, block_norm, out_norm, noise_embedding,
    fourier_scale; UNet: model_channels, channel_mult, num_blocks, attn_resolutions,
    channels_per_head, emb_channels; DiT: patch_size, hidden_size, depth, num_heads, mlp_ratio.
    """
    cls, kwargs = network_kwargs(name, **overrides)
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the type annotation ``hint`` (and converted: list -> tuple, int -> float)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is tuple and isinstance(value, (tuple, list)) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
    raise ValueError(f"{key} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
