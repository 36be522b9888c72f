"""tools/convert_from_nbp.py: the authors' Lightning checkpoints, imported, compute what their
model computes, with their token ids.

Legend: B batch; S input length; L block length; P text ids; V video codes; Ve their
vocabulary; off = the id of video code 0 in their vocabulary.

No published file is needed: tiny Lightning-layout files with random weights in their GPT's
names and hyper-parameters (a K600-like unconditional row model, a UCF-like hybrid text model
with their id offsets), against an independent restatement of their model written from
NBP_FACTS.md (sections 3, 4): separate q/k/v, a dense S x S mask, their id layout, pre-norm
LayerNorm blocks, exact GELU, a learned 1-D position table, computed in float64.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nbp_mega.generate import SamplingConfig, generate
from nbp_mega.generate.load import load_trained_model
from tests.export.test_convert_to_hf import convert as convert_to_hf
from tests.export.test_convert_to_hf import run_hf_child
from tests.test_bench_tools import load_tool

D_MODEL, HEADS, LAYERS = 32, 4, 2
GREEDY = SamplingConfig(temperature=0.0)


# -- their checkpoints -----------------------------------------------------------------------
def their_generator(rows: int, block_size: int, cond_tokens: int, seed: int) -> dict:
    """Random weights under their minGPT names (reference/nbp_generator_700m_state_dict.tsv),
    scaled so that logits are far from ties."""
    g, d = torch.Generator().manual_seed(seed), D_MODEL

    def w(*shape, std=0.25):
        return torch.randn(*shape, generator=g) * std

    state = {"pos_emb": w(1, block_size, d, std=0.5), "uncond_embedding": w(cond_tokens, d),
             "tok_emb.weight": w(rows, d, std=1.0)}
    for i in range(LAYERS):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            state[f"{p}{ln}.weight"], state[f"{p}{ln}.bias"] = 1 + w(d, std=0.1), w(d, std=0.1)
        for lin in ("key", "query", "value", "proj"):
            state[f"{p}attn.{lin}.weight"], state[f"{p}attn.{lin}.bias"] = w(d, d), w(d)
        state[f"{p}mlp.0.weight"], state[f"{p}mlp.0.bias"] = w(4 * d, d), w(4 * d)
        state[f"{p}mlp.2.weight"], state[f"{p}mlp.2.bias"] = w(d, 4 * d, std=0.1), w(d)
    state["ln_f.weight"], state["ln_f.bias"] = 1 + w(d, std=0.1), w(d, std=0.1)
    state["head.weight"] = w(rows, d, std=0.5)
    return state


def their_args(**changes) -> argparse.Namespace:
    base = dict(n_layer=LAYERS, n_head=HEADS, n_embd=D_MODEL, semi_ar=True, hybrid=False,
                starts_with_bov=False, unconditional=True, cond_token_num=0, class_cond_dim=101,
                transformer_dropout=0.1, vtokens=False, vtokens_pos=False, tokenizer="magvit2")
    return argparse.Namespace(**{**base, **changes})


def write_lightning(path, args, generator: dict, tokenizer: dict | None = None, **hparams):
    state = {f"transformer.{k}": v for k, v in generator.items()}
    state |= {f"first_stage_model.{k}": v for k, v in (tokenizer or {}).items()}
    torch.save({"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.9.0",
                "state_dict": state, "hyper_parameters": {"args": args, **hparams}}, path)
    return path


# K600-like: unconditional raster rows of 8 on a 3x4x8 grid (no sequence_length/resolution in
# args: --grid), 2 given latent frames; vocabulary = the V video codes.
K600 = dict(grid=(3, 4, 8), L=8, V=40, block_size=100)
# UCF-like: 8 text ids (bos 1, eos 2 pads), the hybrid start; their ids BOV 0, middles 1..7,
# text id + 8, video code + 8 + 20; grid 2x8x8 from sequence_length 5 and resolution 64.
UCF = dict(grid=(2, 8, 8), L=8, V=48, text_vocab=20, P=8, block_size=140)


def k600_file(tmp_path):
    c = K600
    args = their_args(block_size=c["block_size"], token_number_per_step=c["L"])
    return write_lightning(tmp_path / "k600.ckpt", args,
                           their_generator(c["V"], c["block_size"], 0, seed=1),
                           cond_stage_key="label", bov_token=0)


def ucf_file(tmp_path, tokenizer=None):
    c = UCF
    args = their_args(block_size=c["block_size"], token_number_per_step=c["L"], hybrid=True,
                      starts_with_bov=True, unconditional=False, cond_token_num=c["P"],
                      sequence_length=5, resolution=64, vocab_size=64000)
    rows = c["L"] + c["text_vocab"] + c["V"]
    return write_lightning(tmp_path / "ucf.ckpt", args,
                           their_generator(rows, c["block_size"], c["P"], seed=2), tokenizer,
                           cond_stage_key="text", bov_token=0)


# -- their model, restated from NBP_FACTS.md ---------------------------------------------------
def their_mask(S: int, P: int, L: int, hybrid: bool) -> torch.Tensor:
    """[S, S] bool, query i may see key j. K600: blocks of L, block-causal. UCF: causal, all
    positions see the P text positions, from input P + L (token L-1) on blocks of L see each
    other fully."""
    i = torch.arange(S)
    if not hybrid:
        return i[None, :] // L <= i[:, None] // L
    mask = torch.ones(S, S).tril().bool()
    mask[:, :P] = True
    for b in range(P + L, S, L):
        mask[b:b + L, P + L:b + L] = True
    return mask


def their_logits(g: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ids [B, S] of their vocabulary -> logits [B, S, Ve] (float64)."""
    g = {k: v.double() for k, v in g.items()}
    B, S = ids.shape
    Dh = D_MODEL // HEADS

    def lin(x, name):
        return x @ g[f"{name}.weight"].T + g[f"{name}.bias"]

    def ln(x, name):
        return F.layer_norm(x, (D_MODEL,), g[f"{name}.weight"], g[f"{name}.bias"], eps=1e-5)

    x = g["tok_emb.weight"][ids] + g["pos_emb"][0, :S]
    for i in range(LAYERS):
        p, h = f"blocks.{i}.", ln(x, f"blocks.{i}.ln1")
        q, k, v = (lin(h, f"{p}attn.{n}").view(B, S, HEADS, Dh).transpose(1, 2)
                   for n in ("query", "key", "value"))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(Dh)).masked_fill(~mask, float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, D_MODEL)
        x = x + lin(att, f"{p}attn.proj")
        x = x + lin(F.gelu(lin(ln(x, f"{p}ln2"), f"{p}mlp.0")), f"{p}mlp.2")
    return ln(x, "ln_f") @ g["head.weight"].T


def their_k600_ids(z: torch.Tensor, L: int) -> torch.Tensor:
    """Raster video codes [B, Nv] -> the training input: tokens[:-L]."""
    return z[:, :-L]


def their_ucf_ids(text: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """[text + L][BOV 0][row 0 + off][middles 1..L-1][rows 1.. + off], the last L dropped."""
    L, off = UCF["L"], UCF["L"] + UCF["text_vocab"]
    B = z.shape[0]
    middles = torch.arange(1, L).expand(B, -1)
    ids = torch.cat([text + L, torch.zeros(B, 1, dtype=torch.long), z[:, :L] + off, middles,
                     z[:, L:] + off], dim=1)
    return ids[:, :-L]


def their_k600_greedy(g: dict, given: torch.Tensor, total: int) -> torch.Tensor:
    """Rerun the whole sequence per step; its last block predicts the next (argmax)."""
    L, V, z = K600["L"], K600["V"], given
    while z.shape[1] < total:
        logits = their_logits(g, z, their_mask(z.shape[1], 0, L, False))
        z = torch.cat([z, logits[:, -L:, :V].argmax(-1)], dim=1)
    return z


def their_ucf_greedy(g: dict, text: torch.Tensor, total: int) -> torch.Tensor:
    """BOV and row 0 token by token, then [token L-1, middles] and the rows block by block;
    argmax over the video ids [off, off + V)."""
    P, L, V = UCF["P"], UCF["L"], UCF["V"]
    off = L + UCF["text_vocab"]
    seq = torch.cat([text + L, torch.zeros(len(text), 1, dtype=torch.long)], dim=1)
    codes = []
    while len(codes) < total:
        n = 1 if len(codes) < L else L
        logits = their_logits(g, seq, their_mask(seq.shape[1], P, L, True))
        new = logits[:, -n:, off:off + V].argmax(-1)  # [B, n]
        codes += list(new.T)
        seq = torch.cat([seq, new + off], dim=1)
        if len(codes) == L:  # the middles follow token L-1
            seq = torch.cat([seq, torch.arange(1, L).expand(len(seq), -1)], dim=1)
    return torch.stack(codes, dim=1)


# -- the imports ---------------------------------------------------------------------------
def convert(capsys, *args) -> tuple[int, dict | str]:
    rc = load_tool("convert_from_nbp").main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, json.loads(out) if rc == 0 else err


@pytest.fixture(scope="module")
def imports(tmp_path_factory, dims):
    """Both layouts converted by the tool and loaded back; their weights, inputs, outputs."""
    from nbp_mega.tokenizer.magvit2 import PRESETS, Magvit2

    tmp = tmp_path_factory.mktemp("from_nbp")
    torch.manual_seed(0)
    tok_state = Magvit2(PRESETS["tiny"]).state_dict()
    files = {"k600": k600_file(tmp), "ucf": ucf_file(tmp, tok_state)}
    extra = {"k600": ["--grid", *K600["grid"]],
             "ucf": ["--video-vocab", UCF["V"], "--tokenizer-out", tmp / "tok.pt"]}
    out = {}
    for name, path in files.items():
        buf = io.StringIO()  # the tool's JSON summary
        with contextlib.redirect_stdout(buf):
            rc = load_tool("convert_from_nbp").main([str(path), str(tmp / f"{name}.pt"),
                                                     *map(str, extra[name])])
        assert rc == 0
        model, cfg = load_trained_model(str(tmp / f"{name}.pt"), dims=dims)
        generator = {k.removeprefix("transformer."): v for k, v in
                     torch.load(path, weights_only=False)["state_dict"].items()
                     if k.startswith("transformer.")}
        out[name] = dict(file=tmp / f"{name}.pt", model=model, cfg=cfg, g=generator,
                         summary=json.loads(buf.getvalue()))
    out["tokenizer"] = (tmp / "tok.pt", tok_state)
    return out


def test_k600_rows_import_with_their_ids_logits_and_greedy_frames(imports, tmp_path):
    imp, c = imports["k600"], K600
    model, g, (T, H, W), L, V = imp["model"], imp["g"], c["grid"], c["L"], c["V"]
    assert imp["summary"]["layout"] == "k600" and imp["summary"]["video_offset"] == 0
    assert model.layout.embed_vocab == V and model.layout.generation_windows(
        model.layout.given_targets(2))[-1][2] == L
    # fused qkv rows are [N, 3, D]: head n's q rows, then its k rows, then its v rows
    qkv = model.layers[1].attn.qkv.linear.weight.view(HEADS, 3, D_MODEL // HEADS, D_MODEL)
    for j, kind in enumerate(("query", "key", "value")):
        theirs = g[f"blocks.1.attn.{kind}.weight"].view(HEADS, -1, D_MODEL)
        assert torch.equal(qkv[:, j], theirs), kind

    z = torch.randint(0, V, (2, T * H * W), generator=torch.Generator().manual_seed(3))
    ids, targets = model.layout.build(z.view(2, T, H, W))
    assert torch.equal(ids, their_k600_ids(z, L)) and torch.equal(targets, z[:, L:])
    with torch.no_grad():
        ours = model.logits(model.hidden_states(ids))
    theirs = their_logits(g, ids, their_mask(ids.shape[1], 0, L, False))
    torch.testing.assert_close(ours[..., :V], theirs.float(), rtol=0, atol=1e-5)
    assert torch.isinf(ours[..., V:]).all()  # padded head rows

    # 2 given latent frames, then greedy: nbp_mega's generate, tools/sample.py, their loop
    given = z[:, :2 * H * W]
    expected = their_k600_greedy(g, given, T * H * W).view(2, T, H, W)
    greedy = generate(model, seeds=[0, 1], context=given.view(2, 2, H, W), sampling=GREEDY)
    assert torch.equal(greedy, expected)
    np.save(tmp_path / "given.npy", given.view(2, 2, H, W).numpy())
    assert load_tool("sample").main([str(imp["file"]), "--out", str(tmp_path / "s"), "--num",
                                     "2", "--greedy", "--prefix-tokens",
                                     str(tmp_path / "given.npy"), "--prefix-frames", "2"]) == 0
    assert np.array_equal(np.load(tmp_path / "s" / "tokens.npy"), expected.numpy())


def test_ucf_hybrid_text_import_with_their_ids_logits_and_greedy_clips(imports):
    imp, c = imports["ucf"], UCF
    model, g, (T, H, W), L, V, P = imp["model"], imp["g"], c["grid"], c["L"], c["V"], c["P"]
    off = L + c["text_vocab"]
    layout = model.layout
    assert (layout.start_token, layout.middle_offset, layout.text_offset, layout.video_offset,
            layout.embed_vocab) == (0, 1, L, off, off + V)
    assert list(imp["cfg"].model.grid) == list(c["grid"]) and layout.generation_steps == L + (
        T * H * W // L - 1)
    assert imp["summary"]["head_rows_dropped"] == off

    gen = torch.Generator().manual_seed(4)
    z = torch.randint(0, V, (2, T * H * W), generator=gen)
    text = torch.tensor([[1, 7, 9, 2, 2, 2, 2, 2], [1, 3, 4, 5, 6, 2, 2, 2]])  # eos-padded
    ids, targets = layout.build(z.view(2, T, H, W), text=text)
    assert torch.equal(ids, their_ucf_ids(text, z)) and torch.equal(targets, z)
    with torch.no_grad():
        ours = model.logits(model.hidden_states(ids))
    theirs = their_logits(g, ids, their_mask(ids.shape[1], P, L, True))
    # positions from BOV on predict the video targets; their video logits are a slice
    torch.testing.assert_close(ours[:, P:, :V], theirs[:, P:, off:off + V].float(), rtol=0,
                               atol=1e-5)
    expected = their_ucf_greedy(g, text, T * H * W).view(2, T, H, W)
    greedy = generate(model, seeds=[0, 1], text=text, sampling=GREEDY)
    assert torch.equal(greedy, expected)


def test_hf_exports_of_the_imports_match_their_model(imports, tmp_path):
    jobs, refs = [], []
    text = torch.tensor([[1, 5, 2, 2, 2, 2, 2, 2], [1, 11, 12, 13, 2, 2, 2, 2]])
    for name, c in (("k600", K600), ("ucf", UCF)):
        imp = imports[name]
        g, (T, H, W) = imp["g"], c["grid"]
        # the imported file through tools/convert_to_hf.py, as users export it
        proc = convert_to_hf(imp["file"], tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-3000:]
        z = torch.randint(0, c["V"], (2, T * H * W), generator=torch.Generator().manual_seed(5))
        if name == "k600":
            ids = their_k600_ids(z, c["L"])
            logits = their_logits(g, ids, their_mask(ids.shape[1], 0, c["L"], False))
            cond = {"context": z[:, :2 * H * W].view(2, 2, H, W)}
            greedy = their_k600_greedy(g, z[:, :2 * H * W], T * H * W)
        else:
            off = c["L"] + c["text_vocab"]
            ids = their_ucf_ids(text, z)
            logits = their_logits(g, ids, their_mask(ids.shape[1], c["P"], c["L"], True))
            logits = logits[..., off:off + c["V"]]
            cond = {"text": text}
            greedy = their_ucf_greedy(g, text, T * H * W)
        jobs.append({"dir": tmp_path / name, "ids": ids, "generate": cond})
        refs.append((name, logits[..., :c["V"]].float(), greedy.view(2, T, H, W)))
    for (name, logits, greedy), hf in zip(refs, run_hf_child(tmp_path, jobs), strict=True):
        P = UCF["P"] if name == "ucf" else 0
        torch.testing.assert_close(hf["logits"][:, P:], logits[:, P:], rtol=0, atol=1e-5,
                                   msg=name)
        assert torch.equal(hf["greedy"], greedy), name


def test_an_import_fine_tunes_at_another_tp(imports, tmp_path):
    """The imported K600 file starts a training run (train.init_from) at TP=2 on 2 ranks with
    the imported model's settings; at lr 0 the run's validation loss is the imported model's
    loss on the same validation clips (their targets: every block after the first)."""
    import yaml

    from nbp_mega.config import config_from_dict, to_dict
    from nbp_mega.data.synthetic import write_synthetic_shards
    from nbp_mega.metrics import read_metrics
    from tests.generate.test_load import validation_loss
    from tests.test_train import ROOT, run

    imp, c = imports["k600"], K600
    write_synthetic_shards(str(tmp_path / "data"), num_train=16, num_val=8, grid=c["grid"],
                           vocab=c["V"], classes=0, shard_size=8, seed=0)
    model_settings = [f"model.{k}={json.dumps(v)}" for k, v in
                      to_dict(imp["cfg"])["model"].items() if k not in ("dropout", "size")]
    run_dir = tmp_path / "run"
    run(["bash", f"{ROOT}/launch.sh", f"{ROOT}/configs/tiny.yaml", f"run_dir={run_dir}",
         *model_settings, "model.dropout=0", f"train.init_from={imp['file']}",
         "parallel.tensor=2", "optim.lr=0", "train.steps=1", "train.global_batch=8",
         "train.eval_every=0", "train.eval_batches=1", "train.save_every=0",
         f"data.shards={tmp_path}/data/train", f"data.val_shards={tmp_path}/data/val",
         "data.num_workers=1", "log.peak_tflops=1", "log.progress=false"],
        cwd=tmp_path, NPROC_PER_NODE="2")
    val = read_metrics(str(run_dir / "metrics.jsonl"))[1][-1]["val_loss"]
    run_cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert run_cfg.model == imp["cfg"].model.__class__(**{**vars(imp["cfg"].model),
                                                          "dropout": 0.0})
    assert val == pytest.approx(validation_loss(imp["model"], run_cfg), rel=1e-5)


def test_tokenizer_is_written_in_nbp_megas_format(imports):
    from nbp_mega.tokenizer.video import load_video_tokenizer

    path, state = imports["tokenizer"]
    summary = imports["ucf"]["summary"]["tokenizer"]
    assert summary["written"] and summary["preset"] == "tiny"
    loaded = load_video_tokenizer(str(path)).model.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    assert imports["k600"]["summary"]["tokenizer"] is None  # its file has none


def test_bad_input_is_refused_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "out.pt"
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    rc, err = convert(capsys, tmp_path / "junk.ckpt", out)
    assert rc == 2 and "not a readable torch file" in err
    # a Lightning file of another model: no transformer.* keys
    other = write_lightning(tmp_path / "other.ckpt", their_args(), {})
    torch.save({"state_dict": {"model.w": torch.zeros(1)}, "hyper_parameters": {}}, other)
    rc, err = convert(capsys, other, out)
    assert rc == 2 and "no 'transformer.*' keys" in err and "model." in err
    # hyper-parameters without the fields the layout is read from
    args = their_args(block_size=100, token_number_per_step=8)
    del args.hybrid, args.cond_token_num
    g = their_generator(40, 100, 0, seed=0)
    rc, err = convert(capsys, write_lightning(tmp_path / "old.ckpt", args, g), out)
    assert rc == 2 and "lacks ['hybrid', 'cond_token_num']" in err
    # a layout that was not published (class-conditional, no hybrid start)
    args = their_args(block_size=100, token_number_per_step=8, unconditional=False,
                      cond_token_num=1)
    rc, err = convert(capsys, write_lightning(tmp_path / "cls.ckpt", args, g,
                                              cond_stage_key="label"), out)
    assert rc == 2 and "expected a published layout" in err
    # a tensor of another shape than the hyper-parameters say
    args = their_args(block_size=100, token_number_per_step=8)
    bad = {**g, "blocks.1.mlp.0.weight": torch.zeros(64, D_MODEL)}
    rc, err = convert(capsys, write_lightning(tmp_path / "bad.ckpt", args, bad), out, "--grid",
                      3, 4, 8)
    assert rc == 2 and "blocks.1.mlp.0.weight (64, 32) (expected (128, 32))" in err
    # no grid: args lack sequence_length / resolution
    rc, err = convert(capsys, k600_file(tmp_path), out)
    assert rc == 2 and "--grid T H W" in err
    assert not out.exists()
    # an output that exists: refused, untouched
    out.write_bytes(b"mine")
    rc, err = convert(capsys, k600_file(tmp_path), out, "--grid", 3, 4, 8)
    assert rc == 2 and "exists: expected a new path" in err and out.read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir() if ".partial" in p.name) == []
