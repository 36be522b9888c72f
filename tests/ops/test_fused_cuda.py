"""The fused CUDA kernel (nbp_mega._C) against the fp64 dense reference, on a GPU: values and
gradients in float16/bfloat16 within 2x PyTorch's own SDPA error, block shapes, prefix, KV
cache offsets, head dims, strided inputs, lse, opcheck, memory, dispatch and input errors.

Legend: B batch; N heads; S (Sq, Sk) sequence; D head dim; L block length; P prefix length.
The kernel's tiles are 64 x 32 (forward) and 32 x 32 (backward): S = 97, 130 and 300 leave
ragged tiles, L = 5, 16, 256 straddle or span tiles. test_cuda_emulated.py runs the same
thread-block programs on the CPU, in fp32, where there is no GPU.
"""

from __future__ import annotations

import logging

import pytest
import torch

from nbp_mega.ops import block_causal_attention, fused, use_attention_impl
from nbp_mega.ops.reference import dense_attention_with_lse, dense_block_causal_attention
from tests.ops.attention_cases import errors_vs_fp64, forward_backward, qkv

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not fused.CUDA_COMPILED, reason="nbp_mega._C was built without CUDA"),
]
DTYPES = [torch.float16, torch.bfloat16]


def kernel(q, k, v, block_len, prefix_len=0, q_offset=0, scale=None):
    return fused.fused_attention(q, k, v, block_len, prefix_len, q_offset, scale=scale)[0]


def assert_within_2x_of_sdpa(dtype, S, L, P, q_offset=0, **shape):
    """out, dq, dk, dv of the kernel vs fp64: at most twice the error of dense SDPA (same
    dtype, same GPU) on the same inputs."""
    ours = errors_vs_fp64(kernel, dtype, S, L, P, q_offset, device="cuda", **shape)
    torchs = errors_vs_fp64(dense_block_causal_attention, dtype, S, L, P, q_offset,
                            device="cuda", **shape)
    for name, mine, theirs in zip("out dq dk dv".split(), ours, torchs, strict=True):
        assert mine <= 2 * theirs, (name, ours, torchs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,L,P", [
    (97, 1, 0), (128, 1, 0),  # causal
    (97, 16, 0), (97, 16, 3), (130, 5, 0), (80, 5, 8),  # S not a multiple of L; prefixes
    (300, 256, 0), (300, 256, 7),  # blocks spanning several tiles
    (64, 64, 0),  # one block, one query tile: no masking at all
])
def test_block_shapes_within_2x_of_pytorch(dtype, S, L, P):
    assert_within_2x_of_sdpa(dtype, S, L, P)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk,q_offset,L,P", [
    (16, 300, 284, 16, 0),  # the last block against a KV cache
    (40, 300, 203, 16, 3),  # queries starting inside a block
    (5, 300, 0, 16, 5),  # prefix queries only
    (50, 300, 0, 16, 0),  # keys past the last query's block: seen by nobody
    (64, 200, 100, 1, 0),  # causal, offset
])
def test_kv_cache_offsets_within_2x_of_pytorch(dtype, sq, sk, q_offset, L, P):
    assert_within_2x_of_sdpa(dtype, sk, L, P, q_offset, sq=sq)


@pytest.mark.parametrize("D", [8, 32, 40, 64, 80, 96, 128])  # padded to 32, 64, 96, 128
def test_head_dims_within_2x_of_pytorch(D):
    assert_within_2x_of_sdpa(torch.bfloat16, 130, 16, 3, B=1, N=2, D=D)


@pytest.mark.parametrize("B,N", [(1, 1), (2, 3)])
def test_batch_heads_and_long_sequence(B, N):
    assert_within_2x_of_sdpa(torch.float16, 1030, 16, 2, B=B, N=N, D=64)


def test_model_layout_strided_inputs():
    """q, k, v as views of one [B, S, N, 3, D] projection give what contiguous copies give."""
    B, S, N, D = 2, 150, 3, 64
    proj = torch.randn(B, S, N, 3, D, device="cuda", dtype=torch.float16, requires_grad=True)
    q, k, v = proj.permute(3, 0, 2, 1, 4).unbind(0)
    assert not q.is_contiguous() and q.stride(3) == 1
    copies = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    out, grads = forward_backward(kernel, q, k, v, 16, 2)
    ref, ref_grads = forward_backward(kernel, *copies, 16, 2)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)  # the forward is deterministic
    for g, r in zip(grads, ref_grads, strict=True):  # dq sums in any order (atomicAdd)
        torch.testing.assert_close(g, r, atol=2e-3, rtol=2e-3)
    transposed = [t.detach().transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v)]
    assert transposed[0].stride(3) != 1  # D not unit-stride: copied by the op
    torch.testing.assert_close(kernel(*transposed, 16, 2), ref, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lse_and_its_gradient(dtype):
    q, k, v = (t.detach().to("cuda", dtype).requires_grad_() for t in qkv(150, sq=60))
    out, lse = fused.fused_attention(q, k, v, 16, 3, 90)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]  # the same rounded inputs
    ref, ref_lse = dense_attention_with_lse(*exact, 16, 3, 90)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    for loss, ref_loss in ((out.float().sum() + 3 * lse.sum(), ref.sum() + 3 * ref_lse.sum()),
                           (lse.square().sum(), ref_lse.square().sum())):
        grads = torch.autograd.grad(loss, (q, k, v), retain_graph=True)
        ref_grads = torch.autograd.grad(ref_loss, exact, retain_graph=True,
                                        materialize_grads=True)  # lse alone: dv = 0
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g.double(), r, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    q, k, v = (t.detach().to("cuda", dtype).requires_grad_() for t in qkv(70, B=1, N=2, D=32))
    args = (q, k, v, 16, 3, 0, 0.3)
    torch.library.opcheck(torch.ops.nbp_mega.block_causal_attention.default, args)
    out, lse = torch.ops.nbp_mega.block_causal_attention(*args)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    q, k, v = (t.detach() for t in (q, k, v))  # the backward op has no derivative itself
    for maybe_grad_lse in (None, grad_lse):
        torch.library.opcheck(torch.ops.nbp_mega.block_causal_attention_backward.default,
                              (grad_out, q, k, v, out, lse, maybe_grad_lse, 16, 3, 0, 0.3))


@pytest.mark.parametrize("L", [1, 256])
def test_no_sequence_by_sequence_allocation(L):
    S = 4096
    q, k, v = (t.detach().to("cuda", torch.float16).requires_grad_()
               for t in qkv(S, B=1, N=1, D=64))
    square = S * S  # bytes of one bool Sq x Sk mask; a score matrix is 2-4x that

    def peak_extra_bytes(fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn(q, k, v, L).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    assert peak_extra_bytes(dense_block_causal_attention) >= square  # the probe works
    assert peak_extra_bytes(kernel) < square


def test_empty_query_block():
    q, k, v = (t.detach().to("cuda", torch.float16).requires_grad_() for t in qkv(20, sq=0))
    out, grads = forward_backward(kernel, q, k, v, 4, 0, 20)
    assert out.shape == (2, 3, 0, 16)
    assert all(g.abs().sum() == 0 for g in grads)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_inputs_on_another_device_than_the_current_one():
    q, k, v = (t.detach().to("cuda:1", torch.float16) for t in qkv(97))
    with torch.cuda.device(0):
        out = kernel(q, k, v, 16, 3)
    assert out.device == q.device
    torch.testing.assert_close(out, dense_block_causal_attention(q, k, v, 16, 3), atol=2e-3,
                               rtol=2e-3)


def test_dispatch_runs_the_kernel_where_it_applies():
    q, k, v = (t.detach().to("cuda", torch.bfloat16) for t in qkv(97))
    assert fused.unsupported_reason(q) is None
    with use_attention_impl("fused"):
        torch.testing.assert_close(block_causal_attention(q, k, v, 16), kernel(q, k, v, 16),
                                   atol=0, rtol=0)
    wide = torch.empty(1, 2, 40, 160, device="cuda", dtype=torch.bfloat16)
    assert "head dim <= 128, not 160" in fused.unsupported_reason(wide)
    assert "float16/bfloat16, not torch.float32" in fused.unsupported_reason(q.float())


def test_op_input_errors():
    op = torch.ops.nbp_mega.block_causal_attention
    q, k, v = (t.detach().to("cuda", torch.float16) for t in qkv(8))
    with pytest.raises(TypeError, match="takes float16 or bfloat16"):
        op(q.float(), k.float(), v.float(), 2, 0, 0, 1.0)
    wide = torch.zeros(1, 1, 8, 160, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="head dim D <= 128"):
        op(wide, wide, wide, 2, 0, 0, 1.0)
    with pytest.raises(ValueError, match="one device"):
        op(q, k.cpu(), v, 2, 0, 0, 1.0)
    with pytest.raises(ValueError, match="beyond the 8 keys"):
        op(q, k, v, 2, 0, 1, 1.0)


def test_auto_runs_flexattention_on_cuda_until_the_kernel_is_verified(caplog):
    q, k, v = (t.detach().to("cuda", torch.bfloat16) for t in qkv(97))
    with caplog.at_level(logging.INFO, logger="nbp_mega.ops"), use_attention_impl("auto"):
        out = block_causal_attention(q, k, v, 16, 3)
    assert "on cuda: flex" in caplog.text
    torch.testing.assert_close(out, dense_block_causal_attention(q, k, v, 16, 3), atol=2e-2,
                               rtol=2e-2)
