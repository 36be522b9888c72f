"""Finite scalar quantisation (FSQ) as the published NBP tokenizer does it.

Legend: B batch; C = len(levels) code channels (6); t, h, w latent grid; K codebook size.

Channel i with l_i levels is bounded to l_i values around 0 and rounded:
    half = (l-1)(1-1e-3)/2;  offset = 0.5 if l even else 0;  shift = tan(offset/half)
    bounded = tanh(z + shift) * half - offset;  q = round(bounded)  in [-(l//2), l - 1 - l//2]
(tan, not atanh, as published). Digits d_i = q_i + l_i//2 in [0, l_i) form the code index
sum d_i * basis_i with basis = cumulative product of the levels (first 1). The decoder reads the
normalised values q_i / (l_i//2).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FSQ(nn.Module):
    def __init__(self, levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)):
        super().__init__()
        if not levels or any(int(lv) < 2 for lv in levels):
            raise ValueError(f"FSQ levels must be integers >= 2, got {levels}")
        self.levels = tuple(int(lv) for lv in levels)
        lv = torch.tensor(self.levels, dtype=torch.float64)
        half = (lv - 1) * (1 - 1e-3) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0)
        basis = torch.cumprod(torch.tensor((1, *self.levels[:-1]), dtype=torch.int64), 0)
        # Buffers are not in the published state dict: persistent=False.
        self.register_buffer("_half", half.float().view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("_offset", offset.float().view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("_shift", torch.tan(offset / half).float().view(1, -1, 1, 1, 1),
                             persistent=False)
        self.register_buffer("_center", (lv // 2).long().view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("_basis", basis.view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("_levels", lv.long().view(1, -1, 1, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, C, t, h, w] -> bounded values, same shape (before rounding)."""
        return torch.tanh(z + self._shift) * self._half - self._offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [B, C, t, h, w] -> (normalised codes [B, C, t, h, w], indices [B, t, h, w]).

        Rounding is straight-through: gradients flow to z as if it were the identity.
        """
        bounded = self.bound(z.float())
        q = bounded + (torch.round(bounded) - bounded).detach()
        digits = torch.round(bounded).long() + self._center
        indices = (digits * self._basis).sum(dim=1)
        return q / self._center, indices

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B, t, h, w] in [0, K) -> normalised codes [B, C, t, h, w]."""
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise TypeError(f"token indices must be integers, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"token indices must lie in [0, {self.codebook_size}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        digits = (indices.long().unsqueeze(1) // self._basis) % self._levels
        return (digits - self._center).float() / self._center
