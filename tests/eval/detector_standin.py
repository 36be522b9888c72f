"""A TorchScript stand-in for StyleGAN-V's I3D: its call convention, a fixed random linear map.

Features are linear in the pixels (each frame average-pooled to 4x4, then one matrix), so
shifting every pixel by c moves every feature vector by the same known offset: the FVD of a set
against itself shifted is that offset's squared norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WIDTH = 400  # the Kinetics-400 I3D's feature width


class StandIn(torch.nn.Module):
    def __init__(self, frames: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Parameter(torch.randn(3 * frames * 16, WIDTH, generator=g) / 8)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        B, C, T, H, W = x.shape
        pooled = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(B * T, C, H, W), 4)
        return pooled.reshape(B, -1) @ self.proj

    def offset(self, shift: float) -> torch.Tensor:
        """The feature offset [400] of adding `shift` to every input value."""
        return shift * self.proj.sum(dim=0)


def write_standin(path, frames: int = 16, seed: int = 0) -> StandIn:
    module = StandIn(frames, seed)
    torch.jit.script(module).save(str(path))
    return module
