"""nbp_mega/tokenizer/text.py and tools/train_text_tokenizer.py: class names as text, a tiny
sentencepiece model trained from captions, load / encode / decode, errors."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from nbp_mega.tokenizer.text import (
    TextTokenizer,
    TextTokenizerError,
    class_name_to_text,
    fixed_text_ids,
    train_text_tokenizer,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAPTIONS = ["a person applies eye makeup", "a kid plays with a yo yo",
            "two people play table tennis", "a man walks two dogs in a park"]


@pytest.mark.parametrize("name, text", [
    ("ApplyEyeMakeup", "apply eye makeup"),  # UCF-101
    ("YoYo", "yo yo"),
    ("PlayingDaf", "playing daf"),
    ("HandstandPushups", "handstand pushups"),
    ("IPhoneCase", "i phone case"),  # an acronym ends before the next capitalised word
    ("Walk2Dogs", "walk 2 dogs"),
    ("playing_guitar", "playing guitar"),  # snake case
    ("three-legged race", "three-legged race"),  # Kinetics: already words
    ("  Mixed_CaseName ", "mixed case name"),
])
def test_class_names_become_lower_case_words(name, text):
    assert class_name_to_text(name) == text


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("text") / "captions.model")
    train_text_tokenizer(CAPTIONS + [class_name_to_text("ApplyEyeMakeup")], path, vocab_size=64)
    return path


def test_train_load_encode_decode(model_path):
    tok = TextTokenizer(model_path)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert 8 <= tok.vocab_size <= 64  # an upper bound: a tiny corpus gets fewer pieces
    ids = tok.encode(CAPTIONS)
    assert all(isinstance(i, int) and 4 <= i < tok.vocab_size for row in ids for i in row)
    assert tok.decode(ids) == CAPTIONS
    with_specials = tok.encode(CAPTIONS[:1], add_bos=True, add_eos=True)[0]
    assert with_specials[0] == tok.bos_id and with_specials[-1] == tok.eos_id
    assert tok.decode([with_specials]) == CAPTIONS[:1]
    assert len(tok.checksum()) == 64 and tok.name == "captions.model"


def test_encode_fixed_truncates_and_pads_like_the_paper(model_path):
    """transformers' slow LlamaTokenizer, pad = eos, padding to max_length, truncation: a
    short text is bos + ids + eos + eos...; a long one is bos + its first S - 1 ids, no eos."""
    tok = TextTokenizer(model_path)
    short, long = tok.encode(["yo yo", CAPTIONS[3]])
    assert len(short) <= 6 and len(long) > 7  # the two cases this test is about
    fixed = tok.encode_fixed(["yo yo", CAPTIONS[3]], 8)
    assert fixed.dtype == np.int32 and fixed.shape == (2, 8)
    assert fixed[0].tolist() == [tok.bos_id] + short + [tok.eos_id] * (7 - len(short))
    assert fixed[1].tolist() == [tok.bos_id] + long[:7]  # truncated: no eos kept
    assert (tok.encode_fixed(["yo yo"], 8, pad_id=tok.pad_id)[0].tolist()
            == [tok.bos_id] + short + [tok.eos_id] + [tok.pad_id] * (6 - len(short)))
    # exactly S - 1 pieces: the eos falls off too
    exact = fixed_text_ids(long[:7], 8, bos_id=1, eos_id=2)
    assert exact.tolist() == [1] + long[:7]
    with pytest.raises(TextTokenizerError, match=">= 2"):
        tok.encode_fixed(["yo yo"], 1)


def test_training_is_deterministic(model_path, tmp_path):
    again = train_text_tokenizer(CAPTIONS + ["apply eye makeup"], str(tmp_path / "b.model"),
                                 vocab_size=64)
    assert again.checksum() == TextTokenizer(model_path).checksum()


def test_bad_paths_and_inputs_say_what_is_wrong(model_path, tmp_path):
    with pytest.raises(TextTokenizerError, match="does not exist.*sentencepiece"):
        TextTokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "garbage.model").write_bytes(b"not a model" * 10)
    with pytest.raises(TextTokenizerError, match="not a sentencepiece model"):
        TextTokenizer(str(tmp_path / "garbage.model"))
    with pytest.raises(TextTokenizerError, match="list of texts"):
        TextTokenizer(model_path).encode("a single string")
    with pytest.raises(TextTokenizerError, match="no text"):
        train_text_tokenizer(["", "  "], str(tmp_path / "empty.model"))
    with pytest.raises(TextTokenizerError, match="vocab_size"):
        train_text_tokenizer(CAPTIONS, str(tmp_path / "small.model"), vocab_size=4)


def test_cli_trains_from_class_folders_tables_manifests_and_text(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import train_text_tokenizer as cli
    finally:
        sys.path.pop(0)
    for cls in ("ApplyEyeMakeup", "YoYo"):
        os.makedirs(tmp_path / "ucf" / cls)
        (tmp_path / "ucf" / cls / f"v_{cls}_g01_c01.avi").write_bytes(b"")
    (tmp_path / "list.csv").write_text("path,label,caption\na.mp4,TableTennis,two people "
                                       "play table tennis\n")
    (tmp_path / "manifest.json").write_text(json.dumps({"label_map": {"WalkingWithDog": 0}}))
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    assert cli.texts_from(str(tmp_path / "ucf")) == ["apply eye makeup", "yo yo"]
    assert cli.texts_from(str(tmp_path / "list.csv")) == ["two people play table tennis",
                                                          "table tennis"]
    assert cli.texts_from(str(tmp_path / "manifest.json")) == ["walking with dog"]
    out = str(tmp_path / "text.model")
    args = ["--output", out, "--vocab-size", "64"]
    for source in ("ucf", "list.csv", "manifest.json", "captions.txt"):
        args += ["--input", str(tmp_path / source)]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["texts"] == 2 + 2 + 1 + len(CAPTIONS)
    assert TextTokenizer(out).decode(TextTokenizer(out).encode(["yo yo"])) == ["yo yo"]
    assert cli.main(["--input", str(tmp_path / "nothing"), "--output", out]) == 1
    assert "does not exist" in capsys.readouterr().err
