"""Inputs and comparisons shared by the attention tests.

Legend: B batch; N heads; S (Sq, Sk) sequence; D head dim; L block length; P prefix length.
"""

from __future__ import annotations

import torch

from nbp_mega.ops.reference import dense_block_causal_attention


def qkv(S, dtype=torch.float32, sq=None, B=2, N=3, D=16, seed=0):
    """q [B, N, Sq, D] (Sq = sq, default S), k and v [B, N, S, D], leaves requiring grad."""
    g = torch.Generator().manual_seed(seed)
    make = lambda s: torch.randn(B, N, s, D, generator=g, dtype=torch.float64)  # noqa: E731
    return [t.to(dtype).requires_grad_() for t in (make(S if sq is None else sq), make(S), make(S))]


def forward_backward(fn, q, k, v, *args, **kwargs):
    """fn's output and the gradients of q, k, v for a fixed random upstream gradient."""
    out = fn(q, k, v, *args, **kwargs)
    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    return out, grads


def errors_vs_fp64(fn, dtype, S, L, P, q_offset=0, device="cpu", **shape):
    """Max abs error of fn's output and q, k, v gradients in `dtype` on `device` against the
    fp64 dense reference (on the CPU) on the same inputs (before rounding to dtype)."""
    q64, k64, v64 = qkv(S, torch.float64, **shape)
    exact = forward_backward(dense_block_causal_attention, q64, k64, v64, L, P, q_offset)
    q, k, v = (t.detach().to(device, dtype).requires_grad_() for t in (q64, k64, v64))
    got = forward_backward(fn, q, k, v, L, P, q_offset)
    return [(a.double().cpu() - b).abs().max().item()
            for a, b in zip((got[0], *got[1]), (exact[0], *exact[1]), strict=True)]
