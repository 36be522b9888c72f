"""ZeRO-3's gradient averaging on gloo: the in-place all-reduce gives DeepSpeed's results."""

from __future__ import annotations

import pytest
import torch

from tests.spawn import run_distributed

SIZES = [7, 64, 1, 33, 2, 1000]  # odd sizes: uneven and empty last partitions


def _compare(world: int):
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.comm.coalesced_collectives import reduce_scatter_coalesced

    from nbp_mega.parallel.gloo_grads import (_adjacent_flat_view,
                                              reduce_scatter_coalesced_allreduce)

    dist.init_process_group("gloo")
    deepspeed.init_distributed("gloo", dist_init_required=False)
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    bucket = torch.randn(sum(SIZES), generator=g)  # as ZeRO-3's bucket: adjacent views
    out = {}
    for layout in ("bucket", "separate"):
        grads = list(bucket.clone().split(SIZES))
        if layout == "separate":
            grads = [t.clone() for t in grads]
        else:
            assert _adjacent_flat_view(grads) is not None
        theirs = reduce_scatter_coalesced([t.clone() for t in grads])
        ours = reduce_scatter_coalesced_allreduce(grads)
        out[layout] = ([t.clone() for t in theirs], [t.clone() for t in ours])
    dist.destroy_process_group()
    return out


@pytest.mark.distributed
def test_allreduce_gives_deepspeeds_partitions():
    for rank_out in run_distributed(_compare, 2, (2,)):
        for layout, (theirs, ours) in rank_out.items():
            assert [t.numel() for t in ours] == [t.numel() for t in theirs], layout
            for a, b in zip(ours, theirs, strict=True):
                assert torch.equal(a, b), layout  # 2 ranks: a + b in either order, exact


def test_adjacent_flat_view():
    from nbp_mega.parallel.gloo_grads import _adjacent_flat_view

    buf = torch.arange(10.0)
    views = [buf[0:3].view(3, 1), buf[3:7], buf[7:10]]
    flat = _adjacent_flat_view(views)
    assert flat is not None and torch.equal(flat, buf)
    flat.mul_(2)  # a view: writes reach the gradients
    assert torch.equal(views[1], torch.tensor([6.0, 8.0, 10.0, 12.0]))
    assert _adjacent_flat_view([buf[0:3], buf[4:7]]) is None  # a gap
    assert _adjacent_flat_view([buf[3:6], buf[0:3]]) is None  # out of order
    assert _adjacent_flat_view([buf[0:3], torch.zeros(2)]) is None  # another storage
    assert _adjacent_flat_view([buf.view(2, 5).t()]) is None  # not contiguous
