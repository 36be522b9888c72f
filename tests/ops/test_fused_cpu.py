"""The fused CPU kernel (nbp_mega._C) against the dense reference: values, gradients, lse,
low precision, layouts, threads, the portable loops, opcheck, memory and input errors.

Legend: B batch; N heads; S (Sq, Sk) sequence; D head dim; L block length; P prefix length.
The kernel's tiles are 64 x 64, so S = 97 and 300 leave ragged tiles and L = 5, 16, 256 are
not multiples of the tile (L = 256 spans several).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from nbp_mega.ops import fused
from nbp_mega.ops.reference import dense_attention_with_lse, dense_block_causal_attention
from tests.ops.attention_cases import errors_vs_fp64, forward_backward, qkv

pytestmark = pytest.mark.skipif(not fused.AVAILABLE, reason=f"no kernels: {fused.IMPORT_ERROR}")


def kernel(q, k, v, block_len, prefix_len=0, q_offset=0, scale=None):
    return fused.fused_attention(q, k, v, block_len, prefix_len, q_offset, scale=scale)[0]


def assert_matches_reference(q, k, v, L, P=0, q_offset=0, tol=2e-5):
    """fp32 kernel vs the fp64 dense reference on the same values: output and gradients."""
    out, grads = forward_backward(kernel, q, k, v, L, P, q_offset)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_grads = forward_backward(dense_block_causal_attention, *exact, L, P, q_offset)
    for name, got, want in zip("out dq dk dv".split(), (out, *grads), (ref, *ref_grads),
                               strict=True):
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("S", [97, 300])
@pytest.mark.parametrize("L", [1, 5, 16, 256])
@pytest.mark.parametrize("P", [0, 7])
def test_fp32_block_shapes(S, L, P):
    assert_matches_reference(*qkv(S), L, P)


@pytest.mark.parametrize("D", [8, 20, 64, 96, 128])
def test_head_dims(D):
    assert_matches_reference(*qkv(130, D=D, B=1, N=2), 16, 3)


@pytest.mark.parametrize("B,N", [(1, 1), (1, 3), (3, 4)])
def test_batch_and_heads(B, N):  # few heads split the backward's key tiles into groups
    assert_matches_reference(*qkv(200, B=B, N=N), 16, 2)


@pytest.mark.parametrize("sq,sk,q_offset,L,P", [
    (16, 300, 284, 16, 0),  # the last block against a KV cache
    (40, 300, 203, 16, 3),  # queries starting inside a block
    (5, 300, 0, 16, 5),  # prefix queries only
    (50, 300, 0, 16, 0),  # keys past the last query's block: seen by nobody
    (64, 200, 100, 1, 0),  # causal, offset
    (1, 300, 150, 1, 0),  # one token (NTP) against a KV cache buffer: half its keys unseen
])
def test_kv_cache_offsets(sq, sk, q_offset, L, P):
    assert_matches_reference(*qkv(sk, sq=sq), L, P, q_offset)


def test_model_layout_strided_inputs():
    """q, k, v as the model makes them: views of one [B, S, N, 3, D] projection."""
    B, S, N, D = 2, 150, 3, 32
    qkv_proj = torch.randn(B, S, N, 3, D, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv_proj.float().permute(3, 0, 2, 1, 4).unbind(0)
    assert not q.is_contiguous()
    out = kernel(q, k, v, 16, 2)
    ref = dense_block_causal_attention(q, k, v, 16, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(out.square().sum(), qkv_proj)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), qkv_proj)
    torch.testing.assert_close(grad, ref_grad, atol=1e-4, rtol=1e-4)


def layout_views(layout: str, B=2, N=3, S=150, D=16):
    """q, k, v [B, N, S, D] fp32 requiring grad, as views of one tensor laid out otherwise."""
    g = torch.Generator().manual_seed(0)
    if layout == "projection_d20":  # the model's views, D % 8 != 0: every operand copied
        base = torch.randn(B, S, N, 3, 20, generator=g).requires_grad_()
        return base.permute(3, 0, 2, 1, 4).unbind(0)
    if layout == "heads_first":  # [N, B, S, D] transposed: rows contiguous, read in place
        base = torch.randn(3, N, B, S, D, generator=g).requires_grad_()
        return base.transpose(1, 2).unbind(0)
    assert layout == "every_other_head"  # a head slice: rows contiguous, read in place
    base = torch.randn(3, B, 2 * N, S, D, generator=g).requires_grad_()
    return base[:, :, ::2].unbind(0)


@pytest.mark.parametrize("layout", ["projection_d20", "heads_first", "every_other_head"])
def test_input_layouts(layout):
    """fp32 rows are read in place where each head's rows are contiguous, else copied; S = 150
    leaves a ragged last key tile (no padding rows behind v read in place)."""
    q, k, v = layout_views(layout)
    assert not q.is_contiguous()
    assert_matches_reference(q, k, v, 16, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S,L,P", [(97, 16, 3), (128, 1, 0), (80, 5, 8), (300, 256, 0)])
def test_low_precision_error_within_2x_of_pytorch(dtype, S, L, P):
    ours = errors_vs_fp64(kernel, dtype, S, L, P)
    torchs = errors_vs_fp64(dense_block_causal_attention, dtype, S, L, P)
    for name, mine, theirs in zip("out dq dk dv".split(), ours, torchs, strict=True):
        assert mine <= 2 * theirs, (name, ours, torchs)


def test_lse_and_its_gradient():
    q, k, v = qkv(150, sq=60)
    out, lse = fused.fused_attention(q, k, v, 16, 3, 90)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = dense_attention_with_lse(*exact, 16, 3, 90)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    # a loss through both outputs, and through lse alone (grad_out is then None)
    for loss, ref_loss in ((out.sum() + 3 * lse.sum(), ref.sum() + 3 * ref_lse.sum()),
                           (lse.square().sum(), ref_lse.square().sum())):
        grads = torch.autograd.grad(loss, (q, k, v), retain_graph=True)
        ref_grads = torch.autograd.grad(ref_loss, exact, retain_graph=True,
                                        materialize_grads=True)  # lse alone: dv = 0
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)


def test_same_result_on_one_and_two_threads():
    q, k, v = qkv(300, B=1, N=2)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(forward_backward(kernel, q, k, v, 16, 3))
    finally:
        torch.set_num_threads(previous)
    (out1, grads1), (out2, grads2) = results
    torch.testing.assert_close(out1, out2, atol=0, rtol=0)  # forward tiles are independent
    for g1, g2 in zip(grads1, grads2, strict=True):  # backward dq sums may regroup
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-6)


NARROW_ISA_CHECK = """
import os, torch, nbp_mega._C as C
from nbp_mega.ops import fused
from nbp_mega.ops.reference import dense_attention_with_lse
assert C.cpu_isa == os.environ["NBP_CPU_ISA"], C.cpu_isa
q, k, v = [torch.randn(2, 3, 150, 24, dtype=torch.float64, requires_grad=True) for _ in "qkv"]
out, lse = fused.fused_attention(*(t.float() for t in (q, k, v)), 16, 5)
ref, ref_lse = dense_attention_with_lse(q, k, v, 16, 5)
g = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
r = torch.autograd.grad(ref.sum() + ref_lse.sum(), (q, k, v))
print(max((a - b).abs().max().item() for a, b in zip((out, lse, *g), (ref, ref_lse, *r))))
# the sampler's exp2_sum of the same table: draws on a uniform grid against the distribution
from nbp_mega.generate.sampling import SamplingConfig, draw, filter_logits
logits, n = torch.randn(3, 1, 203) * 3, 2001  # 203: vector loops and their scalar tails
cfg = SamplingConfig(temperature=0.7, top_k=60, top_p=0.8)
ids = draw(logits.expand(3, n, 203), cfg, ((torch.arange(n) + 0.5) / n).expand(3, n),
           kernel="cpu_kernel")
counts = torch.stack([torch.bincount(row, minlength=203) for row in ids])
print((counts - n * filter_logits(logits[:, 0], cfg).softmax(-1)).abs().max().item())
"""


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return flag in f.read().split()
    except OSError:
        return False


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_narrower_loops_than_the_cpu_has(isa):
    """The tables a wider CPU does not pick (the portable loops, AVX2 on an AVX-512 CPU) are
    forced with NBP_CPU_ISA and checked against the reference like the default one: the
    attention, and the sampler's draws (within one grid point of each token's share)."""
    if isa == "avx2" and not _cpu_has("avx2"):
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, NBP_CPU_ISA=isa, NBP_ATTENTION_IMPL="block_loop")
    run = subprocess.run([sys.executable, "-c", NARROW_ISA_CHECK], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    attention, sampler = map(float, run.stdout.split()[-2:])
    assert attention < 1e-4 and sampler <= 1.01, run.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    q, k, v = qkv(70, dtype=dtype, B=1, N=2, D=8)
    args = (q, k, v, 16, 3, 0, 0.3)
    torch.library.opcheck(torch.ops.nbp_mega.block_causal_attention.default, args)
    out, lse = torch.ops.nbp_mega.block_causal_attention(*args)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    q, k, v = (t.detach() for t in (q, k, v))  # the backward op has no derivative itself
    for maybe_grad_lse in (None, grad_lse):
        torch.library.opcheck(torch.ops.nbp_mega.block_causal_attention_backward.default,
                              (grad_out, q, k, v, out, lse, maybe_grad_lse, 16, 3, 0, 0.3))


def test_double_backward_is_refused():
    q, k, v = qkv(20)
    out = kernel(q, k, v, 4)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad"):
        dq.sum().backward()


def largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation made while running fn (torch allocator)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    return max([e.cpu_memory_usage for e in prof.events()] + [0])


@pytest.mark.parametrize("L", [1, 256])
def test_no_sequence_by_sequence_allocation(L):
    S = 1024
    q, k, v = qkv(S, B=1, N=2, D=8)
    square = S * S * 4  # one fp32 Sq x Sk score matrix of one head

    def run(fn):
        return lambda: fn(q, k, v, L).sum().backward()

    assert largest_allocation(run(dense_block_causal_attention)) >= square  # the probe works
    assert largest_allocation(run(kernel)) < square


def test_empty_query_block():
    q, k, v = qkv(20, sq=0)
    out, grads = forward_backward(kernel, q, k, v, 4, 0, 20)
    assert out.shape == (2, 3, 0, 16)
    assert all(g.abs().sum() == 0 for g in grads)


def test_op_input_errors():
    op = torch.ops.nbp_mega.block_causal_attention
    q, k, v = (t.detach() for t in qkv(8))
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        op(q.double(), k.double(), v.double(), 2, 0, 0, 1.0)
    with pytest.raises(TypeError, match="share a dtype"):
        op(q, k.half(), v, 2, 0, 0, 1.0)
    with pytest.raises(ValueError, match=r"must be \[B, N, S, D\]"):
        op(q[0], k, v, 2, 0, 0, 1.0)
    with pytest.raises(ValueError, match="beyond the 8 keys"):
        op(q, k, v, 2, 0, 1, 1.0)
    with pytest.raises(ValueError, match="block_len >= 1"):
        op(q, k, v, 0, 0, 0, 1.0)
    with pytest.raises(ValueError, match="scale must be positive"):
        op(q, k, v, 2, 0, 0, 0.0)
    with pytest.raises(ValueError, match="lse must be"):
        torch.ops.nbp_mega.block_causal_attention_backward(q, q, k, v, q, q, None, 2, 0, 0, 1.0)
