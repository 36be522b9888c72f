"""The step-time breakdown: operators land in their categories and add up to the wall time."""

from __future__ import annotations

import json

import pytest
import torch

from nbp_mega.ops import block_causal_attention
from nbp_mega.profiling import CATEGORIES, StepProfiler, record_function


def test_steps_are_profiled_and_split_into_categories(tmp_path):
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.AdamW(model.parameters())
    profiler = StepProfiler(str(tmp_path), start=2, steps=2, rank=3)
    for step in range(1, 5):
        with profiler.step(step):
            with record_function("nbp.data"):
                x = torch.randn(512, 256)
            q = model(x).view(1, 4, 512, 64)  # [B, N, S, D]
            loss = block_causal_attention(q, q, q, 16).sum()
            loss.backward()
            with record_function("nbp.optimizer"):
                opt.step()
                opt.zero_grad()
        assert (profiler.result is not None) == (step >= 3)  # written after the last profiled
    with open(tmp_path / "profile_rank3.json") as f:
        result = json.load(f)
    assert result == json.loads(json.dumps(profiler.result))
    assert result["steps"] == 2 and set(result["seconds"]) == set(CATEGORIES)
    for category in ("attention", "matmul", "optimizer", "data"):
        assert result["seconds"][category] > 0, category
    assert result["seconds"]["communication"] == 0
    assert sum(result["seconds"].values()) == pytest.approx(result["wall_seconds"], rel=1e-6)
    assert (tmp_path / "trace_rank3.json").stat().st_size > 0


def test_profiler_off_does_nothing(tmp_path):
    profiler = StepProfiler(str(tmp_path), start=1, steps=0)
    with profiler.step(1):
        torch.ones(3).sum()
    assert profiler.result is None and not list(tmp_path.iterdir())


def _profile_a_wait():
    import time

    import torch.distributed as dist

    dist.init_process_group("gloo")
    x, out = torch.randn(4_000_000), torch.empty(8_000_000)
    a = torch.randn(256, 256)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        handle = dist.all_gather_into_tensor(out, x, async_op=True)
        for _ in range(3):
            a @ a
        waiting = time.perf_counter()
        handle.wait()
        dist.all_reduce(x)
        end = time.perf_counter()
    dist.destroy_process_group()
    from nbp_mega.profiling import breakdown

    return breakdown(prof, end - start)["seconds"], end - waiting


@pytest.mark.distributed
def test_waiting_for_a_collective_counts_as_communication():
    """gloo runs collectives on its own threads; the step's thread waits outside any operator:
    that wait is communication, not "other"."""
    from tests.spawn import run_distributed

    for seconds, waited in run_distributed(_profile_a_wait, 2):
        assert seconds["communication"] >= 0.5 * waited > 0
        assert seconds["communication"] <= sum(seconds.values())
