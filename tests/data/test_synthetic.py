"""Synthetic token videos: deterministic, in the shard format, and predictable."""

from __future__ import annotations

import filecmp
import json
import math
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds

from nbp_mega.data.shards import ShardIndex, check_tokens, expand_shards
from nbp_mega.data.synthetic import class_steps, main, write_synthetic_shards

ARGS = dict(num_train=48, num_val=10, grid=(4, 8, 8), vocab=32, classes=4, shard_size=20,
            seed=7, noise=0.02)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic")
    write_synthetic_shards(str(path), **ARGS)
    return path


def read_all(split_dir) -> tuple[list[np.ndarray], list[dict]]:
    index = ShardIndex.build(expand_shards(str(split_dir)))
    samples = [index.read(i) for i in range(len(index))]
    return [s.tokens for s in samples], [s.meta for s in samples]


def test_layout_and_manifest(out):
    assert sorted(os.listdir(out)) == ["manifest.json", "train", "val"]
    assert sorted(os.listdir(out / "train")) == [f"shard-00000{i}.tar" for i in range(3)]
    assert sorted(os.listdir(out / "val")) == ["shard-000000.tar"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vocab_size"] == 32 and manifest["grid"] == [4, 8, 8]
    assert manifest["num_classes"] == 4 and manifest["seed"] == 7
    assert manifest["counts"] == {"train": 48, "val": 10}
    assert manifest["dtype"] == "uint8"
    assert manifest["class_steps"] == [[0, 1], [1, 0], [0, -1], [-1, 0]]
    entropy = manifest["unigram_entropy_nats"]
    assert 0 < entropy < math.log(32)
    tokens, _ = read_all(out / "train")
    counts = np.bincount(np.concatenate([t.ravel() for t in tokens]), minlength=32)
    p = counts[counts > 0] / counts.sum()
    assert entropy == pytest.approx(float(-(p * np.log(p)).sum()))


def test_deterministic_to_the_byte(out, tmp_path):
    again = write_synthetic_shards(str(tmp_path / "again"), **ARGS)
    assert again == json.loads((out / "manifest.json").read_text())
    for split in ("train", "val"):
        names = sorted(os.listdir(out / split))
        match, mismatch, errors = filecmp.cmpfiles(out / split, tmp_path / "again" / split,
                                                   names, shallow=False)
        assert match == names and not mismatch and not errors
    other = write_synthetic_shards(str(tmp_path / "other"), **{**ARGS, "seed": 8})
    assert other["unigram_entropy_nats"] != again["unigram_entropy_nats"]


def test_rerun_replaces_old_shards(tmp_path):
    write_synthetic_shards(str(tmp_path), **ARGS)
    write_synthetic_shards(str(tmp_path), **{**ARGS, "num_train": 10, "num_val": 0})
    assert os.listdir(tmp_path / "train") == ["shard-000000.tar"]
    assert os.listdir(tmp_path / "val") == []


def test_readable_by_webdataset_and_tarfile(out):
    urls = sorted(str(p) for p in (out / "train").iterdir())
    dataset = wds.WebDataset(urls, shardshuffle=False).decode()
    samples = list(dataset)
    assert len(samples) == 48
    first = samples[0]
    assert first["__key__"] == "clip00000000"
    assert first["tokens.npy"].shape == (4, 8, 8) and first["tokens.npy"].dtype == np.uint8
    assert set(first["json"]) == {"label", "label_name", "source"}
    with tarfile.open(urls[0]) as tar:
        names = tar.getnames()
    assert names[:2] == ["clip00000000.json", "clip00000000.tokens.npy"]
    assert len(names) == 2 * 20


def test_samples_fit_the_model(out):
    tokens, metas = read_all(out / "val")
    for t in tokens:
        check_tokens(t, grid=(4, 8, 8), vocab_size=32, where="val")
    assert {m["label"] for m in metas} <= set(range(4))


def test_next_frame_is_previous_frame_moved_by_the_label(out):
    """Model-free: object tokens of frame t+1 sit where frame t's moved by the label's step."""
    manifest = json.loads((out / "manifest.json").read_text())
    steps = manifest["class_steps"]
    lo, hi = manifest["object_ids"]
    tokens, metas = read_all(out / "train")
    right = wrong = still = total_objects = total_bg = 0
    for video, meta in zip(tokens, metas, strict=True):
        dy, dx = steps[meta["label"]]
        for t in range(video.shape[0] - 1):
            now, nxt = video[t].astype(int), video[t + 1].astype(int)
            is_object = (nxt >= lo) & (nxt < hi)
            moved = np.roll(now, (dy, dx), axis=(0, 1))
            moved_back = np.roll(now, (-dy, -dx), axis=(0, 1))
            right += int((moved == nxt)[is_object].sum())
            wrong += int((moved_back == nxt)[is_object].sum())
            total_objects += int(is_object.sum())
            still += int((now == nxt)[~is_object].sum())
            total_bg += int((~is_object).sum())
    assert right / total_objects > 0.8  # the label says where objects go
    assert wrong / total_objects < 0.2
    assert still / total_bg > 0.85  # the background stays


def test_unlabelled_and_large_vocab(tmp_path):
    manifest = write_synthetic_shards(str(tmp_path), num_train=4, num_val=0, grid=(2, 8, 8),
                                      vocab=300, classes=0, shard_size=4, seed=0, noise=0.0)
    assert manifest["dtype"] == "uint16" and manifest["class_steps"] == []
    tokens, metas = read_all(tmp_path / "train")
    assert tokens[0].dtype == np.uint16
    assert all(m["label"] == -1 and "label_name" not in m for m in metas)


def test_class_steps_are_distinct():
    steps = class_steps(12)
    assert steps[:4] == [(0, 1), (1, 0), (0, -1), (-1, 0)]
    assert len(set(steps)) == 12 and (0, 0) not in steps


def test_vocab_too_small_and_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="vocab=5 is too small.*must be >= 6"):
        write_synthetic_shards(str(tmp_path), **{**ARGS, "vocab": 5})
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--vocab", "4"])
    assert "vocab=4 is too small" in capsys.readouterr().err
    main([str(tmp_path / "cli"), "--num-train", "3", "--num-val", "1", "--grid", "2", "4", "4",
          "--shard-size", "2"])
    assert "unigram entropy" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["grid"] == [2, 4, 4] and manifest["num_shards"] == {"train": 2, "val": 1}


def test_text_ids_spell_the_class_name_and_vary_in_length(out, tmp_path):
    assert json.loads((out / "manifest.json").read_text())["text"] is None
    assert not ShardIndex.build(expand_shards(str(out / "val"))).has_text(0)  # only if asked
    args = {**ARGS, "num_train": 24, "classes": 8, "text": True}
    manifest = write_synthetic_shards(str(tmp_path / "a"), **args)
    text = manifest["text"]
    assert (text["vocab"], text["bos_id"], text["eos_id"], text["first_id"]) == (43, 1, 2, 4)
    assert text["lengths"] == [5, 4, 4, 2, 10, 9, 7, 8]  # right down left up, the diagonals
    index = ShardIndex.build(expand_shards(str(tmp_path / "a" / "train")))
    names = set()
    for i in range(len(index)):
        sample = index.read(i, text=True)
        name = sample.meta["label_name"]
        assert sample.meta["text"] == name and sample.text.dtype == np.int32
        assert "".join(text["alphabet"][j - 4] for j in sample.text.tolist()) == name
        names.add(name)
    assert len(names) >= 6
    write_synthetic_shards(str(tmp_path / "b"), **args)
    for split in ("train", "val"):
        files = sorted(os.listdir(tmp_path / "a" / split))
        assert filecmp.cmpfiles(tmp_path / "a" / split, tmp_path / "b" / split, files,
                                shallow=False)[0] == files
    with pytest.raises(ValueError, match="text=True needs classes >= 1"):
        write_synthetic_shards(str(tmp_path / "c"), **{**args, "classes": 0})
    main([str(tmp_path / "cli"), "--num-train", "2", "--num-val", "0", "--grid", "2", "4", "4",
          "--text"])
    cli = ShardIndex.build(expand_shards(str(tmp_path / "cli" / "train")))
    assert cli.has_text(0) and len(cli.without_text()) == 0
