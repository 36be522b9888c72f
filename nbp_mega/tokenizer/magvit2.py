"""The causal 3D-CNN video autoencoder of the published NBP tokenizer (MAGVIT-v2 style).

Legend: B batch; C channels; T, H, W frames/height/width; t, h, w latent grid.

Module and attribute names follow the published state dict exactly
(../shared/reference/nbp_magvit2.md): `encoder_layers.N`, `decoder_layers.N`, `.conv`, `.fn`,
`.residual_fn`, `.beta`. The layer list is generated from a `Magvit2Config`: the published
model is one preset, smaller presets change widths and depths, the code path is the same.

Streaming: the network is causal in time (CausalConv3d pads in front only, GroupNorm3D and
Swish act per frame, Depth2Space3D drops leading frames once), so a long clip can go through
in time chunks with the same result as in one piece, if every CausalConv3d carries the tail of
its padded input from chunk to chunk. `Magvit2.streaming()` switches that on for one clip:

    with model.streaming():             # one clip; leaving the block forgets it
        parts = [model.encode(chunk)[1] for chunk in video.split(sizes, dim=2)]
    indices = torch.cat(parts, dim=1)   # == model.encode(video)[1]

Any split works (a chunk may even complete no output window: it then yields 0 frames); the
carried state lives in plain attributes, so the state dict is unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nbp_mega.tokenizer.fsq import FSQ

NORMS = ("group", "none")


@dataclass(frozen=True)
class Magvit2Config:
    channels: tuple[int, ...] = (128, 256, 256, 512)  # encoder stage widths
    res_units: tuple[int, ...] = (4, 4, 4, 8)  # residual units per encoder stage
    # Stride of the downsampling conv after stage i (the decoder mirrors them).
    strides: tuple[tuple[int, int, int], ...] = ((1, 2, 2), (2, 2, 2), (2, 2, 2))
    levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)  # FSQ levels: the code dimension is their count
    norm_groups: int = 32
    # "group": GroupNorm of each frame (published); "none": no normalisation, and residual
    # branches start at 0.
    # Per-frame GroupNorm removes each frame's mean colour and contrast per group; small models
    # trained from scratch in minutes learn much faster without it (.notes/tokenizer_quality.md).
    norm: str = "group"

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"tokenizer config: norm={self.norm!r}, expected one of "
                             f"{sorted(NORMS)}")
        if len(self.channels) != len(self.res_units) or len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"tokenizer config: {len(self.channels)} channel widths need as "
                             f"many res_units and one stride fewer, got {self.res_units}, "
                             f"{self.strides}")
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad and self.norm == "group":
            raise ValueError(f"tokenizer config: widths {bad} are not multiples of norm_groups="
                             f"{self.norm_groups}")

    @property
    def downsample(self) -> tuple[int, int, int]:
        return tuple(math.prod(s[i] for s in self.strides) for i in range(3))


# Trained from scratch in minutes: no normalisation (see Magvit2Config.norm); norm_groups is
# what `norm="group"` on these widths uses.
_TINY = Magvit2Config(channels=(16, 32, 32, 32), res_units=(1, 1, 1, 1), norm_groups=8,
                      norm="none")
PRESETS = {
    "nbp-magvit2": Magvit2Config(),
    "tiny": _TINY,
    # tiny with 4x4-pixel tokens (downsample (4, 4, 4), 4x the tokens of a clip): the preset to
    # train on a CPU. configs/tokenizer/tiny_s4.yaml (3000 steps, ~16 min on 2 cores) decodes
    # the synthetic squares recognisably; tiny's 8x8-pixel tokens leave smudges (README).
    "tiny-s4": dataclasses.replace(_TINY, strides=((1, 2, 2), (2, 1, 1), (2, 2, 2))),
}


def _no_frames(conv: nn.Conv3d, x: torch.Tensor, pad_h: int = 0, pad_w: int = 0):
    """The empty output [B, cout, 0, h', w'] of `conv` (no padding of its own) for x [B, C, T,
    H, W] padded by pad_h, pad_w more: a chunk too short to complete an output window gives no
    frames, and nn.Conv3d refuses an input shorter than its kernel."""
    (_, kh, kw), (_, sh, sw) = conv.kernel_size, conv.stride
    h, w = (x.shape[3] + pad_h - kh) // sh + 1, (x.shape[4] + pad_w - kw) // sw + 1
    return x.new_empty(x.shape[0], conv.out_channels, 0, h, w)


@dataclass
class _Carry:
    """What a streaming CausalConv3d keeps between the time chunks of one clip."""
    # Frames of the padded input stream [B, C, k, H+2ph, W+2pw] not yet covered by a complete
    # output window; None until the first frame arrived (the front padding is still due).
    tail: torch.Tensor | None = None
    skip: int = 0  # frames of the next chunks to skip (only when stride_t > kernel_t)


class CausalConv3d(nn.Module):
    """Conv3d over a replicate-padded input: 2*(kt//2) frames in front only, kh//2 and kw//2 on
    both spatial sides. Frame k of the output sees input frames <= k*stride_t."""

    def __init__(self, cin: int, cout: int, kernel=(3, 3, 3), stride=(1, 1, 1)):
        super().__init__()
        kt, kh, kw = kernel
        self.pad = (kw // 2, kw // 2, kh // 2, kh // 2, 2 * (kt // 2), 0)
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride)
        self._carry: _Carry | None = None  # not None only inside Magvit2.streaming()

    def forward(self, x):  # [B, C, T, H, W]
        if self._carry is not None:
            return self._forward_chunk(x, self._carry)
        if any(self.pad):
            x = F.pad(x, self.pad, mode="replicate")
        return self.conv(x)

    def start_stream(self) -> None:
        self._carry = _Carry()

    def stop_stream(self) -> None:
        self._carry = None

    def _forward_chunk(self, x, carry: _Carry):  # x [B, C, T', H, W]: the clip's next frames
        kt, st = self.conv.kernel_size[0], self.conv.stride[0]
        pw, _, ph, _, pt, _ = self.pad
        if x.shape[2] == 0:
            return _no_frames(self.conv, x, 2 * ph, 2 * pw)
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph, 0, 0), mode="replicate")
        if carry.tail is None:  # the clip's first frame: the front padding, once
            x = torch.cat([x[:, :, :1].expand(-1, -1, pt, -1, -1), x], dim=2)
        else:
            x = torch.cat([carry.tail, x], dim=2)
        skipped = min(carry.skip, x.shape[2])
        x, carry.skip = x[:, :, skipped:], carry.skip - skipped
        windows = max(0, (x.shape[2] - kt) // st + 1)  # complete output windows in x
        used = windows * st  # where the next window starts, relative to x
        carry.tail = x[:, :, used:].clone()  # a copy: a view would keep all of x alive
        carry.skip += max(0, used - x.shape[2])
        return self.conv(x) if windows else _no_frames(self.conv, x)


class FrameConv3d(nn.Conv3d):
    """nn.Conv3d (same state-dict keys) that also takes a chunk of 0 frames, as streaming can
    produce; used for the encoder's last 1x1x1 conv."""

    def forward(self, x):  # [B, C, T, H, W]
        return super().forward(x) if x.shape[2] else _no_frames(self, x)


class GroupNorm3D(nn.GroupNorm):
    """GroupNorm of every frame on its own (time folded into the batch)."""

    def forward(self, x):  # [B, C, T, H, W]
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


def _norm(cfg: Magvit2Config, channels: int) -> nn.Module:
    if cfg.norm == "group":
        return GroupNorm3D(cfg.norm_groups, channels)
    return nn.Identity()


class Swish(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(1, channels, 1, 1, 1))

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


class ResidualUnit(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: Magvit2Config):
        super().__init__()
        self.fn = nn.Sequential(_norm(cfg, cin), Swish(cin), CausalConv3d(cin, cout),
                                _norm(cfg, cout), Swish(cout), CausalConv3d(cout, cout))
        if cin != cout:
            self.residual_fn = nn.Sequential(CausalConv3d(cin, cout, kernel=(1, 1, 1)))

    def forward(self, x):
        residual = self.residual_fn(x) if hasattr(self, "residual_fn") else x
        return self.fn(x) + residual


class Depth2Space3D(nn.Module):
    """[B, bt*bh*bw*C, t, h, w] (channels ordered bt, bh, bw, C) -> [B, C, t*bt - (bt-1), h*bh,
    w*bw]: the first bt-1 frames are dropped (causal upsampling: 1+n frames -> 1+bt*n).
    Streaming, only the clip's first bt-1 frames are dropped, whichever chunks they are in."""

    def __init__(self, bt: int, bh: int, bw: int):
        super().__init__()
        self.factors = (bt, bh, bw)
        self._to_drop: int | None = None  # streaming: leading frames of the clip still to drop

    def start_stream(self) -> None:
        self._to_drop = self.factors[0] - 1

    def stop_stream(self) -> None:
        self._to_drop = None

    def forward(self, x):
        bt, bh, bw = self.factors
        b, c, t, h, w = x.shape
        c_out = c // (bt * bh * bw)
        x = x.view(b, bt, bh, bw, c_out, t, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)
        x = x.reshape(b, c_out, t * bt, h * bh, w * bw)
        if self._to_drop is None:
            return x[:, :, bt - 1:]
        drop = min(self._to_drop, x.shape[2])
        self._to_drop -= drop
        return x[:, :, drop:]


def _stage(cin: int, cout: int, units: int, cfg: Magvit2Config) -> list[nn.Module]:
    return [ResidualUnit(cin if i == 0 else cout, cout, cfg) for i in range(units)]


def build_encoder(cfg: Magvit2Config) -> nn.Sequential:
    c0 = cfg.channels[0]
    layers: list[nn.Module] = [CausalConv3d(3, c0)]
    cin = c0
    for i, (c, units) in enumerate(zip(cfg.channels, cfg.res_units, strict=True)):
        layers += _stage(cin, c, units, cfg)
        cin = c
        if i < len(cfg.strides):
            layers.append(CausalConv3d(c, c, stride=cfg.strides[i]))
    layers += [_norm(cfg, cin), Swish(cin), FrameConv3d(cin, len(cfg.levels), 1)]
    return nn.Sequential(*layers)


def build_decoder(cfg: Magvit2Config) -> nn.Sequential:
    channels, units = cfg.channels[::-1], cfg.res_units[::-1]
    strides = cfg.strides[::-1]
    layers: list[nn.Module] = [CausalConv3d(len(cfg.levels), channels[0])]
    cin = channels[0]
    for i, (c, n) in enumerate(zip(channels, units, strict=True)):
        layers += _stage(cin, c, n, cfg)
        cin = c
        if i < len(strides):
            layers += [CausalConv3d(c, c * math.prod(strides[i])), Depth2Space3D(*strides[i])]
    layers += [_norm(cfg, cin), Swish(cin), CausalConv3d(cin, 3)]
    return nn.Sequential(*layers)


def _dtype(stack: nn.Module) -> torch.dtype:
    return next(stack.parameters()).dtype


class Magvit2(nn.Module):
    """video [B, 3, T, H, W] in [-0.5, 0.5] <-> FSQ codes [B, t, h, w]."""

    def __init__(self, cfg: Magvit2Config):
        super().__init__()
        self.cfg = cfg
        self.encoder_layers = build_encoder(cfg)
        self.decoder_layers = build_decoder(cfg)
        self.quantizer = FSQ(cfg.levels)
        self._streaming = False  # inside streaming(): layers carry state between calls
        if cfg.norm == "none":
            self._init_without_norm()

    @torch.no_grad()
    def _init_without_norm(self) -> None:
        """Without normalisation nothing rescales the activations, so the init must:
        - every conv gets weights of std 1/sqrt(fan_in) and zero bias (variance preserving; the
          PyTorch default shrinks the variance ~3x per conv, so after the ~10 convs of the
          trunk the codes hardly depend on the input and training starts from a decoder that
          ignores them: 17.5 vs. 20.1 dB after 600 steps, .notes/tokenizer_quality.md);
        - every residual unit starts as the identity (its branch's last conv at zero, as in
          SkipInit/Fixup): the sum of unnormalised branches would grow the activations layer by
          layer. Loading weights overrides both."""
        for conv in self.modules():
            if isinstance(conv, nn.Conv3d):
                nn.init.normal_(conv.weight, std=conv.weight[0].numel() ** -0.5)
                nn.init.zeros_(conv.bias)
        for unit in self.modules():
            if isinstance(unit, ResidualUnit):
                last = unit.fn[-1].conv
                last.weight.zero_()
                last.bias.zero_()

    def encode(self, video):
        """-> (normalised codes [B, C, t, h, w], indices [B, t, h, w]).

        The conv stack runs in its weights' dtype (see `cast_layers`); FSQ always in fp32: a
        bf16 bound would move values across rounding boundaries.
        """
        z = self.encoder_layers(video.to(_dtype(self.encoder_layers)))
        return self.quantizer(z.float())

    def decode_codes(self, codes):
        """codes [B, C, t, h, w] -> video [B, 3, T, H, W] in the decoder's weights' dtype."""
        return self.decoder_layers(codes.to(_dtype(self.decoder_layers)))

    def forward(self, video):
        """Reconstruction [B, 3, T, H, W] and indices (training: straight-through FSQ)."""
        codes, indices = self.encode(video)
        return self.decode_codes(codes), indices

    def cast_layers(self, dtype: torch.dtype) -> Magvit2:
        """Cast the encoder and decoder weights to `dtype` (e.g. bf16 for inference); the FSQ
        buffers keep fp32, so quantisation stays exact."""
        self.encoder_layers.to(dtype)
        self.decoder_layers.to(dtype)
        return self

    @contextmanager
    def streaming(self) -> Iterator[Magvit2]:
        """Inside the block, successive calls of encode / decode_codes (or of the layer stacks)
        take successive time chunks of ONE clip (batch fixed); their outputs concatenated over
        time equal the one-piece result. Leaving the block forgets the clip."""
        if self._streaming:
            raise RuntimeError("Magvit2.streaming() is already active: it streams one clip at "
                               "a time; leave the open block first")
        layers = [m for m in self.modules() if isinstance(m, (CausalConv3d, Depth2Space3D))]
        for m in layers:
            m.start_stream()
        self._streaming = True
        try:
            yield self
        finally:
            self._streaming = False
            for m in layers:
                m.stop_stream()
