"""Tokenizer training losses: LPIPS-style perceptual distance on VGG-16 features (weights from a
file the user gives; nothing is downloaded) and a 3D PatchGAN discriminator with hinge loss.

Legend: B batch; C channels; T frames; H, W pixels. Videos are [B, 3, T, H, W] in [-0.5, 0.5].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# VGG-16 "D" configuration: conv widths, M = 2x2 max-pool. Layer indices follow the usual
# `features.N` numbering so a standard vgg16 ImageNet state dict (e.g. vgg16-397923af.pth)
# loads as is.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # outputs after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class VGGPerceptualLoss(nn.Module):
    """Mean over taps of the squared distance of channel-normalised VGG-16 features (the
    LPIPS recipe with uniform channel weights), averaged over frames. Frozen."""

    def __init__(self, weights_path: str):
        super().__init__()
        layers, cin = [], 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
                cin = v
        self.features = nn.Sequential(*layers)
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if k.startswith("features.")}
        missing, _ = self.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"{weights_path} is not a VGG-16 state dict: missing {missing[:4]} "
                             f"(expected torchvision-style keys features.N.weight/bias)")
        self.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def _taps(self, x):
        x = ((x + 0.5) - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            if i == _TAPS[-1]:
                break
        return out

    def forward(self, x, y):  # [B, 3, T, H, W] each
        frames = lambda v: v.transpose(1, 2).flatten(0, 1)  # noqa: E731 - [B*T, 3, H, W]
        dist = [(a - b).pow(2).sum(1).mean() for a, b in
                zip(self._taps(frames(x)), self._taps(frames(y)), strict=True)]
        return torch.stack(dist).mean()


class PatchDiscriminator3D(nn.Module):
    """Real/fake logits per spatio-temporal patch: [B, 3, T, H, W] -> [B, 1, t', h', w']."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        mods, cin = [], 3
        for i in range(layers):
            cout = channels * 2**i
            stride = (1, 2, 2) if i == 0 else (2, 2, 2)
            mods += [nn.Conv3d(cin, cout, 4, stride=stride, padding=1),
                     nn.GroupNorm(min(32, cout // 4), cout) if i else nn.Identity(),
                     nn.LeakyReLU(0.2)]
            cin = cout
        mods.append(nn.Conv3d(cin, 1, 3, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, x):
        return self.net(x)


def hinge_d_loss(real_logits, fake_logits):
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def hinge_g_loss(fake_logits):
    return -fake_logits.mean()
