"""A trained run's checkpoint loads for sampling (ZeRO-3 and ZeRO-0) and tools/sample.py
writes what nbp_mega.generate gives: the loaded weights are the trained ones when their
validation loss equals the one the run logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from nbp_mega.config_fields import ConfigError
from nbp_mega.data.loader import build_loaders, eval_batches
from nbp_mega.generate import SamplingConfig, generate
from nbp_mega.generate.load import load_trained_model
from nbp_mega.metrics import read_metrics
from tests.test_train import ROOT, overrides, run

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from nbp_mega.data.synthetic import write_synthetic_shards

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_shards(str(out), num_train=64, num_val=16, grid=(2, 4, 8), vocab=32,
                           classes=4, shard_size=16, seed=0, noise=0.02)
    return out


def validation_loss(model, cfg) -> float:
    _, val_index = build_loaders(cfg.data, seed=cfg.seed, global_batch=cfg.train.global_batch,
                                 dp_rank=0, dp_size=1, grid=tuple(cfg.model.grid),
                                 vocab_size=cfg.model.vocab_size)
    total = count = 0.0
    with torch.no_grad():
        for batch in eval_batches(val_index, batch_size=cfg.train.global_batch, dp_rank=0,
                                  dp_size=1, max_batches=cfg.train.eval_batches,
                                  grid=tuple(cfg.model.grid), vocab_size=cfg.model.vocab_size):
            input_ids, targets = model.layout.build(batch.tokens, batch.labels)
            loss = model(input_ids, targets)
            total, count = total + loss.double().sum().item(), count + loss.numel()
    return total / count


@pytest.mark.parametrize("zero_stage", [3, 0])
def test_trained_weights_load_and_sample(shards, tmp_path, dims, zero_stage):
    run_dir = tmp_path / "run"
    # The ZeRO-0 run also trains for guidance: a no-condition token, dropped half the time.
    extra = ["model.cond_dropout=0.5"] if zero_stage == 0 else []
    args = overrides(shards, run_dir, f"parallel.zero_stage={zero_stage}", "train.steps=3",
                     "train.eval_every=0", *extra)
    run([sys.executable, "-m", "nbp_mega.train", f"{ROOT}/configs/tiny.yaml", *args],
        cwd=tmp_path)
    logged = read_metrics(os.path.join(run_dir, "metrics.jsonl"))[1][-1]["val_loss"]
    model, cfg = load_trained_model(str(run_dir), dims=dims)
    assert validation_loss(model, cfg) == pytest.approx(logged, rel=1e-5)
    if zero_stage:
        return
    out = tmp_path / "samples.npy"
    proc = subprocess.run([sys.executable, f"{ROOT}/tools/sample.py", str(run_dir), "--out",
                           str(out), "--num", "3", "--seed", "5", "--temperature", "0",
                           "--guidance-scale", "2"],
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k not in (
                              "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                              "MASTER_PORT")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = np.load(out)
    meta = json.loads((tmp_path / "samples.npy.json").read_text())
    assert meta["seeds"] == [5, 6, 7] and meta["labels"] == [0, 1, 2]
    expected = generate(model, seeds=[5, 6, 7], labels=torch.tensor([0, 1, 2]),
                        sampling=SamplingConfig(temperature=0.0, guidance_scale=2.0))
    assert np.array_equal(tokens, expected.numpy())


def test_tensor_parallel_runs_are_refused_for_now(tmp_path, dims):
    (tmp_path / "config.yaml").write_text("parallel:\n  tensor: 2\n")
    with pytest.raises(ConfigError, match="parallel.tensor=2"):
        load_trained_model(str(tmp_path), dims=dims)
