"""A trained run's checkpoint loads for sampling (ZeRO-3, ZeRO-2 with the optimizer offloaded
to the CPU, ZeRO-0): the loaded weights are the trained ones when their validation loss equals
the one the run logged, and they (and the Hugging Face export's) equal what DeepSpeed's
zero_to_fp32 gathers. (Tensor-parallel checkpoints: test_tp.py; tools/sample.py:
test_sample_cli.py; the export: tests/export/.)"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from nbp_mega.data.loader import TextSpec, build_loaders, eval_batches
from nbp_mega.export import export_hf, open_checkpoint
from nbp_mega.export.weights import export_name
from nbp_mega.generate.load import load_trained_model
from nbp_mega.metrics import read_metrics
from nbp_mega.parallel.tp_shards import TPPlan
from nbp_mega.parallel.zero_checkpoint import CheckpointError, TrainingCheckpoint
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
    """Mean validation loss per target of the run's first eval batches, conditioned as the
    trainer conditions them (class labels, or the shards' text for text models)."""
    text = TextSpec.from_model(cfg.model)
    _, val_index = build_loaders(cfg.data, seed=cfg.seed, global_batch=cfg.train.global_batch,
                                 dp_rank=0, dp_size=1, grid=tuple(cfg.model.grid),
                                 vocab_size=cfg.model.vocab_size)
    total = count = 0.0
    with torch.no_grad():
        for batch in eval_batches(val_index, batch_size=cfg.train.global_batch, dp_rank=0,
                                  dp_size=1, max_batches=cfg.train.eval_batches,
                                  grid=tuple(cfg.model.grid), vocab_size=cfg.model.vocab_size,
                                  text=text):
            labels = batch.labels if text is None and model.layout.prefix_len else None
            loss = model(*model.layout.build(batch.tokens, labels, text=batch.text))
            total, count = total + loss.double().sum().item(), count + loss.numel()
    return total / count


@pytest.mark.parametrize("zero_stage", [3, 2, 0])
def test_trained_weights_load_and_sample(shards, tmp_path, dims, zero_stage):
    run_dir = tmp_path / "run"
    # The ZeRO-0 run also trains for guidance: a no-condition token, dropped half the time.
    extra = ["model.cond_dropout=0.5"] if zero_stage == 0 else []
    if zero_stage == 2:  # and the optimizer offloaded to the CPU
        extra = ["parallel.offload_optimizer=true"]
    args = overrides(shards, run_dir, f"parallel.zero_stage={zero_stage}", "train.steps=3",
                     "train.eval_every=0", *extra)
    run([sys.executable, "-m", "nbp_mega.train", f"{ROOT}/configs/tiny.yaml", *args],
        cwd=tmp_path)
    logged = read_metrics(os.path.join(run_dir, "metrics.jsonl"))[1][-1]["val_loss"]
    model, cfg = load_trained_model(str(run_dir), dims=dims)
    assert validation_loss(model, cfg) == pytest.approx(logged, rel=1e-5)
    if zero_stage:  # DeepSpeed's own gathering (it reads TP=1 checkpoints) agrees with ours
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        folder = run_dir / "checkpoints"
        tag = (folder / "latest").read_text().strip()
        theirs = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
        ours = TrainingCheckpoint(str(folder / tag)).full_state_dict(TPPlan.of(model))
        assert theirs.keys() == {k for k, v in ours.items() if torch.is_tensor(v)}
        for name, tensor in theirs.items():
            assert torch.equal(ours[name], tensor), name
        # and so does the Hugging Face export (padded vocabulary rows dropped)
        export_hf(*open_checkpoint(str(run_dir)), tmp_path / "hf")
        exported = load_file(tmp_path / "hf" / "model.safetensors")
        assert exported.keys() == {export_name(k) for k in theirs}
        for name, tensor in theirs.items():
            mine = exported[export_name(name)]
            assert torch.equal(mine, tensor[:mine.shape[0]]), name


def test_a_missing_run_or_checkpoint_is_named(tmp_path, dims):
    with pytest.raises(FileNotFoundError, match="neither config.yaml nor trainer_state.json"):
        load_trained_model(str(tmp_path), dims=dims)
    (tmp_path / "config.yaml").write_text("parallel:\n  tensor: 2\n")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint latest in .*checkpoints"):
        load_trained_model(str(tmp_path), dims=dims)
    folder = tmp_path / "checkpoints" / "step_00000001"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(
        '{"layout": {"tp": 2, "dp": 1, "zero_stage": 1, "precision": "fp32"}}')
    with pytest.raises(CheckpointError, match=r"missing mp_rank_00_model_states.pt, .*A "
                       r"complete ZeRO-1 fp32, tp=2 x dp=1 checkpoint has 4 files"):
        load_trained_model(str(tmp_path), "step_00000001", dims=dims)
    with pytest.raises(ValueError, match=r"is checkpoint step_00000001, the checkpoint name "
                       r"given is step_00000002: expected one of the two"):
        load_trained_model(str(folder), "step_00000002", dims=dims)
