"""Shared fixtures: a one-process job (megatron + torch.distributed) and tiny configs."""

from __future__ import annotations

import pytest
import torch

from nbp_mega.model.config import ModelConfig


def has_gpu() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def dims():
    """A job of one process: TP=1, DP=1 (megatron's groups exist, as the layers need)."""
    from nbp_mega.parallel.dims import ParallelConfig, init_parallel, shutdown_parallel

    d = init_parallel(ParallelConfig(tensor=1))
    yield d
    shutdown_parallel()


def tiny_model_config(**changes) -> ModelConfig:
    """A model small enough for unit tests: 2 layers, d=32, grid 2x4x8."""
    base = dict(family="gpt", size="tiny", layers=2, hidden=32, heads=4, grid=[2, 4, 8],
                block_shape=[1, 1, 8], vocab_size=50, num_classes=0, dropout=0.0,
                vocab_pad_multiple=16)
    base.update(changes)
    return ModelConfig(**base).resolved()
