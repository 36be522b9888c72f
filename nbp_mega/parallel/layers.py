"""Tensor-parallel building blocks: megatron-core layers behind a small factory.

Model code asks a `TensorParallel` for its linears, embedding and loss, and otherwise reads
like single-device PyTorch. With tp.size == 1 the same megatron layers degenerate to plain
ones. Weights are initialised on the CPU from the full ("master") tensor and then split, so the
same seed gives the same full weights at any TP size (what the TP=1 vs TP=2 test relies on).

Every sharded parameter carries megatron's attributes `tensor_model_parallel=True`,
`partition_dim` and `partition_stride`; `gather_tp_state` / `shard_tp_state` use them to move
state dicts between TP sizes.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from nbp_mega.parallel.dims import ParallelDims


class TensorParallel:
    """Factory for TP layers over one tensor-parallel group."""

    def __init__(self, dims: ParallelDims, params_dtype: torch.dtype = torch.float32,
                 init_std: float = 0.02):
        from megatron.core.model_parallel_config import ModelParallelConfig

        self.size, self.rank, self.group = dims.tp, dims.tp_rank, dims.tp_group
        self.init_std = init_std
        self.mp_config = ModelParallelConfig(
            tensor_model_parallel_size=dims.tp,
            use_cpu_initialization=True,  # no torch.cuda in init: runs on CPU hosts too
            perform_initialization=True,
            params_dtype=params_dtype,
            gradient_accumulation_fusion=False,  # needs a fused CUDA kernel
        )

    @property
    def _init(self):
        return functools.partial(nn.init.normal_, mean=0.0, std=self.init_std)

    def column(self, in_features: int, out_features: int, *, bias: bool) -> nn.Module:
        """y[..., out/tp] = x[..., in] W^T: output sharded, input replicated."""
        from megatron.core.tensor_parallel import ColumnParallelLinear

        return _FirstOutput(ColumnParallelLinear(
            in_features, out_features, config=self.mp_config, init_method=self._init,
            bias=bias, gather_output=False, tp_group=self.group))

    def row(self, in_features: int, out_features: int, *, bias: bool) -> nn.Module:
        """y[..., out] = x[..., in/tp] W^T, all-reduced: input sharded, output replicated."""
        from megatron.core.tensor_parallel import RowParallelLinear

        return _FirstOutput(RowParallelLinear(
            in_features, out_features, config=self.mp_config, init_method=self._init,
            bias=bias, input_is_parallel=True, skip_bias_add=False, tp_group=self.group))

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        """Token embedding sharded over the vocabulary; output replicated."""
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        return VocabParallelEmbedding(num_embeddings, dim, init_method=self._init,
                                      config=self.mp_config, tp_group=self.group)

    def vocab_range(self, vocab_size: int) -> tuple[int, int]:
        """[start, end) of the vocabulary held by this rank (vocab_size divisible by tp)."""
        per_rank = vocab_size // self.size
        return self.rank * per_rank, (self.rank + 1) * per_rank

    @staticmethod
    def cross_entropy(local_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-token loss from vocab-sharded logits [..., V/tp] (fp32), target [...]."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(local_logits, target)


class _FirstOutput(nn.Module):
    """Megatron linears return (output, bias); with bias already added we keep the output.

    The wrapped layer is stored as `.linear`, so state-dict keys read `<name>.linear.weight`.
    """

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)[0]


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def gather_tp_state(module: nn.Module, tp: TensorParallel,
                    tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Full (TP=1) tensors gathered from all TP ranks, on the CPU.

    By default the module's state dict; pass `tensors` (keyed by parameter name, e.g. the
    gradients) to gather something else laid out like the parameters.
    """
    params = dict(module.named_parameters())
    tensors = module.state_dict() if tensors is None else tensors
    out = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):  # megatron's `_extra_state` entries
            out[name] = tensor
            continue
        tensor = tensor.detach()
        p = params.get(name)
        if p is not None and is_tp_sharded(p) and tp.size > 1:
            parts = [torch.empty_like(tensor) for _ in range(tp.size)]
            dist.all_gather(parts, tensor.contiguous(), group=tp.group)
            tensor = torch.cat(parts, dim=p.partition_dim)
        out[name] = tensor.cpu().clone()
    return out


def shard_tp_state(module: nn.Module, full: dict[str, torch.Tensor],
                   tp: TensorParallel) -> dict[str, torch.Tensor]:
    """Cut a full state dict into this rank's shards, ready for `module.load_state_dict`."""
    params = dict(module.named_parameters())
    out = {}
    for name, tensor in full.items():
        p = params.get(name)
        if p is not None and is_tp_sharded(p):
            tensor = tensor.chunk(tp.size, dim=p.partition_dim)[tp.rank]
        out[name] = tensor.clone() if isinstance(tensor, torch.Tensor) else tensor
    return out
