"""The training stream: order independent of dp (also dp not dividing the streams, and dp > V)
and workers, epochs, exact resume on another dp, broken shards skipped and counted once;
validation batches."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

from nbp_mega.config_fields import ConfigError, merge
from nbp_mega.data.loader import DataConfig, build_loaders, eval_batches
from nbp_mega.data.shards import ShardError, ShardIndex, expand_shards
from nbp_mega.data.stream import (
    choose_num_streams,
    format_digest,
    merge_states,
    read_amplification,
    sample_hash,
)
from nbp_mega.data.synthetic import write_synthetic_shards

GRID = (2, 4, 4)
VOCAB = 16
N = 40  # training clips: 10 shards of 4
G = 8  # global batch


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokens")
    write_synthetic_shards(str(out), num_train=N, num_val=12, grid=GRID, vocab=VOCAB, classes=4,
                           shard_size=4, seed=0, noise=0.02)
    return out


def loaders(path, dp_size: int, *, seed: int = 3, global_batch: int = G, ranks=None,
            saved_streams: int = 0, **data) -> list:
    """One loader per data-parallel rank (or per rank in `ranks`), as each rank of a job
    builds it."""
    cfg = merge(DataConfig(), {"shards": str(path), "num_workers": 0, "shuffle_buffer": 3,
                               **data})
    return [build_loaders(cfg, seed=seed, global_batch=global_batch, dp_rank=r, dp_size=dp_size,
                          grid=GRID, vocab_size=VOCAB, saved_streams=saved_streams)[0]
            for r in (range(dp_size) if ranks is None else ranks)]


def run(ranks: list, steps: int) -> list[tuple[list[str], torch.Tensor]]:
    """[steps] of (global batch keys, tokens [G, T, H, W]), the ranks' slices joined."""
    out = []
    for _ in range(steps):
        batches = [loader.next_batch() for loader in ranks]
        out.append(([k for b in batches for k in b.keys], torch.cat([b.tokens for b in batches])))
    return out


def global_batches(ranks: list, steps: int) -> list[tuple[str, list[str]]]:
    """[steps] of (batch digest summed over the ranks, as training logs it; global keys)."""
    out = []
    for _ in range(steps):
        batches = [loader.next_batch() for loader in ranks]
        out.append((format_digest(sum(b.digest_part() for b in batches)),
                    [k for b in batches for k in b.keys]))
    return out


def keys_by_stream(steps, num_streams: int) -> list[list[str]]:
    k = G // num_streams
    streams = [[] for _ in range(num_streams)]
    for keys, _ in steps:
        for s in range(num_streams):
            streams[s] += keys[s * k:(s + 1) * k]
    return streams


@pytest.mark.parametrize("dp_size, workers", [(1, 0), (2, 0), (2, 2), (4, 1)])
def test_each_stream_reads_its_shards_once_per_epoch(shards, dp_size, workers):
    ranks = loaders(shards / "train", dp_size, num_workers=workers, streams=4)
    spec = ranks[0].spec
    index = ShardIndex.build(list(spec.paths))
    by_shard = {}
    for i in range(len(index)):
        by_shard.setdefault(index.key(i).split("/")[0], []).append(index.key(i))
    streams = keys_by_stream(run(ranks, 12), 4)  # 12 x 8 = 96 samples > 2 epochs of 40
    for s, seen in enumerate(streams):
        for epoch in range(2):
            mine = [k for i in spec.stream_shards(s, epoch) for k in by_shard[spec.names[i]]]
            start = sum(len(by_shard[spec.names[i]]) for e in range(epoch)
                        for i in spec.stream_shards(s, e))
            assert sorted(seen[start:start + len(mine)]) == sorted(mine), (s, epoch)
    assert streams[0][:3] != sorted(streams[0][:3])  # shuffled inside the buffer
    assert all(loader.skipped_shards == 0 for loader in ranks)


def test_order_is_independent_of_dp_and_workers(shards):
    reference = run(loaders(shards / "train", 1), 9)
    for dp_size, workers in [(2, 0), (4, 2), (8, 1)]:
        other = run(loaders(shards / "train", dp_size, num_workers=workers), 9)
        for (ref_keys, ref_tokens), (keys, tokens) in zip(reference, other, strict=True):
            assert keys == ref_keys
            torch.testing.assert_close(tokens, ref_tokens)


# (global batch, shards used, data-parallel sizes): the default V is 8, 6 and 2; dp 4 and 12
# do not divide V=6 (ranks of 3 samples, streams of 2), dp 4 and 8 exceed V=2 (4 per stream).
FRESH_RUNS = [(8, 10, [1, 2, 4, 8]), (12, 10, [1, 2, 3, 4, 6, 12]), (8, 3, [1, 2, 4, 8])]


@pytest.mark.parametrize("global_batch, num_shards, dps", FRESH_RUNS)
def test_fresh_runs_give_the_same_batches_on_any_dp(shards, global_batch, num_shards, dps):
    paths = ",".join(expand_shards(str(shards / "train"))[:num_shards])
    steps = 2 * num_shards * 4 // global_batch + 1  # past two epochs
    single = loaders(paths, 1, global_batch=global_batch)
    reference = global_batches(single, steps)
    assert len({digest for digest, _ in reference}) == steps
    for dp_size in dps[1:]:
        for workers in (0, 2) if dp_size == 4 else (0,):
            ranks = loaders(paths, dp_size, global_batch=global_batch, num_workers=workers)
            assert ranks[0].spec.num_streams == single[0].spec.num_streams
            assert global_batches(ranks, steps) == reference, (dp_size, workers)
            for loader in ranks:
                loader.close()


def test_large_dp_works_by_default(shards):
    """G=256 over 128 ranks of 2 samples with 10 shards: V=8 streams of 32, each read by 16
    ranks; a few of the ranks (both ends, both sides of a stream boundary) are checked."""
    reference = run(loaders(shards / "train", 1, global_batch=256), 3)  # 19 epochs
    some = [0, 1, 15, 16, 17, 127]
    ranks = loaders(shards / "train", 128, global_batch=256, ranks=some)
    assert ranks[0].spec.num_streams == 8 and ranks[0].local_batch == 2
    for ref_keys, ref_tokens in reference:
        for r, loader in zip(some, ranks, strict=True):
            batch = loader.next_batch()
            assert batch.keys == ref_keys[2 * r:2 * r + 2] and batch.first_position == 2 * r
            torch.testing.assert_close(batch.tokens, ref_tokens[2 * r:2 * r + 2])
    assert [loader.skipped_shards for loader in ranks] == [0] * len(some)


def test_shared_streams_are_warned_about_once(shards, caplog):
    with caplog.at_level(logging.WARNING, logger="nbp_mega.data.stream"):
        loaders(shards / "train", 3, global_batch=12)  # V=6: 2 streams per rank
        assert not caplog.records
        loaders(shards / "train", 4, global_batch=12)
    (record,) = caplog.records  # from rank 0 only
    assert "6 data streams do not split over 4 data-parallel ranks" in record.message
    assert "1.33x" in record.message and "data.streams a multiple" in record.message
    assert "e.g. 12 (needs as many shards; there are 10)" in record.message


def test_merge_keeps_the_owner_when_sharing_ranks_disagree(shards, caplog):
    ranks = loaders(shards / "train", 4, global_batch=12)  # stream 1: ranks 0 and 1
    run(ranks, 2)
    states = [loader.state_dict() for loader in ranks]
    assert states[0]["streams"]["1"] == states[1]["streams"]["1"]
    states[1]["streams"]["1"] = {**states[1]["streams"]["1"], "emitted": 0}
    with caplog.at_level(logging.WARNING, logger="nbp_mega.data.stream"):
        merged = merge_states(states)
    assert merged["streams"]["1"] == states[0]["streams"]["1"]
    assert "stream 1 is at" in caplog.text and "rank 1" in caplog.text


def test_order_is_seeded(shards):
    a = [keys for keys, _ in run(loaders(shards / "train", 1), 5)]
    assert a == [keys for keys, _ in run(loaders(shards / "train", 1), 5)]
    assert a != [keys for keys, _ in run(loaders(shards / "train", 1, seed=4), 5)]
    plain = run(loaders(shards / "train", 1, shuffle=False, streams=1), 5)
    index = ShardIndex.build(expand_shards(str(shards / "train")))
    assert [k for keys, _ in plain for k in keys] == index.keys(range(N))  # the file order


@pytest.mark.parametrize("dp_before, dp_after, workers, batch, streams", [
    (2, 1, 0, 8, 0), (1, 4, 2, 8, 0), (4, 2, 1, 8, 0),  # V=8
    (2, 4, 0, 12, 0), (4, 3, 2, 12, 0), (12, 1, 0, 12, 0),  # V=6: 4 and 12 share streams
    (1, 4, 0, 8, 2), (2, 8, 1, 8, 2)])  # V=2 saved: ranks of 2 and 1 share streams
@pytest.mark.parametrize("k", [1, 6])  # inside the first buffer / after an epoch
def test_resume_continues_identically_on_another_dp(shards, dp_before, dp_after, workers, batch,
                                                    streams, k):
    path = shards / "train"
    reference = run(loaders(path, 1, global_batch=batch, streams=streams), k + 5)
    before = loaders(path, dp_before, num_workers=workers, global_batch=batch, streams=streams)
    run(before, k)
    state = merge_states([loader.state_dict() for loader in before])
    for loader in before:
        loader.close()
    # As train.py resumes: the checkpoint's V, whatever data.streams and dp are now.
    after = loaders(path, dp_after, num_workers=workers, global_batch=batch,
                    saved_streams=state["num_streams"])
    for loader in after:
        loader.load_state_dict(state)
    for (ref_keys, ref_tokens), (keys, tokens) in zip(reference[k:], run(after, 5), strict=True):
        assert keys == ref_keys
        torch.testing.assert_close(tokens, ref_tokens)
    for loader in after:
        loader.close()


def test_resume_refuses_other_data_or_settings(shards):
    first = loaders(shards / "train", 1)[0]
    first.next_batch()
    state = first.state_dict()
    paths = ",".join(expand_shards(str(shards / "train"))[:8])
    cases = [(dict(path=paths), "the shard list"), (dict(seed=5), "seed"),
             (dict(shuffle_buffer=4), "data.shuffle_buffer"), (dict(streams=4), "data.streams")]
    for change, what in cases:
        path = change.pop("path", shards / "train")
        with pytest.raises(ShardError, match=f"taken with {what}"):
            loaders(path, 1, **change)[0].load_state_dict(state)
    with pytest.raises(ValueError, match="lacks 'num_streams'"):
        loaders(shards / "train", 1)[0].load_state_dict({"seed": 3})


def broken_copy(shards, out) -> list[str]:
    """The training shards copied to `out`, the second truncated, the third not a tar."""
    for name in os.listdir(shards / "train"):
        shutil.copy(shards / "train" / name, out / name)
    names = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    with open(out / names[1], "r+b") as f:  # truncated inside its third sample (a
        f.truncate(2 * 2048 + 700)  # sample is 2 members of 512 header + 512 data bytes)
    (out / names[2]).write_bytes(b"\x00garbage" * 300)  # not a tar at all
    return names


def test_broken_and_missing_shards_are_skipped_and_counted(shards, tmp_path):
    names = broken_copy(shards, tmp_path)
    ranks = loaders(tmp_path, 2, num_workers=1, streams=2)
    again = loaders(tmp_path, 1, streams=2)  # the same broken data on another dp
    os.remove(tmp_path / names[3])  # vanishes after the job started
    steps = run(ranks, 8)  # 64 samples > one epoch of what is left
    assert all(len(keys) == G for keys, _ in steps)
    seen = {k for keys, _ in steps for k in keys}
    assert not any(k.startswith((names[2], names[3])) for k in seen)
    assert sum(k.startswith(names[1]) for k in seen) == 2  # what came before the break
    assert sum(loader.skipped_shards for loader in ranks) >= 3
    assert [keys for keys, _ in run(again, 8)] == [keys for keys, _ in steps]


@pytest.mark.parametrize("dp_size, workers", [(4, 0), (8, 2)])  # 2 and 4 ranks per stream
def test_broken_shards_of_a_shared_stream_are_counted_and_logged_once(shards, tmp_path,
                                                                       caplog, dp_size, workers):
    names = broken_copy(shards, tmp_path)
    single = loaders(tmp_path, 1, streams=2)
    shared = loaders(tmp_path, dp_size, num_workers=workers, streams=2)
    os.remove(tmp_path / names[3])
    with caplog.at_level(logging.WARNING, logger="nbp_mega.data.stream"):
        caplog.clear()
        alone = global_batches(single, 8)
        logged_alone = [r for r in caplog.records if "skipping shard" in r.message]
        caplog.clear()
        assert global_batches(shared, 8) == alone
        logged_shared = [r for r in caplog.records if "skipping shard" in r.message]
    assert len(logged_alone) >= 3 and single[0].skipped_shards == len(logged_alone)
    if not workers:  # worker processes log through their own handlers
        assert len(logged_shared) == len(logged_alone)
    assert sum(loader.skipped_shards for loader in shared) == single[0].skipped_shards
    merged = merge_states([loader.state_dict() for loader in shared])
    assert merged["streams"] == single[0].state_dict()["streams"]  # the ranks agree
    for loader in shared:
        loader.close()


def test_bad_sample_names_file_and_key(shards):
    loader = loaders(shards / "train", 1, num_workers=1)[0]
    loader.spec = type(loader.spec)(**{**loader.spec.__dict__, "grid": (2, 4, 5)})
    with pytest.raises(ShardError, match=r"shard-00000\d.tar: sample clip\d+: tokens have "
                                         r"shape \(2, 4, 4\), expected \(2, 4, 5\)"):
        loader.next_batch()


def test_number_of_streams():
    def default(shards, batch):
        return choose_num_streams(0, num_shards=shards, global_batch=batch)

    assert [default(10, 8), default(6, 8), default(10, 12), default(1, 8)] == [8, 4, 6, 1]
    assert [default(500, 256), default(1000, 96), default(64, 100)] == [64, 48, 50]
    assert choose_num_streams(4, num_shards=6, global_batch=8) == 4
    assert choose_num_streams(128, num_shards=200, global_batch=256) == 128  # over the cap
    with pytest.raises(ConfigError, match=r"data.streams=3 does not work: train.global_batch=8 "
                                          r"is not a multiple of it.*\(1, 2, 4, 8\)"):
        choose_num_streams(3, num_shards=10, global_batch=8)
    with pytest.raises(ConfigError, match=r"only 3 shards.*\(1, 2\)"):
        choose_num_streams(8, num_shards=3, global_batch=8)
    # Ranks sharing a stream each read all of it: V=6, G=12 over 4 ranks reads 8 streams.
    assert read_amplification(6, 2, 4) == pytest.approx(8 / 6)
    assert [read_amplification(8, 1, 4), read_amplification(8, 32, 128)] == [1, 16]


def test_digest_is_a_sum_over_ranks(shards):
    one = loaders(shards / "train", 1)[0].next_batch()
    two = [loader.next_batch() for loader in loaders(shards / "train", 2)]
    whole = format_digest(one.digest_part())
    assert whole == format_digest(sum(b.digest_part() for b in two))
    assert len(whole) == 16
    swapped = sample_hash(0, one.keys[1]) + sample_hash(1, one.keys[0])
    assert format_digest(swapped + one.digest_part() - sample_hash(0, one.keys[0])
                         - sample_hash(1, one.keys[1])) != whole  # the order counts


def test_eval_batches_fixed_order_split_like_training(shards):
    val = ShardIndex.build(expand_shards(str(shards / "val")))  # 12 clips
    args = dict(batch_size=4, max_batches=2, grid=GRID, vocab_size=VOCAB)
    single = list(eval_batches(val, dp_rank=0, dp_size=1, **args))
    assert [b.keys for b in single] == [val.keys(range(4)), val.keys(range(4, 8))]
    ranks = [list(eval_batches(val, dp_rank=r, dp_size=2, **args)) for r in range(2)]
    for g, ref in enumerate(single):
        assert ranks[0][g].keys + ranks[1][g].keys == ref.keys
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
    assert len(train.spec.paths) == 10 and len(val) == 12
    assert train.next_batch().tokens.shape == (G, *GRID)
    with pytest.raises(ConfigError, match="data.shards is empty"):
        build_loaders(DataConfig(), seed=0, global_batch=G, dp_rank=0, dp_size=1, grid=GRID,
                      vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="checkpoint being resumed used 8 streams"):
        build_loaders(merge(cfg, {"streams": 4}), seed=0, global_batch=G, dp_rank=0, dp_size=1,
                      grid=GRID, vocab_size=VOCAB, saved_streams=8)
    with pytest.raises(ConfigError, match="train.global_batch=8 is not a positive multiple of "
                                          "the data-parallel size 3"):
        build_loaders(cfg, seed=0, global_batch=G, dp_rank=0, dp_size=3, grid=GRID,
                      vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="num_workers"):
        merge(DataConfig(), {"num_workers": -1})
