"""A text-conditional model with the paper's hybrid start, end to end: trained by
nbp_mega.train on shards with .text.npy (ZeRO-3), its weights reproduce the logged validation
loss under the layout (so training built the hybrid input/target/mask the layout describes),
and tools/sample.py --prompts generates from text through a sentencepiece model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import pytest
import torch

from nbp_mega.data.synthetic import TEXT_VOCAB, write_synthetic_shards
from nbp_mega.generate import SamplingConfig, generate
from nbp_mega.generate.load import load_trained_model
from nbp_mega.metrics import read_metrics
from nbp_mega.tokenizer.text import TextTokenizer, train_text_tokenizer
from tests.conftest import tiny_model_config
from tests.generate.test_load import validation_loss
from tests.test_bench_tools import load_tool
from tests.test_train import ROOT, overrides, run

pytestmark = pytest.mark.distributed
TEXT = ["model.num_classes=0", "model.text_len=5", f"model.text_vocab={TEXT_VOCAB}",
        "model.hybrid_start=true", "model.cond_dropout=0.2"]
CAPTIONS = ["a person applies eye makeup", "a kid plays with a yo yo", "up", "down", "left",
            "two people play table tennis", "a man walks two dogs in a park", "right",
            "the square moves up and to the left", "a red circle drifts down"] * 3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    shards = tmp_path_factory.mktemp("text_shards")
    write_synthetic_shards(str(shards), num_train=64, num_val=16, grid=(2, 4, 8), vocab=32,
                           classes=4, shard_size=16, seed=0, noise=0.02, text=True)
    out = shards.parent / "text_run"
    run([sys.executable, "-m", "nbp_mega.train", f"{ROOT}/configs/tiny.yaml",
         *overrides(shards, out, "parallel.zero_stage=3", "train.steps=4",
                    "train.eval_every=2", *TEXT)], cwd=shards.parent)
    return out


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "captions.model"
    tok = train_text_tokenizer(CAPTIONS, str(path), vocab_size=TEXT_VOCAB)
    assert tok.vocab_size == TEXT_VOCAB  # the model's text vocabulary
    return str(path)


def test_a_hybrid_text_model_trains_and_reloads(run_dir, dims):
    records, evals = read_metrics(os.path.join(run_dir, "metrics.jsonl"))[:2]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] < records[0]["loss"]
    model, cfg = load_trained_model(str(run_dir), dims=dims)
    assert model.layout.hybrid and model.layout.text_len == 5
    assert validation_loss(model, cfg) == pytest.approx(evals[-1]["val_loss"], rel=1e-5)


def test_sampling_from_prompts(run_dir, text_tokenizer, dims, tmp_path):
    tool = load_tool("sample")
    prompts = ["a kid plays with a yo yo", "up"]
    assert tool.main([str(run_dir), "--out", str(tmp_path), "--num", "2", "--greedy",
                      "--prompts", *prompts, "--text-tokenizer", text_tokenizer]) == 0
    tokens = np.load(tmp_path / "tokens.npy")
    meta = json.loads((tmp_path / "samples.json").read_text())
    ids = TextTokenizer(text_tokenizer).encode_fixed(prompts, 5)
    assert ids[0, -1] != 2 and ids[1, -1] == 2  # one truncated text, one padded
    model = load_trained_model(str(run_dir), dims=dims)[0]
    expected = generate(model, seeds=[0, 1], text=torch.from_numpy(ids).long(),
                        sampling=SamplingConfig(temperature=0.0))
    assert np.array_equal(tokens, expected.numpy())
    assert meta["text_ids"] == ids.tolist() and meta["prompts"] == prompts
    assert meta["steps"] == 8 + 7  # block 0 token by token, then one step per block


def test_prompts_are_checked(text_tokenizer, tmp_path):
    tool = load_tool("sample")
    cfg = tiny_model_config(text_len=5, text_vocab=TEXT_VOCAB + 1)

    def args(**kw):
        return argparse.Namespace(**{"prompts": ["up"], "num": 2,
                                     "text_tokenizer": text_tokenizer, **kw})

    with pytest.raises(tool.UsageError, match=r"vocabulary/bos/eos \(43, 1, 2\), the model "
                                              r"was trained with \(44, 1, 2\)"):
        tool.text_for(args(), cfg)
    with pytest.raises(tool.UsageError, match="expected --prompts with 1 or 2 texts"):
        tool.text_for(args(prompts=None), cfg)
    with pytest.raises(tool.UsageError, match="not text-conditional"):
        tool.text_for(args(), tiny_model_config(num_classes=3))
