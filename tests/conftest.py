"""Shared fixtures: a one-process job (megatron + torch.distributed) and tiny configs."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from nbp_mega.model.config import ModelConfig

# DeepSpeed JIT-builds its CPU ops (the shared-memory collectives: ~45 s here; CPU Adam) on
# first use, into TORCH_EXTENSIONS_DIR. One folder per venv for the whole session, inherited
# by every job a test launches: built once, and never mixed with another venv's torch.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


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


@pytest.fixture(scope="session")
def tp2_run(tmp_path_factory):
    """A run dir trained 2 steps at parallel.tensor=2 x dp=2, ZeRO-3 on 4 gloo ranks (the
    layout DeepSpeed's zero_to_fp32 refuses), checkpoint at the end; the vocabulary padded
    (32 video ids -> 48 head rows) so that exports have rows to drop."""
    from nbp_mega.data.synthetic import write_synthetic_shards
    from tests.test_train import ROOT, overrides, run

    tmp = tmp_path_factory.mktemp("tp2_run")
    write_synthetic_shards(str(tmp / "data"), num_train=64, num_val=16, grid=(2, 4, 8),
                           vocab=32, classes=4, shard_size=16, seed=0, noise=0.02)
    run_dir = tmp / "run"
    run(["bash", f"{ROOT}/launch.sh", f"{ROOT}/configs/tiny.yaml",
         *overrides(tmp / "data", run_dir, "parallel.tensor=2", "parallel.zero_stage=3",
                    "train.steps=2", "train.eval_every=0", "model.vocab_pad_multiple=24")],
        cwd=tmp, NPROC_PER_NODE="4")
    return run_dir
