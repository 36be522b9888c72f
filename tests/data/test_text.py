"""Text ids from the shards to Batch.text: the fixed form of exactly each batch's samples in
training and validation, resume, the index's text span, and the errors for missing or bad
text."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

from nbp_mega.config_fields import merge
from nbp_mega.data.loader import DataConfig, TextSpec, build_loaders, eval_batches
from nbp_mega.data.shards import ShardError, ShardIndex, expand_shards
from nbp_mega.data.stream import format_digest, merge_states
from nbp_mega.data.synthetic import TEXT_VOCAB, class_text_ids, write_synthetic_shards
from nbp_mega.model.config import ModelConfig

GRID = (2, 4, 4)
VOCAB = 16
G = 8
# S = 5: "up" (2 ids) keeps an eos and pads, "down"/"left" (4 = S - 1) fill it exactly with
# no eos, "right" (5) and the diagonals (7..10) are truncated.
TEXT = TextSpec(length=5, vocab=TEXT_VOCAB, bos_id=1, eos_id=2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("text")
    write_synthetic_shards(str(out), num_train=32, num_val=8, grid=GRID, vocab=VOCAB, classes=8,
                           shard_size=4, seed=0, noise=0.0, text=True)
    return out


@pytest.fixture(scope="module")
def stored(shards) -> dict[str, dict[str, np.ndarray]]:
    """{split: {global key: the .text.npy ids as stored}}, read with tarfile (not our reader)."""
    out = {"train": {}, "val": {}}
    for split, found in out.items():
        for path in expand_shards(str(shards / split)):
            with tarfile.open(path) as tar:
                for m in tar:
                    if m.name.endswith(".text.npy"):
                        raw = tar.extractfile(m).read()
                        key = f"{path.rsplit('/', 1)[1]}/{m.name.split('.')[0]}"
                        found[key] = np.load(io.BytesIO(raw))
    return out


def expected_text(ids: np.ndarray, length: int) -> list[int]:
    """The paper's form written out: [bos] + ids + [eos], cut to `length`, eos-padded."""
    row = ([1] + ids.tolist() + [2])[:length]
    return row + [2] * (length - len(row))


def train_loaders(path, dp_size: int, *, text=TEXT, workers: int = 0, saved_streams: int = 0,
                  val: str = "") -> list:
    cfg = merge(DataConfig(), {"shards": str(path), "val_shards": val, "num_workers": workers,
                               "shuffle_buffer": 3})
    return [build_loaders(cfg, seed=3, global_batch=G, dp_rank=r, dp_size=dp_size, grid=GRID,
                          vocab_size=VOCAB, saved_streams=saved_streams, text=text)[0]
            for r in range(dp_size)]


def steps(ranks: list, n: int) -> list[tuple[list[str], torch.Tensor, torch.Tensor, str]]:
    """[n] of (global keys, tokens, text, digest), the ranks' slices joined."""
    out = []
    for _ in range(n):
        batches = [loader.next_batch() for loader in ranks]
        out.append(([k for b in batches for k in b.keys], torch.cat([b.tokens for b in batches]),
                    torch.cat([b.text for b in batches]),
                    format_digest(sum(b.digest_part() for b in batches))))
    return out


def assert_text_of_keys(text: torch.Tensor, keys: list[str], stored: dict) -> set[str]:
    """Row i of `text` is the fixed form of sample keys[i]; returns which kinds of text met."""
    assert text.dtype == torch.long and text.shape == (len(keys), TEXT.length)
    for row, key in zip(text.tolist(), keys, strict=True):
        assert row == expected_text(stored[key], TEXT.length), key
    kinds = {-1: "short", 0: "exact", 1: "truncated"}  # fewer / just / more than S - 1 ids
    return {kinds[int(np.sign(len(stored[k]) - (TEXT.length - 1)))] for k in keys}


def test_synthetic_text_is_the_class_name_per_character():
    ids = class_text_ids("up")
    assert ids.dtype == np.int32 and ids.tolist() == [4 + 21, 4 + 16]  # ' ' is 0, 'a' 1
    assert expected_text(ids, 5) == [1, 25, 20, 2, 2]  # short: eos, then eos padding
    assert expected_text(class_text_ids("right"), 5) == [1, 22, 13, 11, 12]  # cut, no eos


def test_training_batches_carry_the_text_of_their_samples(shards, stored):
    ranks = train_loaders(shards / "train", 2, workers=1)
    kinds = set()
    for keys, _, text, _ in steps(ranks, 6):  # 48 samples: more than an epoch of 32
        kinds |= assert_text_of_keys(text, keys, stored["train"])
    assert kinds == {"short", "exact", "truncated"}
    for loader in ranks:
        loader.close()


def test_text_changes_neither_order_nor_digests(shards):
    with_text = steps(train_loaders(shards / "train", 1), 5)
    plain = train_loaders(shards / "train", 1, text=None)[0]  # text in the shards is ignored
    for keys, tokens, _, digest in with_text:
        batch = plain.next_batch()
        assert batch.text is None and batch.keys == keys
        assert format_digest(batch.digest_part()) == digest
        torch.testing.assert_close(batch.tokens, tokens)


def test_resume_gives_the_same_batches_with_text(shards):
    reference = steps(train_loaders(shards / "train", 1), 7)
    before = train_loaders(shards / "train", 2)
    steps(before, 3)
    state = merge_states([loader.state_dict() for loader in before])
    after = train_loaders(shards / "train", 4, saved_streams=state["num_streams"])
    for loader in after:
        loader.load_state_dict(state)
    for (ref_keys, ref_tokens, ref_text, ref_digest), (keys, tokens, text, digest) in zip(
            reference[3:], steps(after, 4), strict=True):
        assert (keys, digest) == (ref_keys, ref_digest)
        torch.testing.assert_close(tokens, ref_tokens)
        assert torch.equal(text, ref_text)


def test_validation_batches_carry_the_text_of_their_samples(shards, stored):
    val = ShardIndex.build(expand_shards(str(shards / "val")))
    args = dict(batch_size=4, max_batches=2, grid=GRID, vocab_size=VOCAB, text=TEXT)
    single = list(eval_batches(val, dp_rank=0, dp_size=1, num_workers=1, **args))
    kinds = set()
    for batch in single:
        kinds |= assert_text_of_keys(batch.text, batch.keys, stored["val"])
    assert kinds == {"short", "exact", "truncated"}
    halves = [list(eval_batches(val, dp_rank=r, dp_size=2, **args)) for r in range(2)]
    for g, ref in enumerate(single):
        assert torch.equal(torch.cat([halves[0][g].text, halves[1][g].text]), ref.text)
    plain = next(eval_batches(val, dp_rank=0, dp_size=1, **{**args, "text": None}))
    assert plain.text is None and plain.keys == single[0].keys


def test_index_reads_the_text_span_only_when_asked_in_one_read(shards, stored, monkeypatch):
    index = ShardIndex.build(expand_shards(str(shards / "val")))
    assert len(index.without_text()) == 0 and index.has_text(0)
    reads = []
    real = ShardIndex._read_bytes
    monkeypatch.setattr(ShardIndex, "_read_bytes",
                        lambda self, i, off, size: reads.append(size) or real(self, i, off, size))
    for i in range(len(index)):
        assert index.read(i).text is None
        sample = index.read(i, text=True)
        np.testing.assert_array_equal(sample.text, stored["val"][sample.key])
        assert sample.text.dtype == np.int32
    assert len(reads) == 2 * len(index)  # members are adjacent: one read per sample


# -- shards made for the errors --------------------------------------------------------------
def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_shard(path, texts: list, *, gap: int = 0) -> str:
    """A shard of one sample per entry of `texts` (bytes or an array; None = no text member);
    `gap` bytes of another member between a sample's tokens and its text."""
    with tarfile.open(path, "w") as tar:
        for i, text in enumerate(texts):
            members = [(f"clip{i}.json", b'{"label": 0, "source": "test"}'),
                       (f"clip{i}.tokens.npy", npy(np.full(GRID, i % VOCAB, np.uint8)))]
            if gap:
                members.append((f"clip{i}.mp4", b"\x00" * gap))
            if text is not None:
                members.append((f"clip{i}.text.npy",
                                text if isinstance(text, bytes) else npy(text)))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_far_apart_members_are_read_apart(tmp_path):
    texts = [np.arange(4, 4 + n, dtype=np.int32) for n in (1, 9)]
    index = ShardIndex.build([write_shard(tmp_path / "a.tar", texts, gap=200_000)])
    for i, ids in enumerate(texts):
        sample = index.read(i, text=True)
        np.testing.assert_array_equal(sample.text, ids)
        np.testing.assert_array_equal(sample.tokens, np.full(GRID, i, np.uint8))
        assert sample.meta["label"] == 0


def test_text_model_on_shards_without_text(tmp_path):
    no_text = tmp_path / "plain"
    write_synthetic_shards(str(no_text), num_train=8, num_val=4, grid=GRID, vocab=VOCAB,
                           classes=2, shard_size=4, seed=0)
    loader = train_loaders(no_text / "train", 1)[0]
    with pytest.raises(ShardError, match=r"shard-00000\d.tar: sample clip\d+: has no .text.npy "
                                         r"member, but the model takes text \(model.text_len=5\)"
                                         r".*made without --text-tokenizer"):
        loader.next_batch()
    with pytest.raises(ShardError, match=r"data.val_shards: 4 of 4 samples have no text; the "
                                         r"first: shard .*val/shard-000000.tar sample "
                                         r"'clip00000000': has no .text.npy.*--text-tokenizer"):
        train_loaders(no_text / "train", 1, val=str(no_text / "val"))
    val = ShardIndex.build(expand_shards(str(no_text / "val")))
    with pytest.raises(ShardError, match=r"sample 'clip00000000': has no .text.npy member"):
        next(eval_batches(val, batch_size=4, dp_rank=0, dp_size=1, max_batches=1, grid=GRID,
                          vocab_size=VOCAB, text=TEXT))


BAD_TEXTS = [
    (np.zeros((2, 3), np.int32), r"text.npy holds an array of dtype int32 and shape \(2, 3\), "
                                 r"expected a 1-D integer array"),
    (np.array(7, np.int32), r"text.npy holds an array of dtype int32 and shape \(\), expected "
                            r"a 1-D integer array"),
    (np.array([4.0, 5.0]), r"text.npy holds an array of dtype float64 and shape \(2,\), "
                           r"expected a 1-D integer array"),
    (np.array([4, TEXT_VOCAB, 5], np.int32), rf"text id {TEXT_VOCAB} at position 1 is outside "
                                             rf"\[0, {TEXT_VOCAB}\) = model.text_vocab"),
    (np.array([-3], np.int16), rf"text id -3 at position 0 is outside \[0, {TEXT_VOCAB}\)"),
    (b"garbage", r"text.npy is not a valid .npy array"),
]


@pytest.mark.parametrize("bad, expected", BAD_TEXTS)
def test_bad_text_names_shard_and_sample(tmp_path, bad, expected):
    path = write_shard(tmp_path / "bad.tar", [np.array([5, 6], np.int32), bad])
    loader = train_loaders(path, 1)[0]
    with pytest.raises(ShardError, match=f"bad.tar: sample clip1: {expected}"):
        loader.next_batch()
    index = ShardIndex.build([path])
    with pytest.raises(ShardError, match=f"shard {path} sample 'clip1': {expected}"):
        next(eval_batches(index, batch_size=2, dp_rank=0, dp_size=1, max_batches=1, grid=GRID,
                          vocab_size=VOCAB, text=TEXT))


def test_text_spec_from_the_model_config():
    assert TextSpec.from_model(ModelConfig()) is None
    model = merge(ModelConfig(), {"text_len": 8, "text_vocab": 32000, "text_eos_id": 3})
    assert TextSpec.from_model(model) == TextSpec(length=8, vocab=32000, bos_id=1, eos_id=3)
    with pytest.raises(ValueError, match="expected length >= 2"):
        TextSpec(length=1, vocab=10)
    with pytest.raises(ValueError, match="bos/eos ids in \\[0, vocab\\)"):
        TextSpec(length=4, vocab=2)
