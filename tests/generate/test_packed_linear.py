"""oneDNN's packed linears while generating: the same products as megatron's path, taken only
where they apply, repacked when a weight changes, and gone after the context."""

from __future__ import annotations

import pytest
import torch

from nbp_mega.generate import packed_linear
from nbp_mega.generate.packed_linear import packed_linears
from tests.generate.test_engine import build

pytestmark = pytest.mark.skipif(not packed_linear.available(),
                                reason="this torch build has no oneDNN linear ops")


def _count_packed_calls(monkeypatch) -> list:
    calls = []
    real = packed_linear.packed_weight
    monkeypatch.setattr(packed_linear, "packed_weight", lambda w: calls.append(w) or real(w))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_linear_goes_through_onednn_with_megatrons_results(dims, monkeypatch, dtype):
    model = build(dims, num_classes=3).to(dtype)
    linears = packed_linear._linears(model)
    ids = torch.randint(0, 50, (3, model.layout.seq_len))
    with torch.no_grad():
        reference = model.logits(model.hidden_states(ids))
        calls = _count_packed_calls(monkeypatch)
        with packed_linears(model):
            packed = model.logits(model.hidden_states(ids))
    # every linear weight (attention, MLP, head) went through oneDNN exactly once
    assert sorted(map(id, calls)) == sorted(id(m.weight) for m in linears)
    assert len(linears) == 4 * model.cfg.layers + 1
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: a few of its 8-bit mantissa ulps
    torch.testing.assert_close(packed, reference, rtol=tol, atol=tol)
    assert all("_forward_impl" not in m.__dict__ for m in linears)  # restored


def test_autograd_and_disabled_calls_keep_megatrons_path(dims, monkeypatch):
    model = build(dims)
    ids = torch.randint(0, 50, (2, model.layout.seq_len))
    calls = _count_packed_calls(monkeypatch)
    with packed_linears(model):
        model.logits(model.hidden_states(ids)).sum().backward()  # grad enabled: megatron's
    with torch.no_grad(), packed_linears(model, enabled=False):
        model.logits(model.hidden_states(ids))
    assert calls == []
    assert model.head.linear.weight.grad is not None


def test_a_changed_weight_is_repacked(dims):
    model = build(dims)
    head = model.head.linear
    h = torch.randn(2, 5, model.cfg.hidden)
    with torch.no_grad(), packed_linears(model):
        before = head(h)[0]
        head.weight.mul_(2)  # what an optimizer step or a checkpoint load does: in place
        after = head(h)[0]
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-6)
