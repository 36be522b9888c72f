"""Position information: learned 1-D, learned 3-D (t, h, w) and 3-D rotary.

Legend: S input length; d model width; D head dim; N heads; P slots (prefix and fixed slots:
start block, or BOV and middles); (t, h, w) latent coordinates of a video token.

Every module maps a window [start, start + S) of input positions to what the attention or
the embedding sum needs, so a KV-cached generator can ask for one block at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from nbp_mega.model.sequence import SequenceLayout


class LearnedPositions1D(nn.Module):
    """A table over the sequence index, as in the published checkpoints."""

    def __init__(self, max_positions: int, dim: int, init_std: float):
        super().__init__()
        self.table = nn.Parameter(torch.randn(max_positions, dim) * init_std)  # [Pmax, d]

    def forward(self, start: int, length: int) -> torch.Tensor:  # -> [S, d]
        return self.table[start : start + length]


class LearnedPositions3D(nn.Module):
    """A slot table for the prefix and fixed slots; t + h + w tables for video tokens."""

    def __init__(self, layout: SequenceLayout, dim: int, init_std: float):
        super().__init__()
        T, H, W = layout.blocks.grid
        self.slots = nn.Parameter(torch.randn(max(layout.num_slots, 1), dim) * init_std)
        self.t = nn.Parameter(torch.randn(T, dim) * init_std)
        self.h = nn.Parameter(torch.randn(H, dim) * init_std)
        self.w = nn.Parameter(torch.randn(W, dim) * init_std)
        self.register_buffer("slot_index", layout.slot_index.clone(), persistent=False)  # [S]
        self.register_buffer("coords", layout.input_coords.clamp(min=0), persistent=False)

    def forward(self, start: int, length: int) -> torch.Tensor:  # -> [S, d]
        slot = self.slot_index[start : start + length]
        c = self.coords[start : start + length]
        video = self.t[c[:, 0]] + self.h[c[:, 1]] + self.w[c[:, 2]]
        return torch.where(slot[:, None] >= 0, self.slots[slot.clamp(min=0)], video)


class Rotary3D(nn.Module):
    """Rotary embedding over three axes; the head dim's D/2 frequency pairs are split in
    three sections (t, h, w).

    Slots (prefix, start block) sit at (s, s, s) for slot index s; a video token at
    (P + t, P + h, P + w), so video positions never coincide with a slot's.
    """

    def __init__(self, layout: SequenceLayout, head_dim: int, theta: float):
        super().__init__()
        pairs = head_dim // 2
        sections = [pairs - 2 * (pairs // 3), pairs // 3, pairs // 3]  # t gets the remainder
        slot = layout.slot_index[:, None].expand(-1, 3)
        pos = torch.where(slot >= 0, slot, layout.input_coords + layout.num_slots).float()
        angles = []
        for axis, n in enumerate(sections):
            inv_freq = theta ** (-torch.arange(n, dtype=torch.float64) / max(n, 1))
            angles.append(pos[:, axis, None].double() * inv_freq)  # [S, n]
        angle = torch.cat(angles, dim=-1)  # [S, D/2]
        self.register_buffer("cos", angle.cos().float(), persistent=False)
        self.register_buffer("sin", angle.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate q or k [B, N, S, D] at input positions [start, start + S)."""
        S = x.shape[-2]
        cos = self.cos[start : start + S].to(x.dtype)  # [S, D/2]
        sin = self.sin[start : start + S].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
