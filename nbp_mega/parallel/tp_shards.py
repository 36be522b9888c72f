"""Tensor-parallel shards of a state dict: merge the TP ranks' tensors into full ones, split.

Legend: tp tensor-parallel size; r a TP rank (0 <= r < tp).

Which dimension a tensor is split along comes from the module that owns it, not from its name:
megatron-core's layers mark their parameters with `tensor_model_parallel`, `partition_dim`
and `partition_stride`:
    ColumnParallelLinear    weight [out/tp, in], bias [out/tp]   split along dim 0
    RowParallelLinear       weight [out, in/tp]                   split along dim 1
                            bias [out]                            replicated
    VocabParallelEmbedding  weight [Vp/tp, d]                     split along dim 0
Everything else (norms, position tables, persistent buffers) is replicated on every TP rank.
Our fused qkv rows are ordered [N, 3, D], so a contiguous dim-0 split hands each rank whole
heads and a plain concatenation merges them (stride 1). The padded vocabulary rows of the
embedding and the head stay: our model has them (an export drops them).

    plan = TPPlan.of(model)                   # from a live (or meta-device) model, any TP
    full = plan.merge([shard_0, shard_1])     # TP=2 checkpoint shards -> TP=1 tensors
    mine = plan.split(full, tp=2, rank=1)     # -> what TP rank 1 of a TP=2 model loads
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nbp_mega.parallel.collectives import tensor_parallel_group

log = logging.getLogger("nbp_mega.parallel")


def param_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's (TP-local) shape, whether or not ZeRO-3 has partitioned it (then
    `p.shape` is empty and DeepSpeed keeps the shape in `ds_shape`)."""
    return getattr(p, "ds_shape", p.shape)


class ShardError(ValueError):
    """State-dict shards that do not fit the model: keys, shapes or sizes."""


@dataclass(frozen=True)
class TPPlan:
    """Per state-dict tensor: the dimension split over TP (None = replicated), full shape."""

    dims: dict[str, int | None]
    shapes: dict[str, tuple[int, ...]]  # at TP=1

    @classmethod
    def of(cls, module: nn.Module, tp: int | None = None) -> TPPlan:
        """The plan of `module`, built at TP size `tp` (default: its megatron layers' group's)."""
        if tp is None:
            group = tensor_parallel_group(module)
            tp = 1 if group is None else group.size()
        dims, shapes = {}, {}
        for name, p in module.named_parameters():
            dim = _partition_dim(name, p)
            shape = list(param_shape(p))
            if dim is not None:
                shape[dim] *= tp
            dims[name], shapes[name] = dim, tuple(shape)
        for name, value in module.state_dict(keep_vars=True).items():
            if torch.is_tensor(value) and name not in dims:  # persistent buffers
                dims[name], shapes[name] = None, tuple(value.shape)
        return cls(dims, shapes)

    def merge(self, shards: Sequence[Mapping[str, object]]) -> dict[str, object]:
        """Full (TP=1) state dict from the shards of TP ranks 0..tp-1, in rank order.

        Non-tensor entries (megatron's `_extra_state`) come from rank 0.
        """
        if not shards:
            raise ShardError("no tensor-parallel shards to merge: expected one per TP rank")
        for r, shard in enumerate(shards):
            self.check_keys(shard, f"TP rank {r}'s shard")
        full = {k: v for k, v in shards[0].items() if not torch.is_tensor(v)}
        for name in self.dims:
            full[name] = self.merge_tensor(name, [shard[name] for shard in shards])
        return full

    def split(self, full: Mapping[str, object], tp: int, rank: int) -> dict[str, object]:
        """TP rank `rank`'s shard of a full state dict, for a model built at TP size `tp`."""
        self.check_keys(full, "the full state dict")
        out = {k: v for k, v in full.items() if not torch.is_tensor(v)}
        for name in self.dims:
            out[name] = self.split_tensor(name, full[name], tp, rank)
        return out

    def merge_tensor(self, name: str, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """One full tensor from its TP ranks' parts (rank order), checked against the plan.

        A replicated tensor comes from rank 0; a rank whose copy differs is logged (training
        keeps them equal).
        """
        dim = self.dims[name]
        if dim is None:
            _check_replicas(name, parts)
            full = parts[0]
        else:
            full = torch.cat(list(parts), dim=dim) if len(parts) > 1 else parts[0]
        self._check_shape(name, full, f"merged from {len(parts)} TP shards")
        return full

    def split_tensor(self, name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
        """TP rank `rank`'s part (a copy) of the full tensor `name`, at TP size `tp`."""
        if not 0 <= rank < tp:
            raise ShardError(f"TP rank {rank} is outside a tensor-parallel size of {tp}")
        self._check_shape(name, full, "given as a full tensor")
        dim = self.dims[name]
        if dim is not None:
            size = self.shard_shape(name, tp)[dim]
            full = full.narrow(dim, rank * size, size)
        return full.clone()  # the full tensor can be freed

    def shard_shape(self, name: str, tp: int) -> tuple[int, ...]:
        """The shape of `name` on each rank of a model built at TP size `tp`."""
        shape, dim = list(self.shapes[name]), self.dims[name]
        if dim is not None:
            if shape[dim] % tp:
                raise ShardError(f"{name} {tuple(shape)}: dimension {dim} does not split into "
                                 f"{tp} tensor-parallel shards")
            shape[dim] //= tp
        return tuple(shape)

    def check_keys(self, state: Mapping[str, object], what: str) -> None:
        """Raise ShardError unless the tensors of `state` are exactly the plan's."""
        self.check_names([k for k, v in state.items() if torch.is_tensor(v)], what)

    def check_names(self, names: Iterable[str], what: str) -> None:
        """Raise ShardError unless `names` are exactly the plan's tensors."""
        names = set(names)
        missing, extra = sorted(set(self.dims) - names), sorted(names - set(self.dims))
        if missing or extra:
            raise ShardError(f"{what} does not fit the model: missing {_few(missing)}, "
                             f"unexpected {_few(extra)} (a checkpoint of another model config?)")

    def _check_shape(self, name: str, tensor: torch.Tensor, how: str) -> None:
        if tuple(tensor.shape) != self.shapes[name]:
            raise ShardError(f"{name} {how} has shape {tuple(tensor.shape)}; the model expects "
                             f"{self.shapes[name]} (a checkpoint of another model config?)")


def _partition_dim(name: str, p: torch.Tensor) -> int | None:
    if not getattr(p, "tensor_model_parallel", False):
        return None
    stride = getattr(p, "partition_stride", 1)
    if stride != 1:  # megatron's strided split interleaves the ranks' rows: not used here
        raise ShardError(f"{name}: partition_stride={stride}; only contiguous TP splits "
                         "(stride 1) are supported")
    return int(p.partition_dim)


def _check_replicas(name: str, parts: list[torch.Tensor]) -> None:
    for r, part in enumerate(parts[1:], start=1):
        if part.shape != parts[0].shape:
            raise ShardError(f"{name} is replicated over TP but has shape {tuple(part.shape)} "
                             f"on TP rank {r} and {tuple(parts[0].shape)} on rank 0")
        if not torch.equal(part, parts[0]):
            diff = (part.double() - parts[0].double()).abs().max().item()
            log.warning("%s differs between TP ranks 0 and %d (max |diff| %.3g): using rank "
                        "0's copy", name, r, diff)


def _few(names: list[str]) -> str:
    if not names:
        return "none"
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
