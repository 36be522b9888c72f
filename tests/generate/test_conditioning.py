"""Conditioning and the paper's hybrid start: the layout and mask match NBP_FACTS.md section 4,
and every generation step's logits equal a teacher-forced forward over the generated clip.

Legend: B batch; P prefix (text) length; L block length; S input length.
"""

from __future__ import annotations

import pytest
import torch

from nbp_mega.generate import SamplingConfig, generate
from nbp_mega.generate import engine as engine_module
from nbp_mega.model.sequence import SequenceLayout
from tests.conftest import tiny_model_config
from tests.generate.test_engine import GREEDY, build

TEXT = dict(text_len=4, text_vocab=20)
HYBRID = dict(TEXT, hybrid_start=True)


def paper_mask(S: int, P: int, L: int) -> torch.Tensor:
    """NBP_FACTS.md section 4, built as described there: a causal mask over the whole input;
    every position sees the P text positions; from input index P + L on, blocks of L see each
    other fully."""
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    blocks = (i >= P + L) & (j >= P + L) & ((i - P - L) // L == (j - P - L) // L)
    return (j <= i) | (j < P) | blocks


def model_mask(model) -> torch.Tensor:
    """[S, S] which keys the model's attention lets each query see: zero queries spread
    their weight evenly over the visible keys, and values are one-hot key positions."""
    S = model.layout.seq_len
    zeros = torch.zeros(1, 1, S, S)
    out = model.layers[0].attn._attend(zeros, zeros, torch.eye(S)[None, None], 0)
    return out[0, 0] > 0


def test_the_hybrid_layout_is_the_papers():
    cfg = tiny_model_config(**HYBRID)  # grid 2x4x8, rows of L = 8, 4 text ids
    layout = SequenceLayout(cfg)
    P, L, Nv = 4, 8, 64
    assert layout.seq_len == P + Nv and layout.num_targets == Nv  # 8 + 1280 in the paper
    video = torch.arange(Nv).view(1, 2, 4, 8)  # token ids = their raster index
    text = torch.tensor([[1, 7, 9, 2]])
    ids, targets = layout.build(video, text=text)
    middles = list(range(layout.middle_offset, layout.middle_offset + L - 1))
    assert ids[0, :P].tolist() == (layout.text_offset + text[0]).tolist()
    assert ids[0, P] == layout.start_token  # BOV
    assert ids[0, P + 1:P + L].tolist() == list(range(L - 1))  # row 0 tokens 0..L-2
    assert ids[0, P + L] == L - 1 and ids[0, P + L + 1:P + 2 * L].tolist() == middles
    assert ids[0, P + 2 * L:].tolist() == list(range(L, Nv - L))  # rows 1 .. nb-2
    assert targets[0].tolist() == list(range(Nv))  # input P + i predicts video token i
    assert len(set(middles)) == L - 1 and layout.embed_vocab == middles[-1] + 1


def test_the_hybrid_mask_is_the_papers(dims):
    model = build(dims, **HYBRID)
    assert torch.equal(model_mask(model), paper_mask(model.layout.seq_len, 4, 8))
    plain = build(dims, **TEXT)  # text prefix, start block: the prefix is bidirectional
    S, P, L = plain.layout.seq_len, 4, 8
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    assert torch.equal(model_mask(plain), (j < P) | ((i >= P) & ((j - P) // L <= (i - P) // L)))


def test_steps_of_the_papers_ucf_setting():
    cfg = tiny_model_config(grid=[5, 16, 16], block_shape=[1, 1, 16], text_len=8,
                            text_vocab=32000, hybrid_start=True)
    layout = SequenceLayout(cfg)
    windows = layout.generation_windows()
    assert layout.generation_steps == 95 == len(windows)
    assert [n for *_, n in windows] == [1] * 16 + [16] * 79
    assert windows[0] == (0, 8 + 1, 1)  # the prefill: 8 text ids and BOV
    assert layout.seq_len == 8 + 1280 and layout.visible_keys()[8 + 15] == 8 + 16


def record_steps(monkeypatch):
    """Capture the logits every generation step samples from."""
    seen, real = [], engine_module.sample

    def recording(logits, cfg, generators):
        seen.append(logits.clone())
        return real(logits, cfg, generators)

    monkeypatch.setattr(engine_module, "sample", recording)
    return seen


CASES = {
    "rows-class": (dict(num_classes=3), 0),
    "frames-class": (dict(block_shape=[1, 4, 8], num_classes=3), 0),
    "ntp": (dict(block_shape=[1, 1, 1]), 0),
    "non-raster-2x2x2": (dict(block_shape=[2, 2, 2], num_classes=3, position="learned_3d"), 0),
    "text-hybrid": (HYBRID, 0),
    "text-hybrid-rope": (dict(HYBRID, family="llama", position="rope_3d"), 0),
    "text-hybrid-3d-context": (dict(HYBRID, position="learned_3d"), 1),
    "frame-prediction-k600": (dict(start_block=False), 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_step_equals_a_teacher_forced_forward(dims, monkeypatch, case):
    changes, given = CASES[case]
    model = build(dims, **changes)
    layout, B = model.layout, 2
    cond = {}
    if model.cfg.num_classes:
        cond["labels"] = torch.tensor([0, 2])
    if model.cfg.text_len:
        cond["text"] = torch.tensor([[1, 5, 6, 2], [1, 9, 9, 9]])
    context = torch.randint(0, 50, (B, given, 4, 8)) if given else None
    seen = record_steps(monkeypatch)
    sampling = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0)
    clip = generate(model, seeds=[5, 6], context=context, sampling=sampling, **cond)
    first = given * 32 - layout.target_offset  # targets fixed by the context
    assert len(seen) == len(layout.generation_windows(first))
    if context is not None:
        assert torch.equal(clip[:, :given], context)
    input_ids, targets = layout.build(clip, cond.get("labels"), text=cond.get("text"))
    with torch.no_grad():
        h = model.hidden_states(input_ids)
        P = layout.prefix_len
        teacher = model.logits(h[:, P + first:P + layout.num_targets])
    torch.testing.assert_close(torch.cat(seen, dim=1), teacher, atol=1e-5, rtol=1e-5)
    # and the clip is what was sampled from those logits: each target is a possible token
    assert torch.isfinite(teacher.gather(-1, targets[:, first:, None])).all()


def test_text_conditioning_matters_and_is_checked(dims):
    model = build(dims, **HYBRID)
    a = generate(model, seeds=[0], text=torch.tensor([[1, 5, 6, 2]]), sampling=GREEDY)
    b = generate(model, seeds=[0], text=torch.tensor([[1, 7, 3, 2]]), sampling=GREEDY)
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match=r"expected \[B, 4\] = model.text_len"):
        generate(model, seeds=[0], text=torch.ones(1, 5).long())
    with pytest.raises(ValueError, match=r"outside \[0, 20\) = model.text_vocab"):
        generate(model, seeds=[0], text=torch.tensor([[1, 5, 20, 2]]))
    with pytest.raises(ValueError, match="pass text ids"):
        generate(model, seeds=[0])


def test_guidance_with_a_text_prompt(dims):
    model = build(dims, **HYBRID, cond_dropout=0.1)
    text = torch.tensor([[1, 5, 6, 2], [1, 9, 9, 9]])
    guided = generate(model, seeds=[0, 1], text=text,
                      sampling=SamplingConfig(temperature=0.0, guidance_scale=3.0))
    one = generate(model, seeds=[0, 1], text=text,
                   sampling=SamplingConfig(temperature=0.0, guidance_scale=1.0))
    assert torch.equal(one, generate(model, seeds=[0, 1], text=text, sampling=GREEDY))
    assert not torch.equal(guided, one)
    null = model.layout.null_token
    ids, _ = model.layout.build(guided, text=text, drop=torch.tensor([True, False]))
    assert ids[0, :4].tolist() == [null] * 4 and ids[1, 0] == model.layout.text_offset + 1
