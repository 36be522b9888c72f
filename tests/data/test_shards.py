"""Shard specs, the tar index, reading samples, and the checks against the model."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest

from nbp_mega.data.shards import ShardError, ShardIndex, check_meta, check_tokens, expand_shards

GRID = (2, 3, 4)
VOCAB = 10


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def meta(label: int = 1, **extra) -> bytes:
    return json.dumps({"label": label, "source": "test", **extra}).encode()


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    """A tar of (member name, data) in the given order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def clip(seed: int, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=GRID).astype(dtype)


def write_shard(path, keys: list[str], seed: int = 0) -> str:
    members = []
    for i, key in enumerate(keys):
        members += [(f"{key}.tokens.npy", npy(clip(seed + i))), (f"{key}.json", meta(i))]
    return write_tar(path, members)


def touch(path) -> str:
    path.write_bytes(b"")
    return str(path)


# -- expand_shards ---------------------------------------------------------------------------
def test_expand_directory_glob_and_file(tmp_path):
    b, a = touch(tmp_path / "b.tar"), touch(tmp_path / "a.tar")
    touch(tmp_path / "notes.txt")
    assert expand_shards(str(tmp_path)) == [a, b]
    assert expand_shards(str(tmp_path / "*.tar")) == [a, b]
    assert expand_shards(b) == [b]


def test_expand_brace_keeps_order_and_comma_lists(tmp_path):
    paths = [touch(tmp_path / f"s-{i:06d}.tar") for i in range(3)]
    sub = tmp_path / "sub"
    sub.mkdir()
    extra = touch(sub / "x.tar")
    assert expand_shards(f"{tmp_path}/s-{{000000..000002}}.tar") == paths
    assert expand_shards(f"{tmp_path}/s-{{000002,000000}}.tar") == [paths[2], paths[0]]
    # commas inside braces belong to the pattern; spaces and a trailing comma are fine
    spec = f"{tmp_path}/s-{{000001,000002}}.tar, {sub} ,{paths[0]},"
    assert expand_shards(spec) == [paths[1], paths[2], extra, paths[0]]
    assert expand_shards([str(sub), paths[0]]) == [extra, paths[0]]


@pytest.mark.parametrize("spec, expected", [
    ("missing.tar", "shard file '{d}/missing.tar' does not exist"),
    ("nodir/*.tar", "shard glob '{d}/nodir/*.tar' matches no files"),
    ("s-{000000..000004}.tar", "3 of 5 files do not exist: {d}/s-000002.tar"),
    ("empty", "shard directory '{d}/empty' holds no *.tar files"),
])
def test_expand_errors_name_the_spec(tmp_path, spec, expected):
    for i in range(2):
        touch(tmp_path / f"s-{i:06d}.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError) as err:
        expand_shards(f"{tmp_path}/{spec}")
    assert expected.format(d=tmp_path) in str(err.value)


def test_expand_empty_and_unbalanced(tmp_path):
    with pytest.raises(ShardError, match="names no shards"):
        expand_shards(" , ")
    with pytest.raises(ShardError, match="unbalanced"):
        expand_shards(f"{tmp_path}/s-{{0..3.tar")


# -- index and read --------------------------------------------------------------------------
def test_index_read_roundtrip(tmp_path):
    a = write_shard(tmp_path / "a.tar", ["clip0", "clip1", "clip2"], seed=0)
    b = write_shard(tmp_path / "b.tar", ["clip0", "clip1"], seed=10)
    index = ShardIndex.build([a, b])
    assert len(index) == 5
    assert [index.key(i) for i in range(5)] == ["a.tar/clip0", "a.tar/clip1", "a.tar/clip2",
                                                "b.tar/clip0", "b.tar/clip1"]
    for i, (seed, label) in enumerate([(0, 0), (1, 1), (2, 2), (10, 0), (11, 1)]):
        sample = index.read(i)
        assert sample.key == index.key(i)
        np.testing.assert_array_equal(sample.tokens, clip(seed))
        assert sample.meta == {"label": label, "source": "test"}
    np.testing.assert_array_equal(index.read(1).tokens, clip(1))  # random access, any order
    with pytest.raises(IndexError):
        index.read(5)


def test_index_survives_pickle_and_keys_are_unique_across_dirs(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = write_shard(tmp_path / "x" / "s.tar", ["clip0"])
    b = write_shard(tmp_path / "y" / "s.tar", ["clip0"], seed=5)
    index = ShardIndex.build([a, b])
    assert index.keys([0, 1]) == ["x/s.tar/clip0", "y/s.tar/clip0"]
    index.read(0)  # opens a handle, which must not travel in the pickle
    copy = pickle.loads(pickle.dumps(index))
    np.testing.assert_array_equal(copy.read(1).tokens, clip(5))
    index.close()


def test_member_order_within_sample_is_free_and_other_members_ignored(tmp_path):
    path = write_tar(tmp_path / "a.tar", [("k.json", meta(3)), ("k.mp4", b"video"),
                                          ("k.tokens.npy", npy(clip(4)))])
    sample = ShardIndex.build([path]).read(0)
    assert sample.meta["label"] == 3
    np.testing.assert_array_equal(sample.tokens, clip(4))


def test_shard_listed_twice(tmp_path):
    a = write_shard(tmp_path / "a.tar", ["clip0"])
    with pytest.raises(ShardError, match="listed twice"):
        ShardIndex.build([a, os.path.join(str(tmp_path), ".", "a.tar")])


@pytest.mark.parametrize("members, expected", [
    ([("clip7.tokens.npy", b"x")], "sample 'clip7': has no 'clip7.json' member"),
    ([("clip7.json", b"{}")], "sample 'clip7': has no 'clip7.tokens.npy' member"),
    ([("c.tokens.npy", b"x"), ("c.json", b"{}"), ("d.json", b"{}"), ("c.json", b"{}")],
     "sample 'c': key appears twice"),
    ([("c.tokens.npy", b"x"), ("c.tokens.npy", b"x")], "sample 'c': duplicate member"),
    ([("c.v1.tokens.npy", b"x")], "member 'c.v1.tokens.npy': sample keys must not contain dots"),
    ([("c.txt", b"x")], "holds no samples"),
])
def test_bad_layout_names_file_and_key(tmp_path, members, expected):
    path = write_tar(tmp_path / "bad.tar", members)
    with pytest.raises(ShardError) as err:
        ShardIndex.build([path])
    assert f"shard {path}" in str(err.value) and expected in str(err.value)


def test_corrupt_and_truncated_tars(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(3000))
    with pytest.raises(ShardError, match=f"shard {junk}: cannot read it as an uncompressed tar"):
        ShardIndex.build([str(junk)])
    path = write_shard(tmp_path / "cut.tar", ["clip0"])
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:700])  # inside the first member's data
    with pytest.raises(ShardError, match=f"shard {path}: .*unexpected end of data"):
        ShardIndex.build([path])


@pytest.mark.parametrize("raw_meta, expected", [
    (b"not json", "json member is not UTF-8 JSON"),
    (b"[1, 2]", "json member holds a list, expected a JSON object"),
])
def test_bad_json_names_file_and_key(tmp_path, raw_meta, expected):
    path = write_tar(tmp_path / "a.tar", [("clip3.tokens.npy", npy(clip(0))),
                                          ("clip3.json", raw_meta)])
    with pytest.raises(ShardError) as err:
        ShardIndex.build([path]).read(0)
    assert f"shard {path} sample 'clip3': {expected}" in str(err.value)


def test_bad_npy_names_file_and_key(tmp_path):
    path = write_tar(tmp_path / "a.tar", [("clip3.tokens.npy", b"garbage"),
                                          ("clip3.json", meta())])
    with pytest.raises(ShardError, match=f"shard {path} sample 'clip3': tokens.npy is not a"):
        ShardIndex.build([path]).read(0)


# -- checks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens, expected", [
    (np.zeros((2, 3, 5), np.uint8), "tokens have shape (2, 3, 5), expected (2, 3, 4) = model.grid"),
    (np.zeros(GRID, np.float32), "tokens have dtype float32, expected an integer dtype"),
    (np.full(GRID, VOCAB, np.uint16), "token id 10 at (t, h, w) = (0, 0, 0) is outside [0, 10)"),
    (np.full(GRID, -1, np.int8), "token id -1 at (t, h, w) = (0, 0, 0) is outside [0, 10)"),
])
def test_check_tokens_errors_name_file_and_key(tmp_path, tokens, expected):
    path = write_tar(tmp_path / "a.tar", [("clip9.tokens.npy", npy(tokens)),
                                          ("clip9.json", meta())])
    index = ShardIndex.build([path])
    with pytest.raises(ShardError) as err:
        check_tokens(index.read(0).tokens, grid=GRID, vocab_size=VOCAB, where=index.where(0))
    assert str(err.value).startswith(f"shard {path} sample 'clip9': {expected}")


def test_check_tokens_accepts_any_integer_dtype():
    for dtype in (np.uint8, np.uint16, np.uint32, np.int16, np.int64):
        out = check_tokens(clip(1, dtype), grid=GRID, vocab_size=VOCAB, where="x")
        assert out.dtype == np.int64
        np.testing.assert_array_equal(out, clip(1))


def test_check_meta():
    assert check_meta({"label": -1, "source": "s"}, where="w") == -1
    for bad, expected in [({"source": "s"}, "'label' is None"),
                          ({"label": True, "source": "s"}, "'label' is True"),
                          ({"label": 2}, "'source' is None")]:
        with pytest.raises(ShardError, match=f"w: json {expected}"):
            check_meta(bad, where="w")
