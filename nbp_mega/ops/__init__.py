"""Kernels behind one public function: `block_causal_attention`.

Legend: B batch; N heads; Sq queries; Sk keys; D head dim; L block length; P prefix length.

The implementation is chosen once at import (logged), overridable by the environment variable
NBP_ATTENTION_IMPL or, in tests, by `set_attention_impl` / `use_attention_impl`:
    auto        the default: per call, by the device of q (logged once per route):
                  CPU: the C++ kernel of nbp_mega._C (float32/float16/bfloat16; float64, or
                       no extension built -> block_loop); a generation step of 1-token
                       blocks (NTP) -> one unmasked SDPA over the keys it sees;
                  CUDA: FlexAttention (torch >= 2.5, else block_loop). Our CUDA kernel is not
                       the default until its `gpu` tests have passed on a real GPU (recorded in
                       the README) and it is measured faster there: CUDA_KERNEL_BY_DEFAULT.
    fused       our kernels on both devices (the opt-in for the CUDA kernel). Where a kernel
                does not apply it hands over (logged once per reason): CPU float64 ->
                block_loop; CUDA: float16/bfloat16 and D <= 128 when compiled, otherwise
                FlexAttention, else block_loop.
    flex        FlexAttention with a block-sparse mask (CUDA; CPU forward only, eager)
    block_loop  exact pure PyTorch, no Sq x Sk mask (every device)
    dense       dense mask + one SDPA call: the reference; O(S^2) memory (tests, benchmarks)
`block_causal_attention_with_lse` also returns the log-sum-exp of each query's scores.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.nn.functional as F

from nbp_mega.ops import flex as _flex
from nbp_mega.ops import fused as _fused
from nbp_mega.ops.block_loop import block_loop_attention
from nbp_mega.ops.flex import flex_block_causal_attention
from nbp_mega.ops.reference import dense_attention_with_lse, dense_block_causal_attention

log = logging.getLogger("nbp_mega.ops")
_reported: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _reported:
        _reported.add(message)
        log.info(message)


def _fallback_for(q: torch.Tensor) -> str:
    return "flex" if q.is_cuda and _flex.AVAILABLE else "block_loop"


def fused_block_causal_attention(q, k, v, block_len: int, prefix_len: int = 0,
                                 q_offset: int = 0, *, scale: float | None = None):
    """The fused kernel where it applies, else the next best implementation (logged once)."""
    reason = _fused.unsupported_reason(q)
    if reason is None:
        return _fused.fused_attention(q, k, v, block_len, prefix_len, q_offset, scale=scale)[0]
    fallback = _fallback_for(q)
    _log_once(f"block-causal attention: {reason}; using {fallback}")
    return IMPLEMENTATIONS[fallback](q, k, v, block_len, prefix_len, q_offset, scale=scale)


# Flip only with a README record of the `gpu` tests passing on hardware (date, GPU, torch and
# CUDA versions) and bench_attention --device cuda showing the kernel faster than FlexAttention.
CUDA_KERNEL_BY_DEFAULT = False


def auto_choice(device_type: str) -> str:
    """What `auto` runs on a device: "fused" (our kernel, which hands over where it does not
    apply) or the FlexAttention / block-loop path."""
    if device_type == "cuda" and not CUDA_KERNEL_BY_DEFAULT:
        return "flex" if _flex.AVAILABLE else "block_loop"
    return "fused"


def one_block_keys(sq: int, block_len: int, prefix_len: int, q_offset: int) -> int | None:
    """When the Sq queries at q_offset all lie in one block (or all in the prefix), every one
    of them sees the same keys, [0, end), and nothing else: the block-causal mask is no mask
    there (a generation step: one block against the KV cache). -> end, else None."""
    last = q_offset + sq - 1
    if last < prefix_len:
        return prefix_len
    if q_offset < prefix_len:
        return None
    first_block = (q_offset - prefix_len) // block_len
    if (last - prefix_len) // block_len != first_block:
        return None
    return prefix_len + (first_block + 1) * block_len


def auto_block_causal_attention(q, k, v, block_len: int, prefix_len: int = 0,
                                q_offset: int = 0, *, scale: float | None = None):
    """The default route: our CPU kernel on the CPU, FlexAttention on CUDA (see the legend);
    on the CPU, a generation step of 1-token blocks (NTP, the hybrid start's first row) goes
    to one unmasked SDPA over the keys it sees: the kernel walks the cache block by block,
    a tile per key there. Measured (tools/bench_generation.py, .notes/bench_generation_
    2026-12-03b_fused_kernel.json vs 2026-12-03c.json, consecutive quiet runs): NTP at batch 8
    78.2 -> 65.9 s a clip, batch 1 the same (30.5 / 30.9 s). Longer blocks keep the kernel
    (the rows runs varied 3.6-4.5 s between runs either way: no gain shown). Not on CUDA: a
    step's key count changes every step, and CUDA graphs need static shapes."""
    end = one_block_keys(q.shape[2], block_len, prefix_len, q_offset) if block_len == 1 \
        else None
    if end is not None and q.device.type == "cpu":
        _log_once("block-causal attention on cpu: a step of 1-token blocks -> unmasked SDPA "
                  "over its keys")
        end = min(end, k.shape[2])
        return F.scaled_dot_product_attention(q, k[:, :, :end], v[:, :, :end], scale=scale)
    name = auto_choice(q.device.type)
    if name != "fused":
        _log_once(f"block-causal attention on {q.device.type}: {name} (the CUDA kernel of "
                  "nbp_mega._C is opt-in until verified on a GPU: NBP_ATTENTION_IMPL=fused)")
    return IMPLEMENTATIONS[name](q, k, v, block_len, prefix_len, q_offset, scale=scale)


IMPLEMENTATIONS = {
    "auto": auto_block_causal_attention,
    "fused": fused_block_causal_attention,
    "flex": flex_block_causal_attention,
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
    if not _fused.AVAILABLE:
        log.warning("nbp_mega._C is not available (%s): block-causal attention on the CPU falls "
                    "back to the pure-PyTorch block loop (build it with `make install`)",
                    _fused.IMPORT_ERROR)
    return "auto"


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
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


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


def block_causal_attention_with_lse(q, k, v, block_len: int, prefix_len: int = 0,
                                    q_offset: int = 0, *, scale: float | None = None):
    """As block_causal_attention, plus lse [B, N, Sq] fp32: log sum_j exp(scale q.k_j) over
    the visible keys (differentiable). Uses the fused kernel where it applies (on CUDA only if
    the selection runs it there), else the dense reference (O(Sq x Sk) memory)."""
    _validate(q, k, v, block_len, prefix_len, q_offset)
    kernel_allowed = _current == "fused" or auto_choice(q.device.type) == "fused"
    if kernel_allowed and _fused.unsupported_reason(q) is None:
        return _fused.fused_attention(q, k, v, block_len, prefix_len, q_offset, scale=scale)
    return dense_attention_with_lse(q, k, v, block_len, prefix_len, q_offset, scale=scale)


def _fused_route(device_type: str) -> str:
    gpu_fallback = "flex" if _flex.AVAILABLE else "block_loop"
    if device_type == "cpu":
        return "fused CPU kernel" if _fused.AVAILABLE else "block_loop"
    return (f"fused CUDA kernel (float16/bfloat16, D <= {_fused.CUDA_MAX_HEAD_DIM}), else "
            f"{gpu_fallback}" if _fused.CUDA_COMPILED else gpu_fallback)


def describe() -> dict:
    """The backends compiled, the implementation selected and where calls go on each device
    (`python -m nbp_mega.ops --info`)."""
    routes = {}
    for device in ("cpu", "cuda"):
        name = auto_choice(device) if _current == "auto" else _current
        routes[device] = _fused_route(device) if name == "fused" else name
    return {"extension": _fused.build_info(), "flex_available": _flex.AVAILABLE,
            "cuda_device": torch.cuda.is_available(), "selected": _current,
            "cuda_kernel_by_default": CUDA_KERNEL_BY_DEFAULT, "routes": routes}


set_attention_impl(_select())
