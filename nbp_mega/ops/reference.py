"""Block-causal attention, the specification: a dense mask and one SDPA call.

Legend: B batch; N heads; Sq queries; Sk keys; D head dim; L block length; P prefix length.

Query i sits at absolute position p = q_offset + i of the key sequence. It sees key j iff
    p <  P:  j < P                              (the prefix: bidirectional, nothing after it)
    p >= P:  j < P + ((p - P) // L + 1) * L     (its whole block and everything before it)
L = 1, P = 0 is causal attention. This is what the paper's reference code computes (it builds
the dense mask); here it is the test oracle and a benchmark baseline, never the training path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def visible_key_end(positions: torch.Tensor, block_len: int, prefix_len: int) -> torch.Tensor:
    """Exclusive end of the visible key range for each absolute query position."""
    block_end = prefix_len + ((positions - prefix_len) // block_len + 1) * block_len
    return torch.where(positions < prefix_len, torch.full_like(positions, prefix_len), block_end)


def block_causal_mask(sq: int, sk: int, block_len: int, prefix_len: int = 0, q_offset: int = 0,
                      device=None) -> torch.Tensor:
    """[Sq, Sk] bool, True where query i may attend to key j."""
    positions = torch.arange(q_offset, q_offset + sq, device=device)
    ends = visible_key_end(positions, block_len, prefix_len)  # [Sq]
    return torch.arange(sk, device=device)[None, :] < ends[:, None]


def dense_block_causal_attention(q, k, v, block_len: int, prefix_len: int = 0,
                                 q_offset: int = 0, *, scale: float | None = None):
    """q [B, N, Sq, D], k/v [B, N, Sk, D] -> [B, N, Sq, D] through a dense [Sq, Sk] mask."""
    mask = block_causal_mask(q.shape[-2], k.shape[-2], block_len, prefix_len, q_offset,
                             device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def dense_attention_with_lse(q, k, v, block_len: int, prefix_len: int = 0, q_offset: int = 0,
                             *, scale: float | None = None):
    """(out [B, N, Sq, D], lse [B, N, Sq]) by explicit masked scores: the oracle of the fused
    kernel's log-sum-exp, lse = log sum_{j visible} exp(scale * q.k_j), in fp32 (fp64 for
    fp64 inputs)."""
    mask = block_causal_mask(q.shape[-2], k.shape[-2], block_len, prefix_len, q_offset,
                             device=q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q @ k.transpose(-1, -2)).to(acc_dtype) * scale  # [B, N, Sq, Sk]
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = (torch.exp(scores - lse[..., None]).to(v.dtype) @ v)
    return out, lse
