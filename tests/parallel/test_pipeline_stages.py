"""Pipeline stages on one process: what each stage holds, that the stages chained are the
model, how layers are balanced over stages, and the jobs refused at start."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nbp_mega.config import load_config
from nbp_mega.config_fields import ConfigError
from nbp_mega.model import NBPTransformer
from nbp_mega.model.transformer import Stage
from nbp_mega.parallel.dims import ParallelConfig
from nbp_mega.parallel.layers import TensorParallel
from nbp_mega.parallel.pipeline import check_pipeline, stage_layers, stage_of
from tests.conftest import tiny_model_config

VARIANTS = [dict(family="gpt", position="learned_1d", num_classes=3),
            dict(family="llama", position="rope_3d", num_classes=0)]


def build(dims, cfg, stage=None) -> NBPTransformer:
    torch.manual_seed(0)
    return NBPTransformer(cfg, TensorParallel(dims, init_std=cfg.init_std), stage).eval()


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v["family"])
def test_stages_hold_their_parts_initialised_as_the_whole_model(dims, variant):
    """Three stages of a 5-layer model: each holds only its parts, under the model's names,
    with the whole model's values; the states passed stage to stage give its loss."""
    cfg = tiny_model_config(layers=5, **variant)
    whole = build(dims, cfg)
    parallel = ParallelConfig(pipeline=3, pipeline_layers=[1, 3, 1], zero_stage=1)
    stages = [build(dims, cfg, stage_of(cfg, parallel, s)) for s in range(3)]
    names = [set(dict(s.named_parameters())) for s in stages]
    assert set.union(*names) == set(dict(whole.named_parameters()))
    assert not (names[0] & names[1]) and not (names[1] & names[2])
    assert "tok_emb.weight" in names[0] and "head.linear.weight" in names[2]
    assert {n.split(".")[1] for n in names[1] if n.startswith("layers.")} == {"1", "2", "3"}
    reference = dict(whole.named_parameters())
    for stage in stages:
        for name, p in stage.named_parameters():
            assert torch.equal(p, reference[name]), name

    tokens = torch.randint(0, cfg.vocab_size, (2, *cfg.grid))
    labels = torch.tensor([1, 2]) if cfg.num_classes else None
    input_ids, targets = whole.layout.build(tokens, labels)
    with torch.no_grad():
        expected = whole(input_ids, targets)
        x = input_ids
        for stage in stages:
            x = stage(x)  # no targets: the stage's part of the forward (the engine's call)
        got = stages[-1].loss(x, targets)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="another pipeline stage"):
        stages[0].layers[1](x, None, 0)


def test_a_stage_recomputes_its_layers_with_activation_checkpointing(dims):
    """The middle stage of 3 with activation checkpointing runs each of its layers twice per
    step (forward, and again in backward: a pre-hook, as the recompute stops early once it has
    what backward needs) and gives the gradients of the plain stage."""
    cfg = tiny_model_config(layers=3, family="llama", position="rope_3d", num_classes=0)
    parallel = ParallelConfig(pipeline=3, zero_stage=1)
    stages = [build(dims, dataclasses.replace(cfg, activation_checkpointing=ckpt),
                    stage_of(cfg, parallel, 1)).train() for ckpt in (False, True)]
    x = torch.randn(2, stages[0].layout.seq_len, stages[0].cfg.hidden)
    calls = {False: 0, True: 0}
    grads = {}
    for ckpt, stage in zip((False, True), stages, strict=True):
        stage.layers[1].register_forward_pre_hook(
            lambda *_, c=ckpt: calls.__setitem__(c, calls[c] + 1))
        stage(x).square().mean().backward()
        grads[ckpt] = {n: p.grad for n, p in stage.named_parameters()}
    assert calls == {False: 1, True: 2}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-6, atol=1e-7)


def test_weights_do_not_depend_on_what_else_was_built(dims):
    """Each part has its own seed: a model's layer 1 is the same whether or not the process
    also built layer 0 and the embedding, and another seed gives other weights."""
    cfg = tiny_model_config(layers=3)
    a = build(dims, cfg)
    b = build(dims, cfg, Stage(1, 2, 1, 3))
    key = "layers.1.mlp.fc.linear.weight"
    assert torch.equal(dict(a.named_parameters())[key], dict(b.named_parameters())[key])
    torch.manual_seed(1)
    c = NBPTransformer(cfg, TensorParallel(dims, init_std=cfg.init_std))
    assert not torch.equal(dict(a.named_parameters())[key], dict(c.named_parameters())[key])


def test_balance_by_parameters_by_compute_or_given():
    """With a big vocabulary the embedding and head weigh several layers: balancing by
    parameters gives the end stages fewer layers; by compute only the head's stage has
    fewer (the embedding is a lookup); a given split is taken as it is."""
    big_vocab = tiny_model_config(layers=12, hidden=64, vocab_size=4096, num_classes=0,
                                  family="llama", position="rope_3d")
    by_params = stage_layers(big_vocab, ParallelConfig(pipeline=4, zero_stage=1))
    by_compute = stage_layers(big_vocab, ParallelConfig(pipeline=4, zero_stage=1,
                                                        pipeline_balance="compute"))
    assert sum(by_params) == sum(by_compute) == 12
    assert by_params[0] < by_params[1] and by_params[-1] < by_params[1]
    assert by_compute[0] > by_params[0] and by_compute[-1] < by_compute[0]
    small = tiny_model_config(layers=8, hidden=64, vocab_size=16, num_classes=0,
                              family="llama", position="rope_3d")  # ends weigh little
    assert stage_layers(small, ParallelConfig(pipeline=4, zero_stage=1)) == [2, 2, 2, 2]
    given = ParallelConfig(pipeline=3, zero_stage=1, pipeline_layers=[2, 5, 5])
    assert stage_layers(dataclasses.replace(small, layers=12), given) == [2, 5, 5]
    assert stage_of(small, ParallelConfig(pipeline=4, zero_stage=1), 2) == Stage(2, 4, 4, 6)


def test_jobs_that_cannot_pipeline_are_refused_with_the_alternatives():
    with pytest.raises(ConfigError, match="supports only ZeRO stage 0 or 1"):
        load_config(None, ["parallel.pipeline=2", "parallel.zero_stage=3"])
    with pytest.raises(ConfigError, match="has 3 stages, parallel.pipeline=2"):
        load_config(None, ["parallel.pipeline=2", "parallel.zero_stage=1",
                           "parallel.pipeline_layers=[1,1,1]"])
    tiny = ["model.layers=2", "parallel.zero_stage=1", "train.global_batch=8"]
    cfg = load_config(None, [*tiny, "parallel.pipeline=3"])
    with pytest.raises(ConfigError, match=r"model.layers=2 cannot be split into parallel."
                                          r"pipeline=3 stages.*tensor parallelism"):
        check_pipeline(cfg, dp=1)
    cfg = load_config(None, [*tiny, "parallel.pipeline=2", "parallel.pipeline_layers=[1,2]"])
    with pytest.raises(ConfigError, match="sums to 3 layers, the model has model.layers=2"):
        check_pipeline(cfg, dp=1)
    cfg = load_config(None, [*tiny, "parallel.pipeline=2", "train.micro_batch=4"])
    with pytest.raises(ConfigError, match=r"1 micro-batch\(es\) per step.*at least 2 "
                                          r"micro-batches.*train.micro_batch to <= 2"):
        check_pipeline(cfg, dp=2)
    check_pipeline(load_config(None, [*tiny, "parallel.pipeline=2", "train.micro_batch=2"]),
                   dp=2)  # 2 micro-batches of 2 per rank for 2 stages: runs
