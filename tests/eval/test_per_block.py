"""Validation scores by position (nbp_mega.eval.per_block) against the model's own loss and
full logits, for NBP row blocks, NTP tokens, and a model without a start block."""

from __future__ import annotations

import pytest
import torch

from nbp_mega.data.loader import eval_batches
from nbp_mega.data.shards import ShardIndex, expand_shards
from nbp_mega.data.synthetic import write_synthetic_shards
from nbp_mega.eval.per_block import plot_position_scores, position_scores
from nbp_mega.model import NBPTransformer
from nbp_mega.parallel.layers import TensorParallel
from tests.conftest import tiny_model_config

GRID = (2, 4, 8)


@pytest.fixture(scope="module")
def val_index(tmp_path_factory):
    out = tmp_path_factory.mktemp("per_block")
    write_synthetic_shards(str(out), num_train=8, num_val=12, grid=GRID, vocab=50, classes=3,
                           shard_size=8)
    index = ShardIndex.build(expand_shards(str(out / "val")))
    yield index
    index.close()


def direct_scores(model, index, batch_size, max_batches):
    """Per-target loss from model(ids, targets) and accuracy from all logits at once ->
    [clips, Nt] each."""
    loss, correct = [], []
    for batch in eval_batches(index, batch_size=batch_size, dp_rank=0, dp_size=1,
                              max_batches=max_batches, grid=GRID, vocab_size=50):
        ids, targets = model.layout.build(batch.tokens, batch.labels)
        with torch.no_grad():
            loss.append(model(ids, targets).double())
            h = model.hidden_states(ids)[:, 1 : 1 + targets.shape[1]]  # 1 class token
            correct.append((model.logits(h).argmax(-1) == targets).double())
    return torch.cat(loss), torch.cat(correct)


@pytest.mark.parametrize("block", [[1, 1, 8], [1, 1, 1]], ids=["nbp_rows", "ntp"])
def test_scores_by_row_and_frame_are_the_models_loss_and_accuracy(dims, val_index, block):
    """Row blocks and raster-order tokens both list targets row by row, so row r is targets
    r*W..(r+1)*W-1 and frame t is rows t*H..: the reshaped per-target scores."""
    torch.manual_seed(0)
    cfg = tiny_model_config(block_shape=block, num_classes=3, loss_chunk=24)
    model = NBPTransformer(cfg, TensorParallel(dims, init_std=0.5)).eval()  # far from uniform
    scores = position_scores(model, val_index, batch_size=4, max_batches=2, dims=dims)
    loss, correct = direct_scores(model, val_index, 4, 2)
    T, H, W = GRID
    assert scores["clips"] == 8
    for view, shape in (("row", (T * H, W)), ("frame", (T, H * W))):
        for key, x in (("loss", loss), ("accuracy", correct)):
            expected = x.view(8, *shape).mean(dim=(0, 2))
            torch.testing.assert_close(torch.tensor(scores[view][key], dtype=torch.float64),
                                       expected, rtol=1e-5, atol=1e-6)
    blocks = loss.view(8, -1, cfg.block_shape[2]).mean(dim=(0, 2))
    torch.testing.assert_close(torch.tensor(scores["block"]["loss"], dtype=torch.float64),
                               blocks, rtol=1e-5, atol=1e-6)
    assert scores["loss"] == pytest.approx(float(loss.mean()), rel=1e-5)
    assert 0 < scores["accuracy"] == pytest.approx(float(correct.mean()), rel=1e-6)


def test_a_given_first_block_has_no_score_and_the_plot_is_written(dims, val_index, tmp_path):
    """Without a start block, block 0 (row 0) is given, never predicted: None, not NaN or 0."""
    torch.manual_seed(0)
    cfg = tiny_model_config(num_classes=3, start_block=False)
    model = NBPTransformer(cfg, TensorParallel(dims, init_std=cfg.init_std)).eval()
    scores = position_scores(model, val_index, batch_size=4, max_batches=1, dims=dims)
    assert scores["row"]["loss"][0] is None and scores["block"]["accuracy"][0] is None
    assert all(x is not None for x in scores["row"]["loss"][1:])
    assert len(scores["frame"]["loss"]) == 2 and scores["frame"]["loss"][0] is not None
    path = tmp_path / "per_block.png"
    plot_position_scores({"nbp": scores}, GRID, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
