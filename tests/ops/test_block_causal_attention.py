"""block_causal_attention: the pure-PyTorch path against the dense reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import nbp_mega.ops as ops
from nbp_mega.ops import block_causal_attention, use_attention_impl
from nbp_mega.ops.block_loop import MAX_MASKED_ROWS, block_loop_attention
from nbp_mega.ops.reference import block_causal_mask, dense_block_causal_attention
from tests.ops.attention_cases import errors_vs_fp64, forward_backward, qkv

CASES = [(S, L, P) for S in (40, 97) for L in (1, 4, 16, 5) for P in (0, 3, 8)]


@pytest.mark.parametrize("S,L,P", CASES)
def test_block_loop_equals_dense_fp32(S, L, P):
    q, k, v = qkv(S)
    out, grads = forward_backward(block_loop_attention, q, k, v, L, P)
    ref, ref_grads = forward_backward(dense_block_causal_attention, q, k, v, L, P)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("S,L,P", [(97, 16, 3), (64, 1, 0), (80, 5, 8)])
def test_block_loop_bf16_error_within_2x_of_pytorch(S, L, P):
    loop = errors_vs_fp64(block_loop_attention, torch.bfloat16, S, L, P)
    dense = errors_vs_fp64(dense_block_causal_attention, torch.bfloat16, S, L, P)
    for loop_err, dense_err in zip(loop, dense, strict=True):
        assert loop_err <= 2 * dense_err + 1e-3, (loop, dense)


def test_l1_is_causal_attention():
    q, k, v = qkv(50)
    torch.testing.assert_close(block_causal_attention(q, k, v, 1),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("L,P", [(4, 0), (4, 6), (1, 2), (16, 3)])
def test_kv_cache_rows_equal_full_rows(L, P):
    S = P + 5 * L
    q, k, v = qkv(S)
    full = block_causal_attention(q, k, v, L, P)
    last_block = slice(S - L, S)
    part = block_causal_attention(q[:, :, last_block], k, v, L, P, q_offset=S - L)
    torch.testing.assert_close(part, full[:, :, last_block])
    if P:  # the prefix rows alone, against only the prefix keys
        pre = block_causal_attention(q[:, :, :P], k[:, :, :P], v[:, :, :P], L, P)
        torch.testing.assert_close(pre, full[:, :, :P])


def test_mask_semantics_by_hand():
    # S=7, P=2, L=2: prefix {0,1}; blocks {2,3}, {4,5}, {6}
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(block_causal_mask(7, 7, 2, 2), expected)
    assert torch.equal(block_causal_mask(2, 7, 2, 2, q_offset=4), expected[4:6])


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("L", [1, 16])
def test_no_sequence_by_sequence_tensor(L):
    S, B, N, D = 512, 1, 2, 8
    q, k, v = qkv(S, B=B, N=N, D=D)
    per_head_square = B * N * S * S
    for fn, should_trip in ((block_loop_attention, False), (dense_block_causal_attention, True)):
        with LargestTensor() as probe:
            out = fn(q, k, v, L)
            out.sum().backward()
        tripped = probe.largest >= S * S
        assert tripped == should_trip, (fn.__name__, probe.largest, per_head_square)
    assert MAX_MASKED_ROWS * S < S * S


def test_dispatch_override_and_errors(monkeypatch):
    default = ops.attention_impl()
    assert default == "auto"  # CPU kernel on the CPU, FlexAttention on CUDA
    with use_attention_impl("dense"):
        assert ops.attention_impl() == "dense"
    assert ops.attention_impl() == default
    with pytest.raises(ValueError, match="valid: auto, fused, flex, block_loop, dense"):
        ops.set_attention_impl("flash")
    monkeypatch.setenv("NBP_ATTENTION_IMPL", "dense")
    assert ops._select() == "dense"
    monkeypatch.setenv("NBP_ATTENTION_IMPL", "nope")
    with pytest.raises(ValueError, match="unknown attention implementation 'nope'"):
        ops._select()


def test_bad_arguments():
    q, k, v = qkv(8)
    with pytest.raises(ValueError, match=r"\[B, N, S, D\]"):
        block_causal_attention(q[0], k, v, 2)
    with pytest.raises(ValueError, match="beyond the 8 keys"):
        block_causal_attention(q, k, v, 2, q_offset=1)
    with pytest.raises(ValueError, match="block_len >= 1"):
        block_causal_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="agree"):
        block_causal_attention(q, k[..., :4], v[..., :4], 2)
    with pytest.raises(ValueError, match="share a dtype"):
        block_causal_attention(q, k.double(), v, 2)
