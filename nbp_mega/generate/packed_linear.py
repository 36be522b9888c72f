"""The model's linears through oneDNN with pre-packed weights, while generating on the CPU.

Legend: M rows of a matmul (batch x positions of a step); K in features; N out features.

On the CPU torch's F.linear calls MKL, whose small-M products stream a weight that does not fit
the cache far below the memory's rate: measured on the development machine (AMD EPYC, 2
threads), the vocabulary head [M, 512] x [512, 64000] (131 MB) takes 13-18 ms at M = 1 and
23-31 ms at M = 16 (7-9 GB/s, where summing the same tensor reads 43 GB/s), versus 5-7 ms and
7-9 ms through oneDNN with the weight reordered once into its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight` and `_linear_pointwise`, the pair torch's inductor
emits for frozen CPU linears). Generation steps are exactly these small-M products (with the
C++ sampler, clips went 2.0-2.65x faster: README, Generation speed).

`packed_linears(model)` reroutes every megatron Column/RowParallelLinear of the model through
its `_forward_impl` hook (the call megatron makes for the local matmul; TP communication and
bias handling stay megatron's) while inside, and only for calls without autograd on CPU
weights of float32 or bfloat16; anything else takes megatron's own path. Packed weights are
cached per parameter and reused by later calls while the parameter's data and version are
unchanged (a training step or a load repacks): generation then holds a second copy of the
linear weights. oneDNN's sums run in another order than MKL's: logits differ by about 1e-6
relative, as between any two BLAS libraries; both give each row the same result whatever
the other rows of M are (a sample stays independent of its batch).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.weak import WeakIdKeyDictionary

_DTYPES = (torch.float32, torch.bfloat16)
_M_HINT = 16  # oneDNN picks the packed layout for this M; measured flat from M = 1 to 2048


def available() -> bool:
    """Whether this torch build has oneDNN's packed linear ops."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


# parameter -> (data pointer, version, packed weight); dropped with the parameter
_packed = WeakIdKeyDictionary()


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """The oneDNN layout of weight [N, K], packed on first use and while it stays unchanged."""
    key = (weight.data_ptr(), weight._version)
    hit = _packed.get(weight)
    if hit is None or hit[0] != key:
        hit = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _M_HINT))
        _packed[weight] = hit
    return hit[1]


def _applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (not torch.is_grad_enabled() and weight.device.type == "cpu"
            and weight.dtype in _DTYPES and x.dtype == weight.dtype)


def _packed_impl(original):
    """A megatron `_forward_impl` that multiplies through oneDNN where it applies."""

    def forward_impl(input, weight, bias, **kwargs):
        if not _applies(input, weight):
            return original(input=input, weight=weight, bias=bias, **kwargs)
        x = input.reshape(-1, input.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(x, packed_weight(weight), bias, "none", [], "")
        return y.view(*input.shape[:-1], y.shape[-1])

    return forward_impl


def _linears(model: torch.nn.Module):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module, enabled: bool = True):
    """Inside: the model's linears multiply through oneDNN's packed weights where that applies
    (see the module docstring); a no-op if not enabled, off the CPU or without oneDNN."""
    weight = next(model.parameters(), None)
    if not enabled or weight is None or weight.device.type != "cpu" or not available():
        yield
        return
    layers = _linears(model)
    originals = [m.__dict__.get("_forward_impl") for m in layers]
    try:
        for m in layers:
            m._forward_impl = _packed_impl(m._forward_impl)
        yield
    finally:
        for m, original in zip(layers, originals, strict=True):
            if original is None:
                m.__dict__.pop("_forward_impl", None)
            else:
                m._forward_impl = original
