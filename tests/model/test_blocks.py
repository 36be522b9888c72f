"""Block layouts and the NBP training sequence: who predicts whom."""

from __future__ import annotations

import itertools

import pytest
import torch

from nbp_mega.config_fields import ConfigError
from nbp_mega.model.blocks import BlockLayout
from nbp_mega.model.sequence import SequenceLayout
from tests.conftest import tiny_model_config

GRID = (2, 4, 8)
SHAPES = [(1, 1, 1), (1, 1, 8), (1, 4, 8), (1, 2, 2), (2, 1, 4), (2, 2, 2), (1, 2, 4)]


def expected_blocks(grid, block):
    """Raster indices of each block's tokens, enumerated with plain loops."""
    (T, H, W), (bt, bh, bw) = grid, block
    blocks = []
    for t0, h0, w0 in itertools.product(range(0, T, bt), range(0, H, bh), range(0, W, bw)):
        blocks.append([t * H * W + h * W + w for t, h, w in itertools.product(
            range(t0, t0 + bt), range(h0, h0 + bh), range(w0, w0 + bw))])
    return blocks


@pytest.mark.parametrize("block", SHAPES)
def test_block_order_matches_loops(block):
    layout = BlockLayout(GRID, block)
    blocks = expected_blocks(GRID, block)
    assert layout.order.tolist() == [i for b in blocks for i in b]
    tokens = torch.randint(0, 100, (3, *GRID))
    assert torch.equal(layout.from_blocks(layout.to_blocks(tokens)), tokens)


@pytest.mark.parametrize("block", SHAPES)
@pytest.mark.parametrize("start_block", [True, False])
def test_token_j_of_block_i_predicts_token_j_of_block_i_plus_1(block, start_block):
    cfg = tiny_model_config(grid=list(GRID), block_shape=list(block), vocab_size=1000,
                            num_classes=3, class_tokens=2, start_block=start_block)
    seq = SequenceLayout(cfg)
    blocks = expected_blocks(GRID, block)
    L, P = len(blocks[0]), 2
    tokens = torch.arange(64).view(1, *GRID)  # token value = raster index
    input_ids, targets = seq.build(tokens, torch.tensor([2]))
    assert input_ids.shape[1] == seq.seq_len and targets.shape[1] == seq.num_targets
    assert input_ids[0, :P].tolist() == [seq.class_offset + 2] * P
    first_video = P + (L if start_block else 0)
    if start_block:
        assert input_ids[0, P:first_video].tolist() == [seq.start_token] * L
    for i, j in itertools.product(range(len(blocks) - 1), range(L)):
        pos = first_video + i * L + j  # input position of token j of video block i
        assert input_ids[0, pos] == blocks[i][j]
        assert targets[0, pos - P] == blocks[i + 1][j]
    if start_block:  # the start block predicts block 0
        assert targets[0, :L].tolist() == blocks[0]


def test_block_must_tile_grid():
    with pytest.raises(ConfigError, match="does not tile"):
        BlockLayout((5, 16, 16), (2, 1, 16))
    with pytest.raises(ConfigError, match="3 positive ints"):
        BlockLayout((5, 16), (1, 1, 16))


def test_labels_checked():
    seq = SequenceLayout(tiny_model_config(num_classes=3))
    with pytest.raises(ValueError, match="model.num_classes"):
        seq.build(torch.zeros(1, *GRID, dtype=torch.long), torch.tensor([3]))
