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
