"""Block shapes and token order: how a latent grid becomes a sequence of blocks.

Legend: T, H, W latent grid; bt, bh, bw block shape; L = bt*bh*bw tokens per block;
Nv = T*H*W video tokens; nb = Nv / L blocks; B batch.

The grid is cut into equal blocks of shape (bt, bh, bw), which must tile it. Blocks are
ordered raster-wise over the block grid (t, then h, then w) and tokens inside a block raster-
wise too, so each block is contiguous in the sequence. Row blocks (1x1xW) keep the plain
raster order of the paper's code; non-raster shapes (1x4x4, 2x1x8, 2x2x2) reorder tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from nbp_mega.config_fields import ConfigError


@dataclass(frozen=True)
class BlockLayout:
    grid: tuple[int, int, int]  # latent (T, H, W)
    block: tuple[int, int, int]  # block (bt, bh, bw)

    def __post_init__(self):
        for name, value in (("model.grid", self.grid), ("model.block_shape", self.block)):
            if len(value) != 3 or any(int(v) < 1 for v in value):
                raise ConfigError(f"{name}={list(value)}: expected 3 positive ints (T, H, W)")
        if any(g % b for g, b in zip(self.grid, self.block, strict=True)):
            raise ConfigError(
                f"model.block_shape={list(self.block)} does not tile model.grid="
                f"{list(self.grid)}: each block dimension must divide the grid dimension")

    @property
    def block_len(self) -> int:
        return math.prod(self.block)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def num_blocks(self) -> int:
        return self.num_tokens // self.block_len

    @cached_property
    def coords(self) -> torch.Tensor:
        """[Nv, 3] (t, h, w) of the token at each position of the block order."""
        (T, H, W), (bt, bh, bw) = self.grid, self.block
        t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W),
                                 indexing="ij")
        grid = torch.stack([t, h, w], dim=-1)  # [T, H, W, 3]
        # [T/bt, bt, H/bh, bh, W/bw, bw, 3] -> block index dims first, in-block dims last
        grid = grid.view(T // bt, bt, H // bh, bh, W // bw, bw, 3)
        return grid.permute(0, 2, 4, 1, 3, 5, 6).reshape(-1, 3).contiguous()

    @cached_property
    def order(self) -> torch.Tensor:
        """[Nv] raster index (t*H*W + h*W + w) of the token at each block-order position."""
        _, H, W = self.grid
        c = self.coords
        return (c[:, 0] * H * W + c[:, 1] * W + c[:, 2]).contiguous()

    def to_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, H, W] grid -> [B, Nv] sequence in block order."""
        return tokens.flatten(1)[:, self.order.to(tokens.device)]

    def from_blocks(self, seq: torch.Tensor) -> torch.Tensor:
        """[B, Nv] block order -> [B, T, H, W] grid (inverse of `to_blocks`)."""
        out = torch.empty_like(seq)
        out[:, self.order.to(seq.device)] = seq
        return out.view(seq.shape[0], *self.grid)
