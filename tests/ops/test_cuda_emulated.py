"""The CUDA kernels' thread-block programs, run on the CPU: csrc/cuda/attention_blocks.cuh is
compiled by g++ against tests/ops/cuda_emulation/emulation.h (threads, barriers and wmma on
the CPU) and compared with the fp64 dense reference: in fp32, tightly, which checks indexing,
masking, the tile schedule and synchronisation; in emulated fp16/bf16 (rounded where the GPU
rounds), against the tolerance rule of the GPU tests. This is what can be checked where no
GPU exists; test_fused_cuda.py checks the compiled kernels on a GPU.

Legend: B batch; N heads; S (Sq, Sk) sequence; D head dim; L block length; P prefix length.
The CUDA tiles are 64 x 32 (forward) and 32 x 32 (backward): S = 97 leaves ragged tiles.
"""

from __future__ import annotations

import ctypes
import pathlib
import shutil
import subprocess

import pytest
import torch

from nbp_mega.ops.reference import dense_attention_with_lse, dense_block_causal_attention
from tests.ops.attention_cases import errors_vs_fp64, forward_backward, qkv

ROOT = pathlib.Path(__file__).resolve().parents[2]
HARNESS = pathlib.Path(__file__).parent / "cuda_emulation" / "harness.cpp"


class View(ctypes.Structure):
    """A [B, N, S, D] float32 tensor with unit stride over D (harness.cpp's View)."""

    _fields_ = [("data", ctypes.c_void_p), ("stride_b", ctypes.c_int64),
                ("stride_n", ctypes.c_int64), ("stride_s", ctypes.c_int64)]

    @classmethod
    def of(cls, t: torch.Tensor) -> View:
        assert t.dtype == torch.float32 and t.stride(3) == 1, (t.dtype, t.stride())
        return cls(t.data_ptr(), *t.stride()[:3])


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    library = tmp_path_factory.mktemp("cuda_emulation") / "harness.so"
    build = subprocess.run([compiler, "-std=c++20", "-O2", "-pthread", "-shared", "-fPIC",
                            "-I", str(ROOT / "csrc"), "-o", str(library), str(HARNESS)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    lib = ctypes.CDLL(str(library))
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    dtype = ctypes.c_int
    lib.emulated_forward.argtypes = [View] * 4 + [ptr] + [i64] * 8 + [f32, dtype]
    lib.emulated_backward.argtypes = [View] * 4 + [ptr] * 2 + [View] * 3 + [i64] * 8 + [f32, dtype]
    lib.shared_memory_bytes.argtypes = [ctypes.c_int, i64]
    lib.shared_memory_bytes.restype = i64
    return lib


DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # harness.cpp


class EmulatedAttention(torch.autograd.Function):
    """The emulated kernels as a differentiable function of float32 q, k, v holding values of
    `dtype` (the same forward/backward split as nbp_mega/ops/fused.py)."""

    @staticmethod
    def forward(ctx, q, k, v, lib, L, P, q_offset, scale, dtype):
        B, N, sq, d = q.shape
        sk = k.shape[2]
        out = torch.empty(B, N, sq, d)
        lse = torch.empty(B, N, sq)
        assert lib.emulated_forward(View.of(q), View.of(k), View.of(v), View.of(out),
                                    lse.data_ptr(), B, N, sq, sk, d, L, P, q_offset, scale,
                                    DTYPE_CODES[dtype]) == 0
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (lib, L, P, q_offset, scale, dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        lib, L, P, q_offset, scale, dtype = ctx.args
        B, N, sq, d = q.shape
        sk = k.shape[2]
        grad_out = grad_out.contiguous()
        delta = (grad_out * out).sum(-1).contiguous()  # softmax_backward_delta
        grad_q = torch.zeros(B, N, sq, d)
        grad_k, grad_v = torch.empty(B, N, sk, d), torch.empty(B, N, sk, d)
        assert lib.emulated_backward(View.of(grad_out), View.of(q), View.of(k), View.of(v),
                                     lse.data_ptr(), delta.data_ptr(), View.of(grad_q),
                                     View.of(grad_k), View.of(grad_v), B, N, sq, sk, d, L, P,
                                     q_offset, scale, DTYPE_CODES[dtype]) == 0
        return grad_q, grad_k, grad_v, None, None, None, None, None, None


def emulated_kernel(lib):
    """q, k, v (float32, float16 or bfloat16) -> out, through the emulated kernels."""

    def attention(q, k, v, L, P=0, q_offset=0):
        args = (lib, L, P, q_offset, q.shape[-1] ** -0.5, q.dtype)
        return EmulatedAttention.apply(q.float(), k.float(), v.float(), *args).to(q.dtype)

    return attention


def check(lib, q, k, v, L, P=0, q_offset=0, tol=5e-5):
    """Emulated kernels (fp32) vs the fp64 dense reference: out, dq, dk, dv."""
    out, grads = forward_backward(emulated_kernel(lib), q, k, v, L, P, q_offset)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_grads = forward_backward(lambda *a: dense_attention_with_lse(*a)[0], *exact, L, P,
                                      q_offset)
    for name, got, want in zip("out dq dk dv".split(), (out, *grads), (ref, *ref_grads),
                               strict=True):
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("S,L,P", [(97, 1, 0), (97, 16, 7), (97, 5, 3), (300, 256, 7),
                                   (64, 64, 0), (70, 32, 0)])
def test_block_shapes(emulation, S, L, P):
    check(emulation, *qkv(S, B=1, N=2, D=16), L, P)


@pytest.mark.parametrize("D", [8, 32, 40, 96, 128])
def test_head_dims(emulation, D):
    check(emulation, *qkv(70, B=2, N=1, D=D), 16, 3)


@pytest.mark.parametrize("sq,sk,q_offset,L,P", [
    (16, 130, 114, 16, 0),  # the last block against a KV cache
    (40, 130, 73, 16, 3),  # queries starting inside a block
    (5, 100, 0, 16, 5),  # prefix queries only
    (50, 140, 0, 16, 0),  # keys past the last query's block: seen by nobody
])
def test_kv_cache_offsets(emulation, sq, sk, q_offset, L, P):
    check(emulation, *qkv(sk, sq=sq, B=1, N=1, D=16), L, P, q_offset)


def test_strided_inputs(emulation):
    """q, k, v as views of one [B, S, N, 3, D] projection, as the model makes them."""
    B, S, N, D = 2, 80, 2, 32
    proj = torch.randn(B, S, N, 3, D, requires_grad=True)
    q, k, v = proj.permute(3, 0, 2, 1, 4).unbind(0)
    assert not q.is_contiguous()
    check(emulation, q, k, v, 16, 2)


def test_unsupported_head_dim_is_refused(emulation):
    q = torch.zeros(1, 1, 4, 160)
    lse = torch.empty(1, 1, 4)
    assert emulation.emulated_forward(*[View.of(q)] * 4, lse.data_ptr(), 1, 1, 4, 4, 160, 1, 0,
                                      0, 1.0, 0) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S,L,P,q_offset,sq", [(97, 16, 3, 0, None), (128, 1, 0, 0, None),
                                               (80, 5, 8, 0, None), (300, 256, 0, 0, None),
                                               (200, 16, 3, 120, 70)])
def test_low_precision_error_within_2x_of_pytorch(emulation, dtype, S, L, P, q_offset, sq):
    """The GPU tests' rule, with PyTorch's CPU SDPA as the yardstick here."""
    shape = dict(sq=sq, B=1, N=2, D=32)
    ours = errors_vs_fp64(emulated_kernel(emulation), dtype, S, L, P, q_offset, **shape)
    torchs = errors_vs_fp64(dense_block_causal_attention, dtype, S, L, P, q_offset, **shape)
    for name, mine, theirs in zip("out dq dk dv".split(), ours, torchs, strict=True):
        assert mine <= 2 * theirs, (name, ours, torchs)


@pytest.mark.parametrize("dp", [32, 64, 96, 128])
def test_shared_memory_fits_every_gpu_from_sm80(emulation, dp):
    """Backward blocks fit the 99 KiB a block may have on sm_86/sm_89 (sm_80 and sm_90 allow
    more); two forward blocks fit an A100 SM (164 KiB, of which 1 KiB per block reserved)."""
    forward, backward = (emulation.shared_memory_bytes(b, dp) for b in (0, 1))
    assert 0 < backward <= 99 * 1024, backward
    assert 0 < forward <= 164 * 1024 // 2 - 1024, forward
