"""Exact block-causal attention in pure PyTorch, without a sequence x sequence mask.

Legend: B batch; N heads; Sq queries; Sk keys; D head dim; L block length; P prefix length;
R rows of a query chunk (at most MAX_MASKED_ROWS when a chunk needs a mask).

Queries are cut into chunks along block boundaries. All queries of one block see the same
key prefix, so a chunk of one block (or of the prefix) is one unmasked
scaled_dot_product_attention over keys [0, end). Small blocks (L < MAX_MASKED_ROWS) are grouped
so that NTP (L = 1) is not S separate calls; such a chunk carries a small [R, end] mask, R <=
MAX_MASKED_ROWS. Work above the block diagonal is skipped except inside grouped chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nbp_mega.ops.reference import visible_key_end

MAX_MASKED_ROWS = 64  # rows of a grouped chunk: bounds its mask to [64, Sk]


@dataclass(frozen=True)
class Chunk:
    start: int  # first query row (relative to q)
    stop: int  # one past the last query row
    key_end: int  # keys [0, key_end) are read
    masked: bool  # rows see different key prefixes: needs a [rows, key_end] mask


def plan_chunks(sq: int, sk: int, block_len: int, prefix_len: int, q_offset: int) -> list[Chunk]:
    """The query chunks, in order, covering rows [0, Sq)."""
    ends = visible_key_end(torch.arange(q_offset, q_offset + sq), block_len,
                           prefix_len).clamp(max=sk).tolist()
    chunks, row = [], 0
    while row < sq:
        stop = row + 1
        while stop < sq and ends[stop] == ends[row]:  # the rest of this block (or prefix)
            stop += 1
        is_prefix = q_offset + row < prefix_len
        if not is_prefix and stop - row < MAX_MASKED_ROWS:
            # group following blocks while the chunk stays small
            while stop < sq and q_offset + stop >= prefix_len:
                nxt = stop + 1
                while nxt < sq and ends[nxt] == ends[stop]:
                    nxt += 1
                if nxt - row > MAX_MASKED_ROWS:
                    break
                stop = nxt
        chunks.append(Chunk(row, stop, ends[stop - 1], ends[row] != ends[stop - 1]))
        row = stop
    return chunks


def block_loop_attention(q, k, v, block_len: int, prefix_len: int = 0, q_offset: int = 0, *,
                         scale: float | None = None):
    """q [B, N, Sq, D], k/v [B, N, Sk, D] -> [B, N, Sq, D], exact block-causal attention."""
    outs = []
    for c in plan_chunks(q.shape[-2], k.shape[-2], block_len, prefix_len, q_offset):
        mask = None
        if c.masked:
            positions = torch.arange(q_offset + c.start, q_offset + c.stop, device=q.device)
            ends = visible_key_end(positions, block_len, prefix_len)  # [R]
            mask = torch.arange(c.key_end, device=q.device)[None, :] < ends[:, None]
        outs.append(F.scaled_dot_product_attention(
            q[:, :, c.start : c.stop], k[:, :, : c.key_end], v[:, :, : c.key_end],
            attn_mask=mask, scale=scale))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
