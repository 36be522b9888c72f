"""The fused kernels of nbp_mega._C (csrc/) as a differentiable PyTorch op.

Legend: B batch; N heads; Sq queries; Sk keys; D head dim; L block length; P prefix length.

torch.ops.nbp_mega.block_causal_attention(q, k, v, L, P, q_offset, scale) -> (out, lse) has a
CPU kernel (always compiled) and a CUDA kernel (when nvcc was found at build time); the same
schema dispatches on the device of q. This module registers its autograd formula (the
backward op, which recomputes the probabilities from lse) and its fake implementation (shapes
only, for torch.compile and opcheck), and says which backends exist.
"""

from __future__ import annotations

import torch

try:
    import nbp_mega._C as _C  # loading the library registers torch.ops.nbp_mega.*
except ImportError as error:  # not built, or built against another torch
    _C, IMPORT_ERROR = None, f"{type(error).__name__}: {error}"
else:
    IMPORT_ERROR = None

AVAILABLE = _C is not None
CUDA_COMPILED = AVAILABLE and bool(_C.with_cuda)
CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_MAX_HEAD_DIM = 128  # compiled for D = 32, 64, 96, 128 (others zero-padded up): csrc/cuda/


def build_info() -> dict:
    """What nbp_mega._C contains (for `python -m nbp_mega.ops --info`)."""
    if not AVAILABLE:
        return {"built": False, "error": IMPORT_ERROR}
    archs = [a for a in _C.cuda_archs.replace(" ", ";").split(";") if a]
    return {"built": True, "path": _C.__file__, "cpu": {"compiled": True, "isa": _C.cpu_isa},
            "cuda": {"compiled": CUDA_COMPILED, "archs": archs}}


def unsupported_reason(q: torch.Tensor) -> str | None:
    """Why the fused kernel cannot take q (and its k, v), or None if it can."""
    if not AVAILABLE:
        return "nbp_mega._C is not built"
    if q.device.type == "cpu":
        return None if q.dtype in CPU_DTYPES else f"the CPU kernel takes no {q.dtype}"
    if q.device.type != "cuda":
        return f"no kernel for device {q.device.type}"
    if not CUDA_COMPILED:
        return "nbp_mega._C was built without CUDA"
    if q.dtype not in CUDA_DTYPES:
        return f"the CUDA kernel takes float16/bfloat16, not {q.dtype}"
    if q.shape[-1] > CUDA_MAX_HEAD_DIM:
        return f"the CUDA kernel takes head dim <= {CUDA_MAX_HEAD_DIM}, not {q.shape[-1]}"
    return None


def fused_attention(q, k, v, block_len: int, prefix_len: int = 0, q_offset: int = 0, *,
                    scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, N, Sq, D], k/v [B, N, Sk, D] -> out [B, N, Sq, D], lse [B, N, Sq] fp32."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.nbp_mega.block_causal_attention(q, k, v, block_len, prefix_len, q_offset,
                                                     float(scale))


def _setup_context(ctx, inputs, output):
    q, k, v, *ctx.args = inputs  # args: block_len, prefix_len, q_offset, scale
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:  # only lse was used
        grad_out = torch.zeros_like(out)
    grads = torch.ops.nbp_mega.block_causal_attention_backward(grad_out, q, k, v, out, lse,
                                                               grad_lse, *ctx.args)
    return (*grads, None, None, None, None)


def _fake_forward(q, k, v, block_len, prefix_len, q_offset, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _fake_backward(grad_out, q, k, v, out, lse, grad_lse, block_len, prefix_len, q_offset,
                   scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


if AVAILABLE:
    torch.library.register_fake("nbp_mega::block_causal_attention")(_fake_forward)
    torch.library.register_fake("nbp_mega::block_causal_attention_backward")(_fake_backward)
    torch.library.register_autograd("nbp_mega::block_causal_attention", _backward,
                                    setup_context=_setup_context)
