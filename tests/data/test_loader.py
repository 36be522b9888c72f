"""The training stream: layout-independent order, exact split over ranks, exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from nbp_mega.config_fields import ConfigError, merge
from nbp_mega.data.loader import (
    DataConfig,
    SampleOrder,
    TokenLoader,
    batch_digest,
    build_loaders,
    eval_batches,
)
from nbp_mega.data.shards import ShardError, ShardIndex, expand_shards
from nbp_mega.data.synthetic import write_synthetic_shards

GRID = (2, 4, 4)
VOCAB = 16
N = 40  # training clips: 3 shards of 16, 16, 8
G = 8  # global batch: 5 per epoch


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokens")
    write_synthetic_shards(str(out), num_train=N, num_val=12, grid=GRID, vocab=VOCAB, classes=4,
                           shard_size=16, seed=0, noise=0.02)
    return out


@pytest.fixture(scope="module")
def index(shards):
    return ShardIndex.build(expand_shards(str(shards / "train")))


def loaders(index, dp_size: int, global_batch: int = G, **kw) -> list[TokenLoader]:
    """One loader per data-parallel rank (as each rank of a job would build it)."""
    args = dict(global_batch=global_batch, dp_size=dp_size, seed=3, grid=GRID, vocab_size=VOCAB)
    return [TokenLoader(index, dp_rank=r, **{**args, **kw}) for r in range(dp_size)]


def run(ranks: list[TokenLoader], steps: int) -> list[list]:
    """[steps][dp] batches."""
    return [[loader.next_batch() for loader in ranks] for _ in range(steps)]


@pytest.mark.parametrize("dp_size, workers", [(1, 0), (2, 0), (4, 0), (2, 2), (4, 2)])
def test_epoch_covers_every_sample_once(index, dp_size, workers):
    steps = run(loaders(index, dp_size, num_workers=workers), N // G)
    keys = [k for step in steps for batch in step for k in batch.keys]
    assert sorted(keys) == sorted(index.keys(range(N)))
    for step in steps:
        b = G // dp_size
        assert all(batch.tokens.shape == (b, *GRID) for batch in step)
        assert all(batch.tokens.dtype == batch.labels.dtype == torch.long for batch in step)


def test_order_is_independent_of_dp_size(index):
    steps = 7  # crosses the epoch boundary (5 batches per epoch)
    reference = run(loaders(index, 1), steps)
    for dp_size in (2, 4):
        for ref, step in zip(reference, run(loaders(index, dp_size), steps), strict=True):
            assert all(batch.global_keys == ref[0].global_keys for batch in step)
            assert [k for batch in step for k in batch.keys] == ref[0].global_keys
            torch.testing.assert_close(torch.cat([b.tokens for b in step]), ref[0].tokens)
            torch.testing.assert_close(torch.cat([b.labels for b in step]), ref[0].labels)


def test_stream_is_concatenated_seeded_epochs(index):
    loader = loaders(index, 1, global_batch=12)[0]  # 12 does not divide 40
    stream = [k for _ in range(7) for k in loader.next_batch().global_keys]  # 84 items
    epochs = [stream[:N], stream[N:2 * N]]
    assert all(sorted(e) == sorted(index.keys(range(N))) for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    assert epochs[0] == index.keys(SampleOrder(N, seed=3, shuffle=True).epoch(0))
    other_seed = loaders(index, 1, seed=4)[0].next_batch().global_keys
    assert other_seed != stream[:G]
    in_order = loaders(index, 1, shuffle=False)[0].next_batch().global_keys
    assert in_order == index.keys(range(G))


@pytest.mark.parametrize("dp_before, dp_after, workers", [(2, 1, 2), (1, 4, 0), (4, 2, 0)])
def test_resume_continues_identically_with_other_dp_size(index, dp_before, dp_after, workers):
    k, more = 3, 4
    reference = run(loaders(index, 1), k + more)
    before = loaders(index, dp_before, num_workers=workers)
    run(before, k)  # the workers have prefetched beyond these; the position must not count it
    states = [loader.state_dict() for loader in before]
    assert all(s == states[0] for s in states)
    assert states[0]["consumed_samples"] == k * G
    state = json.loads(json.dumps(states[0]))  # as stored in a checkpoint
    after = loaders(index, dp_after, num_workers=workers)
    for loader in after:
        loader.load_state_dict(state)
    for ref, step in zip(reference[k:], run(after, more), strict=True):
        assert [key for batch in step for key in batch.keys] == ref[0].global_keys
        torch.testing.assert_close(torch.cat([b.tokens for b in step]), ref[0].tokens)


def test_resume_refuses_changed_data(shards, index):
    state = loaders(index, 1)[0].state_dict()
    fewer = ShardIndex.build(expand_shards(str(shards / "train"))[:2])
    with pytest.raises(ShardError, match="training shards changed.*40 samples.*now holds 32"):
        loaders(fewer, 1)[0].load_state_dict(state)
    swapped = expand_shards(str(shards / "train"))
    reordered = ShardIndex.build([swapped[1], swapped[0], swapped[2]])  # same count
    with pytest.raises(ShardError, match="training shards changed.*order"):
        loaders(reordered, 1)[0].load_state_dict(state)
    with pytest.raises(ValueError, match="seed 3, this run has seed 5"):
        loaders(index, 1, seed=5)[0].load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        loaders(index, 1)[0].load_state_dict({"seed": 3})


def test_batch_split_errors(index):
    with pytest.raises(ConfigError, match="train.global_batch=6 is not a positive multiple of "
                                          "the data-parallel size 4"):
        loaders(index, 4, global_batch=6)
    with pytest.raises(ValueError, match="rank 2 of 2"):
        TokenLoader(index, global_batch=G, dp_rank=2, dp_size=2, seed=0, grid=GRID,
                    vocab_size=VOCAB)


def test_bad_sample_in_worker_names_file_and_key(index):
    loader = loaders(index, 1, num_workers=2, grid=(2, 4, 5))[0]
    with pytest.raises(ShardError, match=r"shard /.*/shard-00000\d.tar sample 'clip\d+': tokens "
                                         r"have shape \(2, 4, 4\), expected \(2, 4, 5\)"):
        loader.next_batch()


def test_eval_batches_fixed_order_split_like_training(shards):
    val = ShardIndex.build(expand_shards(str(shards / "val")))  # 12 clips
    args = dict(batch_size=4, max_batches=2, grid=GRID, vocab_size=VOCAB)
    single = list(eval_batches(val, dp_rank=0, dp_size=1, **args))
    assert [b.keys for b in single] == [val.keys(range(4)), val.keys(range(4, 8))]
    ranks = [list(eval_batches(val, dp_rank=r, dp_size=2, **args)) for r in range(2)]
    for g, ref in enumerate(single):
        assert ranks[0][g].keys + ranks[1][g].keys == ref.keys == ref.global_keys
        torch.testing.assert_close(torch.cat([ranks[0][g].tokens, ranks[1][g].tokens]),
                                   ref.tokens)
    assert len(list(eval_batches(val, dp_rank=0, dp_size=1, **{**args, "max_batches": 9}))) == 3
    with pytest.raises(ShardError, match="12 samples, fewer than one batch of 16"):
        list(eval_batches(val, dp_rank=0, dp_size=1, **{**args, "batch_size": 16}))


def test_build_loaders_and_config(shards):
    cfg = merge(DataConfig(), {"shards": f"{shards}/train", "val_shards": f"{shards}/val",
                               "num_workers": 0})
    train, val = build_loaders(cfg, seed=3, global_batch=G, dp_rank=0, dp_size=1, grid=GRID,
                               vocab_size=VOCAB)
    assert len(train.index) == N and len(val) == 12
    assert train.next_batch().tokens.shape == (G, *GRID)
    with pytest.raises(ConfigError, match="data.shards is empty"):
        build_loaders(DataConfig(), seed=0, global_batch=G, dp_rank=0, dp_size=1, grid=GRID,
                      vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="num_workers"):
        merge(DataConfig(), {"num_workers": -1})


def test_batch_digest():
    assert batch_digest(["a", "b"]) == batch_digest(["a", "b"])
    assert batch_digest(["a", "b"]) != batch_digest(["b", "a"])
    assert len(batch_digest([])) == 16
