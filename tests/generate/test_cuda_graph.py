"""CUDA-graph generation steps replay exactly what the eager steps compute (GPU), and refuse a
model that is not on a GPU (CPU).

Legend: B batch; S a step's input length; L block length.
"""

from __future__ import annotations

import pytest
import torch

from nbp_mega.generate import StaticKVCache, generate
from nbp_mega.generate.cuda_graph import GraphedSteps
from nbp_mega.model import NBPTransformer
from nbp_mega.ops import use_attention_impl
from nbp_mega.parallel.layers import TensorParallel
from tests.conftest import tiny_model_config


def build(dims, device: str, **changes) -> NBPTransformer:
    torch.manual_seed(0)
    cfg = tiny_model_config(**changes)
    return NBPTransformer(cfg, TensorParallel(dims, init_std=cfg.init_std)).to(device).eval()


def test_graphed_steps_refuse_a_cpu_model(dims):
    model = build(dims, "cpu")
    cache = StaticKVCache.for_model(model, 2)
    with pytest.raises(ValueError, match="parameters are on cpu; move the model to a CUDA"):
        GraphedSteps(model, cache, 2)
    with pytest.raises(ValueError, match="parameters are on cpu; move the model to a CUDA"):
        generate(model, seeds=[0, 1], cuda_graph=True)


def steps_of(model, input_ids):
    """(start, ids) of a generation: the prefill of the start slots, then block by block."""
    layout, L = model.layout, model.layout.block_len
    first = layout.num_slots
    yield 0, input_ids[:, :first]
    for pos in range(first, layout.seq_len, L):
        yield pos, input_ids[:, pos:pos + L]


@pytest.mark.gpu
@pytest.mark.parametrize("block", [[1, 1, 8], [1, 1, 1]], ids=["rows", "ntp"])
def test_graphed_steps_equal_eager_steps(dims, block):
    model = build(dims, "cuda", block_shape=block, num_classes=3)
    tokens = torch.randint(0, 50, (2, *model.cfg.grid))
    input_ids = model.layout.build(tokens, torch.tensor([0, 2]))[0].cuda()
    eager_cache = StaticKVCache.for_model(model, 2)
    graph_cache = StaticKVCache.for_model(model, 2)
    steps = GraphedSteps(model, graph_cache, 2)
    for clip in range(2):  # the second clip replays the graphs captured by the first
        ids = input_ids if clip == 0 else input_ids.flip(0)
        with torch.no_grad(), use_attention_impl(steps.attention):
            for start, step_ids in steps_of(model, ids):
                eager = model.hidden_states(step_ids, start, eager_cache)
                torch.testing.assert_close(steps(step_ids, start), eager, atol=1e-5, rtol=1e-5)
                n = step_ids.shape[1]
                torch.testing.assert_close(steps.logits(step_ids, start, n),
                                           model.logits(eager), atol=1e-5, rtol=1e-5)
        assert steps.num_graphs == 2 * len(list(steps_of(model, ids)))  # none recaptured
    torch.testing.assert_close(graph_cache.k, eager_cache.k, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("changes", [dict(block_shape=[1, 1, 8], num_classes=3),
                                     dict(block_shape=[1, 1, 1], num_classes=3),
                                     dict(text_len=4, text_vocab=20, hybrid_start=True)],
                         ids=["rows", "ntp", "text-hybrid"])
def test_generate_with_cuda_graphs_equals_eager(dims, changes):
    model = build(dims, "cuda", **changes)
    cond = ({"labels": torch.tensor([2, 0])} if model.cfg.num_classes else
            {"text": torch.randint(0, 20, (2, 4))})
    with use_attention_impl("block_loop"):  # the graphs' attention
        eager = generate(model, seeds=[3, 4], **cond)
        graphed = generate(model, seeds=[3, 4], cuda_graph=True, **cond)
        steps = GraphedSteps.for_model(model, 2)
        captured = steps.num_graphs
        again = generate(model, seeds=[3, 4], cuda_graph=True, **cond)
    assert torch.equal(graphed, eager) and torch.equal(again, eager)
    assert captured > 0 and steps.num_graphs == captured  # the second call replays them
