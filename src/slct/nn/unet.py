"""The ADM UNet as EDM re-implemented it ("DhariwalUNet"), with swappable norms (REFERENCE.md [6]).

Structure (Dhariwal & Nichol 2021; Karras et al. 2022, ``DhariwalUNet``): a noise embedding
-> 2-layer MLP conditioning vector; an encoder of residual blocks per resolution with a
resampling block between resolutions; a middle (attention block + plain block) at the lowest
resolution; a decoder that concatenates the encoder's activations (one per encoder module) and
upsamples; output norm -> SiLU -> zero-initialised 3x3 conv. Every residual block applies the
conditioning as an adaptive scale-shift after its second norm: norm(x) * (1 + scale) + shift.

The network knows nothing about noise schedules: it maps (x, noise_labels, class_labels) to a
tensor shaped like x; ``slct.precond.PrecondModel`` supplies c_in x and c_noise = 250 ln(sigma).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slct.nn.layers import (RESAMPLE, Attention2d, build_noise_embedding, check_backbone_input, conv2d,
                            label_features, linear)
from slct.nn.norms import norm_layer

__all__ = ["DhariwalUNet", "UNetBlock"]


class UNetBlock(nn.Module):
    """ADM residual block with adaptive scale-shift conditioning and optional self-attention.

    (B, C_in, H, W), emb (B, E) -> (B, C_out, H', W') with H' = 2H ("up"), H/2 ("down") or H.
    x -> norm0 -> SiLU -> resample -> conv0 -> norm1 -> *(1 + scale) + shift -> SiLU -> dropout
    -> conv1 (zero init), plus the skip path (resample, then a 1x1 conv when C_in != C_out), then
    optional attention. A fresh block is therefore the identity (or the 1x1 skip projection).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *,
                 resample: str = "none", attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0.0, norm: str = "group", resolution: int | None = None):
        super().__init__()
        if resample not in RESAMPLE:
            raise ValueError(f"resample {resample!r} is unknown; allowed: {', '.join(RESAMPLE)}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resample = RESAMPLE[resample]
        self.dropout = nn.Dropout(dropout)  # a module, so `active_dropout` sees it
        # resolution: the input's H = W (needed by the per-element norms only); resampling changes it
        out_res = None if resolution is None else {"down": resolution // 2, "up": resolution * 2}.get(resample, resolution)
        self.norm0 = norm_layer(norm, in_channels, resolution=resolution)
        self.conv0 = conv2d(in_channels, out_channels, 3)
        self.affine = linear(emb_channels, 2 * out_channels)
        self.norm1 = norm_layer(norm, out_channels, resolution=out_res)
        self.conv1 = conv2d(out_channels, out_channels, 3, zero_init=True)
        self.skip = conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        num_heads = max(1, out_channels // channels_per_head)
        self.attn = Attention2d(out_channels, num_heads, norm, resolution=out_res) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = self.resample(x)
        x = self.conv0(self.resample(F.silu(self.norm0(x))))
        scale, shift = self.affine(emb)[:, :, None, None].to(x.dtype).chunk(2, dim=1)
        x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))  # adaptive scale-shift (ADM)
        x = self.conv1(self.dropout(x))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        return self.attn(x) if self.attn is not None else x


class DhariwalUNet(nn.Module):
    """ADM UNet backbone: ``net(x, noise_labels, class_labels=None) -> Tensor`` shaped like x.

    Args (all keyword; the override keys of ``build_network``):
        in_channels: latent channels of x, also the output channels (4: SD VAE, 32: TAEF2).
        resolution: H = W of x; must be divisible by 2^(len(channel_mult) - 1).
        label_dim: number of classes, 0 = unconditional.
        label_dropout: probability of dropping a sample's label in training (classifier-free guidance).
        model_channels: channels at the highest resolution (and of the noise embedding).
        channel_mult: per-resolution channel multipliers; one level per entry, halving resolution.
        num_blocks: residual blocks per resolution in the encoder (the decoder has one more).
        attn_resolutions: resolutions whose blocks get self-attention (the middle always has one).
        channels_per_head: attention head width; heads = channels // channels_per_head.
        emb_channels: width of the conditioning vector; None = 4 * model_channels.
        dropout: dropout before each block's second conv.
        block_norm: norm name (``slct.nn.NORMS``) for every norm inside the blocks.
        out_norm: norm name for the output norm.
        noise_embedding: "positional" (sinusoidal on c_noise, default) or "fourier".
        fourier_scale: standard deviation of the Fourier frequencies (iCT: 0.02).
        second_time: a second time input (MeanFlow's interval t - r, Shortcut's step size d), embedded like the
            first through its own first layer and added before the conditioning MLP's nonlinearity; off by
            default (no extra parameters).
    """

    def __init__(self, *, in_channels: int = 4, resolution: int = 32, label_dim: int = 0,
                 label_dropout: float = 0.0, model_channels: int = 128,
                 channel_mult: tuple[int, ...] = (1, 2, 3, 4), num_blocks: int = 4,
                 attn_resolutions: tuple[int, ...] = (16, 8), channels_per_head: int = 64,
                 emb_channels: int | None = None, dropout: float = 0.0, block_norm: str = "group",
                 out_norm: str = "group", noise_embedding: str = "positional",
                 fourier_scale: float = 0.02, second_time: bool = False):
        super().__init__()
        resolutions = [resolution >> level for level in range(len(channel_mult))]
        _check_unet_args(resolution, channel_mult, attn_resolutions, resolutions, dropout, label_dropout)
        emb_channels = 4 * model_channels if emb_channels is None else emb_channels
        self.in_channels = in_channels
        self.resolution = resolution
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=channels_per_head,
                            dropout=dropout, norm=block_norm)

        # Conditioning: noise embedding -> MLP, plus a label embedding (EDM: N(0, 1) weights, no bias).
        self.map_noise = build_noise_embedding(noise_embedding, model_channels, fourier_scale)
        self.map_layer0 = linear(model_channels, emb_channels)
        self.second_time = bool(second_time)
        if self.second_time:
            self.map_noise2 = build_noise_embedding(noise_embedding, model_channels, fourier_scale)
            self.map_layer0_2 = linear(model_channels, emb_channels, bias=False)
        self.map_layer1 = linear(emb_channels, emb_channels)
        self.map_label = linear(label_dim, emb_channels, bias=False) if label_dim else None
        if self.map_label is not None:
            nn.init.normal_(self.map_label.weight)

        # Encoder: every module's output is kept for the decoder.
        self.enc = nn.ModuleDict()
        channels = [model_channels * mult for mult in channel_mult]
        cout = channels[0]
        for level, res in enumerate(resolutions):
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = conv2d(in_channels, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, resample="down", resolution=2 * res,
                                                          **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels[level]
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, resolution=res, **block_kwargs)
        skips = [m.out_channels for m in self.enc.values()]

        # Decoder: middle at the lowest resolution, then num_blocks + 1 skip-consuming blocks per level.
        self.dec = nn.ModuleDict()
        takes_skip = []
        for level in reversed(range(len(channel_mult))):
            res = resolutions[level]
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, resolution=res, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, resolution=res, **block_kwargs)
                takes_skip += [False, False]
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, resample="up", resolution=res // 2,
                                                        **block_kwargs)
                takes_skip.append(False)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels[level]
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, resolution=res, **block_kwargs)
                takes_skip.append(True)
        self._takes_skip = tuple(takes_skip)
        self.out_norm = norm_layer(out_norm, cout, resolution=resolution)
        self.out_conv = conv2d(cout, in_channels, 3, zero_init=True)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                noise_labels2: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), noise_labels (B,) (c_noise), class_labels None | (B,) int | (B, label_dim),
        noise_labels2 (B,) (the second time, only with ``second_time``) -> (B, C, H, W).

        The result has x's dtype (float32 under autocast, whatever the compute dtype).
        """
        check_backbone_input(x, self.in_channels, self.resolution, noise_labels, noise_labels2, self.second_time)
        emb = self.map_layer0(self.map_noise(noise_labels.reshape(-1)))
        if self.second_time:
            emb = emb + self.map_layer0_2(self.map_noise2(noise_labels2.reshape(-1)))
        emb = self.map_layer1(F.silu(emb))
        labels = label_features(class_labels, self.label_dim, x.shape[0], self.label_dropout,
                                self.training, x.device)
        if labels is not None:
            emb = emb + self.map_label(labels)
        emb = F.silu(emb)

        skips = []
        h = x
        for block in self.enc.values():
            h = block(h, emb) if isinstance(block, UNetBlock) else block(h)
            skips.append(h)
        for block, takes_skip in zip(self.dec.values(), self._takes_skip):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        return self.out_conv(F.silu(self.out_norm(h))).to(x.dtype)


def _check_unet_args(resolution: int, channel_mult: tuple[int, ...], attn_resolutions: tuple[int, ...],
                     resolutions: list[int], dropout: float, label_dropout: float) -> None:
    if not channel_mult or min(channel_mult) < 1:
        raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {channel_mult!r}")
    if resolution < 1 or resolution % (1 << (len(channel_mult) - 1)):
        raise ValueError(f"resolution ({resolution}) must be divisible by 2^(len(channel_mult) - 1) = "
                         f"{1 << (len(channel_mult) - 1)}")
    unknown = sorted(set(attn_resolutions) - set(resolutions))
    if unknown:
        raise ValueError(f"attn_resolutions {unknown} are not resolutions of this UNet; allowed: {resolutions}")
    for name, p in (("dropout", dropout), ("label_dropout", label_dropout)):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {p}")

