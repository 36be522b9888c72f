"""The tile schedule shared by the CPU and CUDA kernels (csrc/tile_schedule.h), checked
against the dense mask through the `nbp_mega::tile_schedule` probe: what holds here holds for
both backends, whatever their tile sizes.

Legend: Sq queries; Sk keys; L block length; P prefix length; BQ x BK a tile.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from nbp_mega.ops import fused
from nbp_mega.ops.reference import block_causal_mask

pytestmark = pytest.mark.skipif(not fused.AVAILABLE, reason=f"no kernels: {fused.IMPORT_ERROR}")

# (BQ, BK): the CPU kernel's 64 x 64; the CUDA forward's 64 x 32 and backward's 32 x 32;
# and odd sizes that line up with nothing.
TILES = [(64, 64), (64, 32), (32, 32), (5, 7), (16, 3)]
PROBLEMS = [  # (Sq, Sk, L, P, q_offset)
    (97, 97, 16, 0, 0), (130, 130, 5, 3, 0), (64, 64, 1, 0, 0), (300, 300, 256, 7, 0),
    (16, 300, 16, 0, 284), (40, 300, 16, 3, 203), (50, 300, 16, 0, 0), (5, 40, 4, 9, 0),
    (33, 33, 64, 0, 0),
]


def expected_classes(mask: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """[nQ, nK]: 0 no key visible in the tile, 1 all visible, 2 some (from the dense mask)."""
    sq, sk = mask.shape
    classes = torch.zeros(-(-sq // bq), -(-sk // bk), dtype=torch.int8)
    for i, j in itertools.product(range(classes.shape[0]), range(classes.shape[1])):
        tile = mask[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
        classes[i, j] = 1 if tile.all() else (2 if tile.any() else 0)
    return classes


@pytest.mark.parametrize("bq,bk", TILES)
@pytest.mark.parametrize("sq,sk,L,P,q_offset", PROBLEMS)
def test_schedule_matches_dense_mask(sq, sk, L, P, q_offset, bq, bk):
    tiles, key_end, first_query = torch.ops.nbp_mega.tile_schedule(sq, sk, L, P, q_offset, bq,
                                                                   bk)
    mask = block_causal_mask(sq, sk, L, P, q_offset)  # [Sq, Sk]
    assert torch.equal(key_end, mask.sum(1))  # each row sees a prefix of the keys
    rows = torch.arange(sq)[:, None].expand(sq, sk)
    first = torch.where(mask, rows, sq).amin(0)  # first row that sees each key (Sq if none)
    assert torch.equal(first_query, first)
    classes = expected_classes(mask, bq, bk)
    assert torch.equal(tiles[0], classes)
    visited = (classes != 0).to(torch.int8)
    assert torch.equal(tiles[1], visited), "forward loop bounds"
    assert torch.equal(tiles[2], visited), "backward loop bounds"


def test_skipped_work_is_the_block_diagonal_share():
    """For n blocks of L tokens, tiles aligned with the blocks visit (n + 1) / (2n) of them."""
    n, L = 20, 64
    tiles, _, _ = torch.ops.nbp_mega.tile_schedule(n * L, n * L, L, 0, 0, 64, 64)
    assert tiles[1].sum().item() == n * (n + 1) // 2
    assert (tiles[0] == 2).sum().item() == 0  # aligned: no tile straddles a block boundary


def test_probe_rejects_bad_arguments():
    with pytest.raises(ValueError, match="tile_schedule"):
        torch.ops.nbp_mega.tile_schedule(10, 5, 1, 0, 0, 64, 64)
