"""Generation: the KV-cached block steps equal the full forward, greedy decoding equals a
decoder that reruns the whole sequence, and samples depend only on their seed.

Legend: B batch; L block length; V vocabulary.
"""

from __future__ import annotations

import pytest
import torch

from nbp_mega.generate import SamplingConfig, StaticKVCache, filter_logits, generate, sample
from nbp_mega.model import NBPTransformer
from nbp_mega.model.sequence import cond_drop_mask
from nbp_mega.parallel.layers import TensorParallel
from tests.conftest import tiny_model_config

VARIANTS = [dict(family="gpt", position="learned_1d"), dict(family="gpt", position="learned_3d"),
            dict(family="llama", position="rope_3d")]
BLOCKS = [[1, 1, 1], [1, 1, 8], [1, 2, 2], [2, 2, 2]]
GREEDY = SamplingConfig(temperature=0.0)


def build(dims, **changes) -> NBPTransformer:
    torch.manual_seed(0)
    cfg = tiny_model_config(**changes)
    return NBPTransformer(cfg, TensorParallel(dims, init_std=cfg.init_std)).eval()


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v['family']}-{v['position']}")
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: "x".join(map(str, b)))
@pytest.mark.parametrize("start_block", [True, False])
def test_cached_block_steps_equal_the_full_forward(dims, variant, block, start_block):
    model = build(dims, block_shape=block, num_classes=3, start_block=start_block, **variant)
    layout, L = model.layout, model.layout.block_len
    tokens = torch.randint(0, 50, (2, *model.cfg.grid))
    input_ids, _ = layout.build(tokens, torch.tensor([0, 2]))
    with torch.no_grad():
        full = model.hidden_states(input_ids)
        cache = StaticKVCache.for_model(model, 2)
        first = layout.num_slots + (0 if start_block else L)  # prefill: conditioning
        steps = [model.hidden_states(input_ids[:, :first], 0, cache)]
        for pos in range(first, layout.seq_len, L):
            steps.append(model.hidden_states(input_ids[:, pos:pos + L], pos, cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def rerun_greedy(model, labels, context_frames: int, tokens, scale: float = 1.0):
    """The oracle: every step reruns the whole training-form sequence, no cache (with
    guidance: the conditional and the unconditional sequence, combined as u + s (c - u))."""
    layout, L = model.layout, model.layout.block_len
    seq = layout.blocks.to_blocks(tokens).clone()
    first = context_frames * model.cfg.grid[1] * model.cfg.grid[2] // L
    seq[:, first * L:] = 0
    for block in range(first, layout.blocks.num_blocks):
        P = layout.prefix_len
        target = block * L - (0 if model.cfg.start_block else L)  # target index of the block
        rows = [None] if scale == 1.0 else [None, torch.ones(len(seq), dtype=torch.bool)]
        logits = []
        for drop in rows:
            input_ids, _ = layout.build(layout.blocks.from_blocks(seq), labels, drop)
            with torch.no_grad():
                h = model.hidden_states(input_ids)
            logits.append(model.logits(h[:, P + target:P + target + L]))
        if scale != 1.0:
            c, u = logits
            logits = [torch.where(torch.isfinite(c), u + scale * (c - u), c)]
        seq[:, block * L:(block + 1) * L] = logits[0].argmax(-1)
    return layout.blocks.from_blocks(seq)


@pytest.mark.parametrize("variant", VARIANTS[::2], ids=lambda v: v["family"])
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: "x".join(map(str, b)))
def test_greedy_generation_equals_rerunning_the_sequence(dims, variant, block):
    model = build(dims, block_shape=block, num_classes=3, **variant)
    labels = torch.tensor([1, 2])
    got = generate(model, seeds=[0, 1], labels=labels, sampling=GREEDY)
    assert got.shape == (2, *model.cfg.grid)
    expected = rerun_greedy(model, labels, 0, torch.zeros_like(got))
    assert torch.equal(got, expected)


def test_frame_prediction_keeps_the_context_and_continues_it(dims):
    # The K600 layout: no start block, the first latent frame given.
    model = build(dims, block_shape=[1, 2, 2], start_block=False)
    context = torch.randint(0, 50, (2, 1, 4, 8))
    got = generate(model, seeds=[3, 4], context=context, sampling=GREEDY)
    assert torch.equal(got[:, :1], context)
    full = torch.cat([context, torch.zeros(2, 1, 4, 8, dtype=torch.long)], dim=1)
    assert torch.equal(got, rerun_greedy(model, None, 1, full))


def test_a_sample_depends_only_on_its_seed(dims):
    model = build(dims, block_shape=[1, 1, 8], num_classes=3)
    sampling = SamplingConfig(temperature=1.0, top_k=20, top_p=0.95)
    seeds, labels = list(range(100, 108)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    batch = generate(model, seeds=seeds, labels=labels, sampling=sampling)
    alone = generate(model, seeds=[seeds[3]], labels=labels[3:4], sampling=sampling)
    assert torch.equal(batch[3:4], alone)
    other = generate(model, seeds=[999], labels=labels[3:4], sampling=sampling)
    assert not torch.equal(other, alone)  # the seed matters


def test_a_reused_kv_cache_gives_a_fresh_caches_tokens(dims):
    """The cache stays on the model between calls; what a call leaves in it (another clip's
    keys and values, all of its positions) never reaches the next call's tokens."""
    model = build(dims, block_shape=[1, 2, 2], num_classes=3)
    sampling = SamplingConfig(temperature=1.0, top_k=20, top_p=0.95)
    labels = torch.tensor([2, 1])
    generate(model, seeds=[7, 8], labels=torch.tensor([0, 0]), sampling=sampling)
    cache = model._generation_kv_cache
    assert cache.k.abs().sum() > 0  # the first call left its keys everywhere
    reused = generate(model, seeds=[1, 2], labels=labels, sampling=sampling)
    assert model._generation_kv_cache is cache
    del model._generation_kv_cache
    fresh = generate(model, seeds=[1, 2], labels=labels, sampling=sampling)
    assert model._generation_kv_cache is not cache
    assert torch.equal(reused, fresh)


def test_filters_keep_what_they_promise():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    top2 = filter_logits(logits, SamplingConfig(top_k=2, top_p=1.0))
    assert torch.isinf(top2[0, 0, 2:]).all() and torch.isfinite(top2[0, 0, :2]).all()
    nucleus = filter_logits(logits, SamplingConfig(top_k=0, top_p=0.8))  # 0.5 + 0.3 reach it
    assert torch.isfinite(nucleus[0, 0]).tolist() == [True, True, False, False]
    gens = [torch.Generator().manual_seed(s) for s in range(2)]
    assert sample(logits.expand(2, 1, 4), SamplingConfig(top_k=1), gens).tolist() == [[0], [0]]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = probs.log().view(1, 1, 4).expand(1, 4000, 4)
    ids = sample(logits, SamplingConfig(top_k=0, top_p=1.0), [torch.Generator().manual_seed(0)])
    freq = torch.bincount(ids.flatten(), minlength=4).float() / ids.numel()
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)  # never the impossible token


def test_conditioning_errors(dims):
    model = build(dims, num_classes=3)
    with pytest.raises(ValueError, match="model.num_classes > 0 but the batch has no labels"):
        generate(model, seeds=[0])
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 3\)"):
        generate(model, seeds=[0], labels=torch.tensor([3]))
    with pytest.raises(ValueError, match="not class-conditional"):
        generate(build(dims), seeds=[0], labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="not text-conditional"):
        generate(model, seeds=[0], labels=torch.tensor([0]), text=torch.ones(1, 4).long())
    with pytest.raises(ValueError, match=r"ids in \[0, 50\)"):
        generate(model, seeds=[0], labels=torch.tensor([0]),
                 context=torch.full((1, 1, 4, 8), 50, dtype=torch.long))
    k600 = build(dims, start_block=False)
    with pytest.raises(ValueError, match="block 0 is context only"):
        generate(k600, seeds=[0])
    cube = build(dims, block_shape=[2, 2, 2])
    with pytest.raises(ValueError, match="multiple of the block's 2 frames"):
        generate(cube, seeds=[0], context=torch.zeros(1, 1, 4, 8, dtype=torch.long))


def test_classifier_free_guidance_equals_the_two_sequence_oracle(dims):
    model = build(dims, block_shape=[1, 2, 2], num_classes=3, cond_dropout=0.1)
    labels = torch.tensor([0, 2])
    guided = generate(model, seeds=[0, 1], labels=labels,
                      sampling=SamplingConfig(temperature=0.0, guidance_scale=3.0))
    zeros = torch.zeros_like(guided)
    assert torch.equal(guided, rerun_greedy(model, labels, 0, zeros, scale=3.0))
    plain = generate(model, seeds=[0, 1], labels=labels, sampling=GREEDY)  # scale 1: no twins
    assert torch.equal(plain, rerun_greedy(model, labels, 0, zeros))
    assert not torch.equal(guided, plain)


def test_guidance_needs_a_model_trained_for_it(dims):
    model = build(dims, num_classes=3)
    with pytest.raises(ValueError, match="trained with model.cond_dropout > 0"):
        generate(model, seeds=[0], labels=torch.tensor([1]),
                 sampling=SamplingConfig(guidance_scale=2.0))


def test_condition_dropout_mask_and_token(dims):
    whole = cond_drop_mask(7, 12, 64, 0, 64, 0.25)
    halves = [cond_drop_mask(7, 12, 64, 32 * r, 32, 0.25) for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)  # the same clips at any dp
    assert not torch.equal(whole, cond_drop_mask(7, 13, 64, 0, 64, 0.25))  # a new draw a step
    rate = torch.stack([cond_drop_mask(0, s, 64, 0, 64, 0.25) for s in range(50)]).float()
    assert abs(rate.mean().item() - 0.25) < 0.03
    model = build(dims, num_classes=3, cond_dropout=0.1)
    layout = model.layout
    assert layout.embed_vocab == build(dims, num_classes=3).layout.embed_vocab + 1
    ids, _ = layout.build(torch.zeros(2, 2, 4, 8, dtype=torch.long), torch.tensor([1, 2]),
                          torch.tensor([True, False]))
    assert ids[:, 0].tolist() == [layout.null_token, layout.class_offset + 2]
