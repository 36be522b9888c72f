"""The model end to end on one process: causality of the NBP mask, both families."""

from __future__ import annotations

import pytest
import torch

from nbp_mega.model import NBPTransformer
from nbp_mega.parallel.layers import TensorParallel
from tests.conftest import tiny_model_config

VARIANTS = [
    dict(family="gpt", position="learned_1d"),
    dict(family="gpt", position="learned_3d"),
    dict(family="llama", position="rope_3d"),
]


def build(dims, **changes) -> NBPTransformer:
    torch.manual_seed(0)
    cfg = tiny_model_config(**changes)
    return NBPTransformer(cfg, TensorParallel(dims, init_std=cfg.init_std)).eval()


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v['family']}-{v['position']}")
@pytest.mark.parametrize("block", [[1, 1, 1], [1, 1, 8], [1, 2, 2], [2, 2, 2]])
def test_block_causal_dependencies(dims, variant, block):
    """Perturbing block i+1 never changes outputs of blocks <= i; inside a block it does."""
    model = build(dims, block_shape=block, num_classes=3, **variant)
    seq = model.layout
    P, L = seq.prefix_len, seq.block_len
    tokens = torch.randint(0, 50, (1, *model.cfg.grid))
    input_ids, _ = seq.build(tokens, torch.tensor([1]))
    with torch.no_grad():
        base = model.hidden_states(input_ids)
    n_blocks = (seq.seq_len - P) // L
    for i in range(1, n_blocks - 1):
        changed = input_ids.clone()
        pos = P + i * L + (L - 1)  # last token of input block i
        changed[0, pos] = (changed[0, pos] + 7) % 50
        with torch.no_grad():
            out = model.hidden_states(changed)
        diff = (out - base).abs().amax(dim=-1)[0]  # [S]
        assert diff[: P + i * L].max() == 0, f"block {i} leaked into earlier blocks"
        assert diff[pos] > 0
        if L > 1:  # bidirectional inside the block: the first token sees the last
            assert diff[P + i * L] > 0
    # The class prefix is visible to every position.
    with torch.no_grad():
        out = model.hidden_states(seq.build(tokens, torch.tensor([2]))[0])
    assert (out - base).abs().amax(dim=-1).min() > 0


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v['family']}-{v['position']}")
def test_loss_shapes_and_padding(dims, variant):
    model = build(dims, **variant)
    tokens = torch.randint(0, 50, (2, *model.cfg.grid))
    input_ids, targets = model.layout.build(tokens)
    loss = model(input_ids, targets)
    assert loss.shape == targets.shape
    # Padded vocabulary rows (ids >= 50 of the 64 head rows) get no probability.
    logits = model.logits(model.hidden_states(input_ids))
    assert logits.shape[-1] == 64 and torch.isinf(logits[..., 50:]).all()
    probs = logits.softmax(-1)
    assert torch.allclose(probs[..., :50].sum(-1), torch.ones(()), atol=1e-5)
    loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_activation_checkpointing_same_gradients(dims):
    grads = []
    for ckpt in (False, True):
        model = build(dims, activation_checkpointing=ckpt, dropout=0.1).train()
        torch.manual_seed(1)
        tokens = torch.randint(0, 50, (2, *model.cfg.grid))
        model(*model.layout.build(tokens)).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_llama_has_no_biases_and_gpt_does(dims):
    names = {f: [n for n, _ in build(dims, family=f, position="rope_3d").named_parameters()]
             for f in ("gpt", "llama")}
    assert any(n.endswith("bias") for n in names["gpt"])
    assert not any(n.endswith("bias") for n in names["llama"])


@pytest.mark.parametrize("chunk", [7, 32, 128])  # 128 = the 2 x 64 targets: one chunk
def test_chunked_loss_same_loss_and_gradients(dims, chunk):
    """model.loss_chunk splits the head + loss over flattened positions (recomputed in
    backward): the losses and every gradient are those of the whole micro-batch at once."""
    losses, grads = [], []
    for loss_chunk in (0, chunk):
        model = build(dims, loss_chunk=loss_chunk, num_classes=3).train()
        torch.manual_seed(1)
        tokens = torch.randint(0, 50, (2, *model.cfg.grid))
        loss = model(*model.layout.build(tokens, torch.tensor([0, 2])))
        (loss * torch.rand_like(loss)).sum().backward()  # positions weighted differently
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5 * grads[0].abs().max())
