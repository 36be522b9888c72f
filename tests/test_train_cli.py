"""The training entry point's argument handling and its early, clear failures."""

from __future__ import annotations

import os

import pytest
import torch

from nbp_mega.config import load_config, to_dict
from nbp_mega.config_fields import ConfigError
from nbp_mega.data.shards import ShardError
from nbp_mega.train import check_resume_compatible, main, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def test_deepspeed_local_rank_argument_is_consumed(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert parse_args(["--local_rank=1", TINY, "train.steps=3"]) == (TINY, ["train.steps=3"])
    assert os.environ["LOCAL_RANK"] == "1"
    assert parse_args([TINY, "--local_rank", "0"]) == (TINY, [])


def test_missing_shards_fail_before_training(dims, tmp_path):
    with pytest.raises(ShardError, match="shard-"):
        main([TINY, f"run_dir={tmp_path}", f"data.shards={tmp_path}/shard-{{000..003}}.tar"])
    with pytest.raises(ConfigError, match="data.shards is empty"):
        main([TINY, f"run_dir={tmp_path}", "data.shards="])


def test_unknown_key_fails(dims, tmp_path):
    with pytest.raises(ConfigError, match="train.stepz"):
        main([TINY, f"run_dir={tmp_path}", "train.stepz=3"])


def test_resume_refuses_another_model_or_layout(dims):
    state = {"config": to_dict(load_config(TINY)),
             "layout": {"tp": 1, "dp": 1, "zero_stage": 3, "precision": "fp32"}}
    other = load_config(TINY, ["model.block_shape=[1,2,4]", "model.hidden=64"])
    with pytest.raises(ConfigError) as e:
        check_resume_compatible(state, other, dims)
    assert "model.block_shape: checkpoint [1, 1, 8] vs [1, 2, 4]" in str(e.value)
    assert "model.hidden: checkpoint 128 vs 64" in str(e.value)
    assert check_resume_compatible(state, load_config(TINY, ["train.steps=5"]), dims) is False
    with pytest.raises(ConfigError, match="zero_stage=3, this job has 2"):
        check_resume_compatible(state, load_config(TINY, ["parallel.zero_stage=2"]), dims)
    state["layout"]["dp"] = 2  # another data-parallel size: loads (through universal)
    assert check_resume_compatible(state, load_config(TINY), dims) is True
    state["layout"]["tp"] = 2  # another tensor-parallel size: loads resharded (universal)
    assert check_resume_compatible(state, load_config(TINY), dims) is True
    state["layout"]["dp"] = 1  # ... even on the same dp
    assert check_resume_compatible(state, load_config(TINY), dims) is True
    zero0 = {**state, "layout": {**state["layout"], "zero_stage": 0}}
    with pytest.raises(ConfigError, match="parallel.tensor=2, this job has 1: changing tensor "
                       "or pipeline parallelism on resume goes through DeepSpeed's universal "
                       "checkpoint"):
        check_resume_compatible(zero0, load_config(TINY, ["parallel.zero_stage=0"]), dims)
    state["layout"].update(tp=1, pp=2)  # another number of pipeline stages: universal too
    assert check_resume_compatible(state, load_config(TINY), dims) is True
    zero0 = {**state, "layout": {**state["layout"], "zero_stage": 0}}
    with pytest.raises(ConfigError, match="parallel.pipeline=2, this job has 1"):
        check_resume_compatible(zero0, load_config(TINY, ["parallel.zero_stage=0"]), dims)


def test_init_from_weights_of_another_model_is_refused(dims, tmp_path):
    from nbp_mega.export import write_state_dict
    from nbp_mega.export.weights import Weights
    from nbp_mega.model import NBPTransformer
    from nbp_mega.parallel.layers import TensorParallel
    from nbp_mega.train import init_weights

    source = load_config(TINY, ["model.dropout=0.3"])
    model = NBPTransformer(source.model, TensorParallel(dims))
    write_state_dict(source, Weights.of_model(model), str(tmp_path / "w.pt"))
    other = load_config(TINY, [f"train.init_from={tmp_path}/w.pt", "model.hidden=64"])
    target = NBPTransformer(other.model, TensorParallel(dims))
    with pytest.raises(ConfigError, match=r"holds a model of another config \(model.hidden: "
                       r"128 vs 64, model.ffn_hidden: 512 vs 256\)"):
        init_weights(target, other, dims)
    same = load_config(TINY, [f"train.init_from={tmp_path}/w.pt"])  # dropout may differ
    target = NBPTransformer(same.model, TensorParallel(dims))
    init_weights(target, same, dims)
    for (name, a), b in zip(model.state_dict().items(), target.state_dict().values(),
                            strict=True):
        assert (a is None and b is None) or torch.equal(a, b), name
