"""Collectives go through nbp_mega.parallel.collectives, on the device their backend needs.

The NCCL evaluation crash (a CPU tensor all-reduced over NCCL) cannot happen on gloo, so the
CPU tier checks the two things that prevent it: no code outside nbp_mega/parallel/ calls a
torch.distributed collective itself, and the helper puts tensors where each backend wants
them (also on a one-rank group, so a single-GPU run exercises every call). The `gpu` test
runs the helper over a real NCCL group.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
import torch.distributed as dist

from nbp_mega.parallel import collectives
from tests.spawn import run_distributed

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "nbp_mega"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
               "reduce_scatter", "reduce_scatter_tensor", "broadcast", "broadcast_object_list",
               "reduce", "gather", "scatter", "all_to_all", "all_to_all_single"}


def direct_collective_calls(path: pathlib.Path) -> list[str]:
    """`dist.<collective>(...)` / `torch.distributed.<collective>(...)` calls in a file."""
    found = []
    name = path.relative_to(PACKAGE.parent) if PACKAGE.parent in path.parents else path.name
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            if node.func.attr in COLLECTIVES and owner in ("dist", "torch.distributed"):
                found.append(f"{name}:{node.lineno}")
    return found


def test_collectives_only_inside_parallel_package():
    calls = [c for f in sorted(PACKAGE.rglob("*.py")) if "parallel" not in f.parts
             for c in direct_collective_calls(f)]
    assert not calls, ("call nbp_mega.parallel.collectives instead of torch.distributed "
                       f"(NCCL needs CUDA tensors): {calls}")


def test_direct_call_detector_finds_them(tmp_path):
    sample = tmp_path / "probe.py"
    sample.write_text("import torch.distributed as dist\nimport torch\ndist.all_reduce(x)\n"
                      "torch.distributed.all_gather_object(out, x)\ndist.barrier()\n")
    assert direct_collective_calls(sample) == ["probe.py:3", "probe.py:4"]


def test_backend_device(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.backend_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collectives.backend_device() == torch.device("cpu")


def test_one_rank_group_still_runs_the_collective(dims, monkeypatch):
    seen = []
    real = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        seen.append(tensor.device)
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", recording)
    values = torch.tensor([3.0, 5.0])
    assert collectives.all_reduce_(values, dims.dp_group, mean=True) is values
    assert seen == [torch.device("cpu")] and values.tolist() == [3.0, 5.0]


def _reduce_worker():
    from nbp_mega.parallel.dims import ParallelConfig, init_parallel, shutdown_parallel

    d = init_parallel(ParallelConfig(backend="gloo"))
    total = collectives.all_reduce_(torch.tensor([d.rank + 1.0, 1.0]), d.dp_group)
    mean = collectives.all_reduce_(torch.tensor([d.rank * 2.0]), d.dp_group, mean=True)
    grads = [torch.full((2, 2), float(d.rank)), torch.full((3,), 10.0 * d.rank)]
    collectives.all_reduce_mean_(grads, d.dp_group)
    gathered = collectives.all_gather_objects({"rank": d.rank}, d.dp_group)
    shutdown_parallel()
    return total.tolist(), mean.tolist(), [g.tolist() for g in grads], gathered


@pytest.mark.distributed
def test_reductions_over_two_ranks():
    for total, mean, grads, gathered in run_distributed(_reduce_worker, world_size=2):
        assert total == [3.0, 2.0] and mean == [1.0]
        assert grads == [[[0.5, 0.5], [0.5, 0.5]], [5.0, 5.0, 5.0]]
        assert gathered == [{"rank": 0}, {"rank": 1}]


def _nccl_worker():
    from nbp_mega.parallel.dims import ParallelConfig, init_parallel, shutdown_parallel

    d = init_parallel(ParallelConfig(backend="nccl"))
    on_cpu = collectives.all_reduce_(torch.tensor([2.0, 4.0], dtype=torch.float64),
                                     d.dp_group, mean=True)
    on_gpu = collectives.all_reduce_(torch.ones(3, device=d.device), d.dp_group)
    shutdown_parallel()
    return on_cpu.device.type, on_cpu.tolist(), on_gpu.device.type, on_gpu.tolist()


@pytest.mark.gpu
def test_nccl_takes_cpu_and_gpu_tensors():
    assert run_distributed(_nccl_worker, world_size=1) == [("cpu", [2.0, 4.0], "cuda",
                                                            [1.0, 1.0, 1.0])]
