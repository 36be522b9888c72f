"""Kernels behind one public function: `block_causal_attention`.

Legend: B batch; N heads; Sq queries; Sk keys; D head dim; L block length; P prefix length.

The implementation is chosen once at import (logged), overridable by the environment variable
NBP_ATTENTION_IMPL or, in tests, by `set_attention_impl` / `use_attention_impl`:
    block_loop  exact pure PyTorch, no Sq x Sk mask (every device; the default today)
    dense       dense mask + one SDPA call: the reference; O(S^2) memory (tests, benchmarks)
The kernels issue adds fused C++/CUDA implementations here, each entry with its constraints.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from nbp_mega.ops.block_loop import block_loop_attention
from nbp_mega.ops.reference import dense_block_causal_attention

log = logging.getLogger("nbp_mega.ops")

IMPLEMENTATIONS = {
    "block_loop": block_loop_attention,
    "dense": dense_block_causal_attention,
}
_current = None


def _check_name(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; valid: "
                         f"{', '.join(IMPLEMENTATIONS)}")
    return name


def _select() -> str:
    name = os.environ.get("NBP_ATTENTION_IMPL", "").strip()
    if name:
        return _check_name(name)
    return "block_loop"


def set_attention_impl(name: str) -> None:
    global _current
    _current = _check_name(name)
    log.info("block-causal attention: %s", _current)


def attention_impl() -> str:
    return _current


@contextlib.contextmanager
def use_attention_impl(name: str):
    previous = _current
    set_attention_impl(name)
    try:
        yield
    finally:
        set_attention_impl(previous)


def _validate(q, k, v, block_len: int, prefix_len: int, q_offset: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, N, S, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)}/{tuple(v.shape)} must "
                         "agree in B, N and D (k and v in everything)")
    if block_len < 1 or prefix_len < 0 or q_offset < 0:
        raise ValueError(f"need block_len >= 1, prefix_len >= 0, q_offset >= 0; got "
                         f"{block_len}, {prefix_len}, {q_offset}")
    if q_offset + q.shape[-2] > k.shape[-2]:
        raise ValueError(f"queries end at position {q_offset + q.shape[-2]} = q_offset + Sq, "
                         f"beyond the {k.shape[-2]} keys")


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_len: int,
                           prefix_len: int = 0, q_offset: int = 0, *,
                           scale: float | None = None) -> torch.Tensor:
    """q [B, N, Sq, D], k/v [B, N, Sk, D] -> [B, N, Sq, D].

    Bidirectional inside blocks of `block_len` tokens (counted from `prefix_len`), causal
    across blocks; the first `prefix_len` keys are visible to all and attend among themselves.
    Query i is at position `q_offset + i` of the keys (a new block against a KV cache).
    """
    _validate(q, k, v, block_len, prefix_len, q_offset)
    return IMPLEMENTATIONS[_current](q, k, v, block_len, prefix_len, q_offset, scale=scale)


set_attention_impl(_select())
