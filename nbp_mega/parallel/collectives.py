"""Collectives on the device their backend needs: the one way the rest of the tree reduces.

NCCL accepts only CUDA tensors and gloo's reductions are CPU ones, while the values we reduce
(losses, counts, digests) are made wherever the model runs. A CPU tensor handed to NCCL kills
a multi-GPU job (the evaluation at step 2000 did, before its first checkpoint), so code outside
nbp_mega/parallel/ never calls torch.distributed's collectives itself: it calls these, which
move the tensor to `backend_device(group)` and back only when it is elsewhere. None of them
syncs the host. A one-rank group still runs the collective (it is cheap): a single-GPU NCCL
run then checks every call's device, as tools/gpu_check.sh does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def backend_device(group=None) -> torch.device:
    """Where a tensor must live for a collective over `group`: its backend's device."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")  # gloo, mpi


def group_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def all_reduce_(tensor: torch.Tensor, group=None, *, mean: bool = False) -> torch.Tensor:
    """Sum (or average) `tensor` in place over `group`; returns it."""
    if not dist.is_initialized():
        return tensor
    device = backend_device(group)
    moved = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(moved, group=group)
    if mean:
        moved /= group_size(group)
    if moved is not tensor:
        tensor.copy_(moved)  # blocking: a device-to-host copy must be complete when read
    return tensor


def all_reduce_mean_(tensors: list[torch.Tensor], group=None) -> None:
    """Average many tensors in place with one collective (e.g. a module's gradients)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    all_reduce_(flat, group, mean=True)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(part.view_as(t))


def all_gather_objects(obj, group=None) -> list:
    """Every rank's picklable `obj`, in rank order (torch moves the bytes for the backend)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * group_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_last_dim(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's `tensor` [..., n] along the last dim, in rank order: [..., n *
    group size] on every rank (e.g. vocab-sharded logits -> full-vocabulary logits)."""
    if not dist.is_initialized() or group_size(group) == 1:
        return tensor  # a one-rank gather only copies: generation calls this every step
    device = backend_device(group)
    local = tensor.to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(group_size(group))]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=-1).to(tensor.device)


def tensor_parallel_group(model: torch.nn.Module):
    """The TP process group `model`'s megatron layers were built with (None: it has none).

    Megatron's layers keep the group they were given as `.tp_group`; reading it back lets code
    outside nbp_mega/parallel/ gather over it without holding megatron objects itself.
    """
    for module in model.modules():
        group = getattr(module, "tp_group", None)
        if group is not None:
            return group
    return None
