"""The causal 3D-CNN video autoencoder of the published NBP tokenizer (MAGVIT-v2 style).

Legend: B batch; C channels; T, H, W frames/height/width; t, h, w latent grid.

Module and attribute names follow the published state dict exactly
(../shared/reference/nbp_magvit2.md): `encoder_layers.N`, `decoder_layers.N`, `.conv`, `.fn`,
`.residual_fn`, `.beta`. The layer list is generated from a `Magvit2Config`: the published
model is one preset, smaller presets change widths and depths, the code path is the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nbp_mega.tokenizer.fsq import FSQ


@dataclass(frozen=True)
class Magvit2Config:
    channels: tuple[int, ...] = (128, 256, 256, 512)  # encoder stage widths
    res_units: tuple[int, ...] = (4, 4, 4, 8)  # residual units per encoder stage
    # Stride of the downsampling conv after stage i (the decoder mirrors them).
    strides: tuple[tuple[int, int, int], ...] = ((1, 2, 2), (2, 2, 2), (2, 2, 2))
    levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)  # FSQ levels: the code dimension is their count
    norm_groups: int = 32

    def __post_init__(self):
        if len(self.channels) != len(self.res_units) or len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"tokenizer config: {len(self.channels)} channel widths need as "
                             f"many res_units and one stride fewer, got {self.res_units}, "
                             f"{self.strides}")
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise ValueError(f"tokenizer config: widths {bad} are not multiples of norm_groups="
                             f"{self.norm_groups}")

    @property
    def downsample(self) -> tuple[int, int, int]:
        return tuple(math.prod(s[i] for s in self.strides) for i in range(3))


PRESETS = {
    "nbp-magvit2": Magvit2Config(),
    "tiny": Magvit2Config(channels=(16, 32, 32, 32), res_units=(1, 1, 1, 1), norm_groups=8),
}


class CausalConv3d(nn.Module):
    """Conv3d over a replicate-padded input: 2*(kt//2) frames in front only, kh//2 and kw//2 on
    both spatial sides. Frame k of the output sees input frames <= k*stride_t."""

    def __init__(self, cin: int, cout: int, kernel=(3, 3, 3), stride=(1, 1, 1)):
        super().__init__()
        kt, kh, kw = kernel
        self.pad = (kw // 2, kw // 2, kh // 2, kh // 2, 2 * (kt // 2), 0)
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride)

    def forward(self, x):  # [B, C, T, H, W]
        if any(self.pad):
            x = F.pad(x, self.pad, mode="replicate")
        return self.conv(x)


class GroupNorm3D(nn.GroupNorm):
    """GroupNorm of every frame on its own (time folded into the batch)."""

    def forward(self, x):  # [B, C, T, H, W]
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


class Swish(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(1, channels, 1, 1, 1))

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


class ResidualUnit(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.fn = nn.Sequential(GroupNorm3D(groups, cin), Swish(cin), CausalConv3d(cin, cout),
                                GroupNorm3D(groups, cout), Swish(cout), CausalConv3d(cout, cout))
        if cin != cout:
            self.residual_fn = nn.Sequential(CausalConv3d(cin, cout, kernel=(1, 1, 1)))

    def forward(self, x):
        residual = self.residual_fn(x) if hasattr(self, "residual_fn") else x
        return self.fn(x) + residual


class Depth2Space3D(nn.Module):
    """[B, bt*bh*bw*C, t, h, w] (channels ordered bt, bh, bw, C) -> [B, C, t*bt - (bt-1), h*bh,
    w*bw]: the first bt-1 frames are dropped (causal upsampling: 1+n frames -> 1+bt*n)."""

    def __init__(self, bt: int, bh: int, bw: int):
        super().__init__()
        self.factors = (bt, bh, bw)

    def forward(self, x):
        bt, bh, bw = self.factors
        b, c, t, h, w = x.shape
        c_out = c // (bt * bh * bw)
        x = x.view(b, bt, bh, bw, c_out, t, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)
        return x.reshape(b, c_out, t * bt, h * bh, w * bw)[:, :, bt - 1:]


def _stage(cin: int, cout: int, units: int, groups: int) -> list[nn.Module]:
    return [ResidualUnit(cin if i == 0 else cout, cout, groups) for i in range(units)]


def build_encoder(cfg: Magvit2Config) -> nn.Sequential:
    c0, g = cfg.channels[0], cfg.norm_groups
    layers: list[nn.Module] = [CausalConv3d(3, c0)]
    cin = c0
    for i, (c, units) in enumerate(zip(cfg.channels, cfg.res_units, strict=True)):
        layers += _stage(cin, c, units, g)
        cin = c
        if i < len(cfg.strides):
            layers.append(CausalConv3d(c, c, stride=cfg.strides[i]))
    layers += [GroupNorm3D(g, cin), Swish(cin), nn.Conv3d(cin, len(cfg.levels), 1)]
    return nn.Sequential(*layers)


def build_decoder(cfg: Magvit2Config) -> nn.Sequential:
    channels, units = cfg.channels[::-1], cfg.res_units[::-1]
    strides, g = cfg.strides[::-1], cfg.norm_groups
    layers: list[nn.Module] = [CausalConv3d(len(cfg.levels), channels[0])]
    cin = channels[0]
    for i, (c, n) in enumerate(zip(channels, units, strict=True)):
        layers += _stage(cin, c, n, g)
        cin = c
        if i < len(strides):
            layers += [CausalConv3d(c, c * math.prod(strides[i])), Depth2Space3D(*strides[i])]
    layers += [GroupNorm3D(g, cin), Swish(cin), CausalConv3d(cin, 3)]
    return nn.Sequential(*layers)


class Magvit2(nn.Module):
    """video [B, 3, T, H, W] in [-0.5, 0.5] <-> FSQ codes [B, t, h, w]."""

    def __init__(self, cfg: Magvit2Config):
        super().__init__()
        self.cfg = cfg
        self.encoder_layers = build_encoder(cfg)
        self.decoder_layers = build_decoder(cfg)
        self.quantizer = FSQ(cfg.levels)

    def encode(self, video):
        """-> (normalised codes [B, C, t, h, w], indices [B, t, h, w])."""
        return self.quantizer(self.encoder_layers(video))

    def decode_codes(self, codes):
        return self.decoder_layers(codes)

    def forward(self, video):
        """Reconstruction [B, 3, T, H, W] and indices (training: straight-through FSQ)."""
        codes, indices = self.encode(video)
        return self.decode_codes(codes), indices
