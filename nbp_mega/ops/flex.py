"""Block-causal attention through FlexAttention: the GPU path where the fused CUDA kernel is
absent or does not apply (fp32, head dim > 128).

Legend: B batch; N heads; Sq queries; Sk keys; D head dim; L block length; P prefix length.

The mask is given as a predicate (`mask_mod`) from which FlexAttention builds a block-sparse
map and skips the tiles above the block diagonal. It needs torch.compile to be fast and has no
CPU backward, so the dispatch uses it on CUDA only (the CPU forward runs in eager mode, which
is how the tests check the predicate).
"""

from __future__ import annotations

import functools

import torch

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    create_block_mask = flex_attention = None

AVAILABLE = flex_attention is not None


def block_causal_mask_mod(block_len: int, prefix_len: int, q_offset: int):
    """The predicate of nbp_mega.ops.reference.visible_key_end, in FlexAttention's form."""

    def mask_mod(b, h, q_idx, kv_idx):
        p = q_idx + q_offset
        block_end = prefix_len + ((p - prefix_len) // block_len + 1) * block_len
        return kv_idx < torch.where(p < prefix_len, prefix_len, block_end)

    return mask_mod


@functools.lru_cache(maxsize=64)
def _block_mask(sq: int, sk: int, block_len: int, prefix_len: int, q_offset: int, device: str):
    mask_mod = block_causal_mask_mod(block_len, prefix_len, q_offset)
    return create_block_mask(mask_mod, None, None, sq, sk, device=device)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def flex_block_causal_attention(q, k, v, block_len: int, prefix_len: int = 0,
                                q_offset: int = 0, *, scale: float | None = None):
    """q [B, N, Sq, D], k/v [B, N, Sk, D] -> [B, N, Sq, D] (compiled on CUDA, eager on CPU)."""
    if not AVAILABLE:
        raise RuntimeError(f"FlexAttention needs torch >= 2.5, this is {torch.__version__}")
    mask = _block_mask(q.shape[-2], k.shape[-2], block_len, prefix_len, q_offset, str(q.device))
    fn = _compiled_flex() if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=mask, scale=scale)
