"""The authors' published NBP generators (PyTorch Lightning `*.ckpt`) -> nbp_mega's model.

    ckpt = read_lightning("ucf_700m.ckpt")            # state dict and hyper-parameters
    model_cfg, notes = model_config(ckpt)              # a ModelConfig with model.id_layout=nbp
    weights = generator_weights(model_cfg, ckpt)       # Weights in nbp_mega's TP=1 names
    write_state_dict(Config(model=model_cfg), weights, "ucf_700m.pt")   # or export_hf(...)

Legend: d width; N heads; D = d / N; L block length (their token_number_per_step); V video
codes; Ve their vocabulary (embedding and head rows); Pmax position table rows (block_size).

Reading: `state_dict` holds the generator under `transformer.` and the frozen tokenizer under
`first_stage_model.`; `hyper_parameters` holds `args` (an argparse.Namespace) and their
module's other constructor arguments (`cond_stage_key`, `bov_token`). The Namespace is an
arbitrary pickled object, so torch.load needs weights_only=False: the file's pickle runs, so
convert only files you trust (the published ones). Tensors are memory-mapped (mmap=True) where
the file allows it, so memory stays near the output's size.

The two published layouts (anything else is refused, naming the field that differs):
  K600  unconditional, no start (model.start_block=false): ids = the V = 64,000 video codes in
        raster order, blocks of L; block 0 is context only: sample with 2 given latent frames
        (tools/sample.py --prefix-frames 2; 48 steps for 5x16x16 rows).
  UCF   text (8 LLaMA ids), hybrid start: ids BOV 0, middles 1..L-1, text id + L, video code +
        L + text vocab (96,016 ids); 16 + 79 = 95 steps.
No embedding row moves: model.id_layout=nbp makes nbp_mega's SequenceLayout produce their ids
(nbp_mega/model/sequence.py), and generation writes code c as id video_offset + c.

Key map (theirs, `transformer.` dropped -> ours):
  tok_emb.weight [Ve, d]             tok_emb.weight [Ve padded, d] (padded rows zero)
  pos_emb [1, Pmax, d]               pos_emb.table [Pmax, d] (model.max_positions = block_size)
  blocks.i.ln1 / ln2                 layers.i.norm1 / norm2 (nn.LayerNorm, eps 1e-5)
  blocks.i.attn.query / key / value  layers.i.attn.qkv.linear: fused, rows [N, 3, D]
  blocks.i.attn.proj                 layers.i.attn.proj.linear
  blocks.i.mlp.0 / mlp.2             layers.i.mlp.fc.linear / mlp.proj.linear (their nn.GELU()
                                     is the exact erf GELU, as nbp_mega's F.gelu)
  ln_f                               norm
  head.weight [Ve, d]                head.linear.weight [V, d]: the video rows [video_offset, +V)
  uncond_embedding                   dropped: a stored buffer the published models never use
Head rows not imported (UCF: the 32,016 of BOV, middles and text ids) are never a training
target (the loss is on video targets only). Their sampler draws over all Ve ids and clamps
id - video_offset into [0, V) to decode; nbp_mega draws over the video codes only. The two
agree up to the probability a trained model puts on non-video ids (tiny), and nbp_mega's loss
is a log-softmax over the video codes (lower than theirs by minus the log of that video mass).

Attention: their dense masks are nbp_mega's ranges. K600: block-causal from position 0. UCF:
causal up to input 24 (8 text ids, BOV, tokens 0..14), then blocks of L that see each other
and everything before; the 8 text positions are visible to all and attend among themselves.
Their pad test compares the shifted text ids with the unshifted pad id, so no position is
hidden: pads are visible like every prefix token in nbp_mega (which has no pad masking).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from nbp_mega.export.weights import Weights, model_plan
from nbp_mega.model.config import SIZES, ModelConfig
from nbp_mega.model.sequence import SequenceLayout

GENERATOR, TOKENIZER = "transformer.", "first_stage_model."
REQUIRED_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "token_number_per_step",
                 "semi_ar", "hybrid", "starts_with_bov", "unconditional", "cond_token_num",
                 "class_cond_dim")
PUBLISHED_VIDEO_VOCAB = 64000  # their code hard-codes the tokenizer's FSQ codebook (magvit2)
LLAMA_BOS, LLAMA_EOS = 1, 2
SUMMARY_FIELDS = ("layers", "hidden", "heads", "grid", "block_shape", "vocab_size", "text_len",
                  "text_vocab", "hybrid_start", "start_block", "max_positions")
UNUSED = ("uncond_embedding",)
# per layer, ours -> theirs (weight and bias); q/k/v are fused into attn.qkv.linear
LAYER_KEYS = {"norm1": "ln1", "norm2": "ln2", "attn.proj.linear": "attn.proj",
              "mlp.fc.linear": "mlp.0", "mlp.proj.linear": "mlp.2"}


class NBPImportError(ValueError):
    """A file that is not one of the published NBP generators, or does not fit one."""


@dataclasses.dataclass
class LightningFile:
    path: str
    args: dict  # vars(hyper_parameters["args"])
    hparams: dict  # the other hyper-parameters (cond_stage_key, bov_token, ...)
    generator: dict  # their generator state, `transformer.` dropped
    tokenizer: dict  # the tokenizer state, `first_stage_model.` dropped (may be empty)


def _load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - e.g. a legacy (non-zip) file cannot be mapped
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise NBPImportError(f"{path}: not a readable torch file ({type(e).__name__}: {e}); "
                             "expected a PyTorch Lightning checkpoint of an NBP generator"
                             ) from None


def read_lightning(path: str) -> LightningFile:
    """The parts of a Lightning file an import needs, or an NBPImportError naming what is
    missing (not a Lightning dict, no `transformer.` keys, no `args`, missing args fields)."""
    blob = _load(path)
    where = f"{path}: not an NBP generator checkpoint"
    if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict):
        top = sorted(map(str, blob))[:6] if isinstance(blob, dict) else type(blob).__name__
        raise NBPImportError(f"{where}: top level {top}, expected a PyTorch Lightning dict with "
                             "'state_dict' and 'hyper_parameters'")
    state = blob["state_dict"]
    generator = {k.removeprefix(GENERATOR): v for k, v in state.items() if k.startswith(GENERATOR)}
    if not generator:
        prefixes = sorted({k.split(".")[0] + "." for k in state})[:6]
        raise NBPImportError(f"{where}: no '{GENERATOR}*' keys in its state_dict (prefixes "
                             f"{prefixes}); expected the generator under '{GENERATOR}' and the "
                             f"tokenizer under '{TOKENIZER}'")
    hparams = dict(blob.get("hyper_parameters") or {})
    args = hparams.pop("args", None)
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict):
        raise NBPImportError(f"{where}: hyper_parameters has no 'args' (keys {sorted(hparams)}); "
                             "expected the training script's argparse Namespace")
    missing = [k for k in REQUIRED_ARGS if k not in args]
    if missing:
        raise NBPImportError(f"{where}: hyper_parameters['args'] lacks {missing}; expected all "
                             f"of {list(REQUIRED_ARGS)}")
    tokenizer = {k.removeprefix(TOKENIZER): v for k, v in state.items() if k.startswith(TOKENIZER)}
    return LightningFile(path, dict(args), hparams, generator, tokenizer)


def published_layout(ckpt: LightningFile) -> str:
    """'k600' (unconditional, no start) or 'ucf' (text, hybrid start), or an NBPImportError."""
    a = ckpt.args
    cond = ckpt.hparams.get("cond_stage_key", a.get("cond_stage_key"))
    cond = cond or ("text" if a["cond_token_num"] > 1 else "label")  # labels take 1 id
    flags = (bool(a["unconditional"]), bool(a["hybrid"]), bool(a["starts_with_bov"]))
    if a.get("vtokens_pos"):
        raise NBPImportError(f"{ckpt.path}: args.vtokens_pos=True (an extra position table); "
                             "the published models have none")
    if ckpt.hparams.get("bov_token", 0) != 0:
        raise NBPImportError(f"{ckpt.path}: bov_token={ckpt.hparams['bov_token']}, expected 0")
    if flags == (True, False, False):
        return "k600"
    if flags == (False, True, True) and cond == "text":
        return "ucf"
    raise NBPImportError(
        f"{ckpt.path}: unconditional={flags[0]}, hybrid={flags[1]}, starts_with_bov={flags[2]}, "
        f"cond_stage_key={cond!r}: expected a published layout, K600 (unconditional=True, "
        "hybrid=False, starts_with_bov=False) or UCF-101 (unconditional=False, hybrid=True, "
        "starts_with_bov=True, cond_stage_key='text')")


def latent_grid(ckpt: LightningFile, grid=None) -> list[int]:
    """[T, H, W]: given, or from args.sequence_length / resolution (the published tokenizer
    maps 1 + 4n frames of R x R to 1 + n latent frames of R/8 x R/8)."""
    if grid is not None:
        return [int(g) for g in grid]
    a = ckpt.args
    if "sequence_length" not in a or "resolution" not in a:
        raise NBPImportError(f"{ckpt.path}: args has no sequence_length / resolution to derive "
                             "the latent grid from; give it (--grid T H W; published: 5 16 16)")
    return [(a["sequence_length"] - 1) // 4 + 1, a["resolution"] // 8, a["resolution"] // 8]


def raster_block(grid: list[int], L: int) -> list[int]:
    """The block shape of L consecutive raster tokens (their code's only kind of block)."""
    T, H, W = grid
    if W % L == 0:
        return [1, 1, L]
    if L % W == 0 and H % (L // W) == 0:
        return [1, L // W, W]
    if L % (H * W) == 0 and T % (L // (H * W)) == 0:
        return [L // (H * W), H, W]
    raise NBPImportError(f"token_number_per_step={L} does not cut the latent grid {grid} into "
                         "whole raster blocks (1 x 1 x w, 1 x h x W or t x H x W)")


def model_config(ckpt: LightningFile, grid=None, video_vocab: int | None = None
                 ) -> tuple[ModelConfig, dict]:
    """(nbp_mega's resolved ModelConfig of the file's generator, notes for the summary);
    every tensor's key and shape is checked first (`check_generator`)."""
    a, layout = ckpt.args, published_layout(ckpt)
    d, L = a["n_embd"], a["token_number_per_step"]
    rows = tuple(ckpt.generator.get("tok_emb.weight", torch.empty(0, 0)).shape)[0]
    check_generator(ckpt, rows)
    V = video_vocab or (rows if layout == "k600" else PUBLISHED_VIDEO_VOCAB)
    text_vocab = rows - L - V if layout == "ucf" else 0
    if (layout == "k600" and rows != V) or (layout == "ucf" and text_vocab <= LLAMA_EOS):
        raise NBPImportError(f"{ckpt.path}: tok_emb.weight has {rows} rows; the {layout} layout "
                             f"with {V} video codes expects "
                             + (f"{V}" if layout == "k600" else f"{L} + text vocab + {V}"))
    size = next((n for n, s in SIZES.items() if s == (a["n_layer"], d, a["n_head"])), "tiny")
    cfg = ModelConfig(
        family="gpt", size=size, layers=a["n_layer"], hidden=d, heads=a["n_head"],
        ffn_hidden=4 * d, grid=latent_grid(ckpt, grid), vocab_size=V,
        text_len=a["cond_token_num"] if layout == "ucf" else 0, text_vocab=text_vocab,
        text_bos_id=LLAMA_BOS, text_eos_id=LLAMA_EOS, hybrid_start=layout == "ucf",
        start_block=layout == "ucf", id_layout="nbp", position="learned_1d",
        max_positions=a["block_size"], dropout=float(a.get("transformer_dropout", 0.0)),
        norm_eps=1e-5, init_std=0.02)
    cfg = dataclasses.replace(cfg, block_shape=raster_block(cfg.grid, L))
    try:
        cfg.validate()
        seq = SequenceLayout(cfg)
    except ValueError as e:
        raise NBPImportError(f"{ckpt.path}: the hyper-parameters give no valid nbp_mega model: "
                             f"{e}") from None
    if seq.embed_vocab != rows or seq.seq_len > a["block_size"]:
        raise NBPImportError(f"{ckpt.path}: the {layout} layout on grid {cfg.grid} needs "
                             f"{seq.embed_vocab} ids and {seq.seq_len} positions; the file has "
                             f"{rows} ids and block_size={a['block_size']}")
    notes = {"layout": layout, "video_offset": seq.video_offset, "text_vocab": text_vocab,
             "head_rows_dropped": rows - V, "ignored": sorted(k for k in UNUSED
                                                               if k in ckpt.generator),
             "generation_steps": seq.generation_steps}
    return cfg.resolved(), notes


def expected_generator(a: dict, rows: int) -> dict[str, tuple[int, ...]]:
    """Their GPT's state-dict shapes for these hyper-parameters (minGPT names)."""
    d = a["n_embd"]
    shapes = {"pos_emb": (1, a["block_size"], d), "tok_emb.weight": (rows, d)}
    for i in range(a["n_layer"]):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes |= {f"{p}{ln}.weight": (d,), f"{p}{ln}.bias": (d,)}
        for lin in ("key", "query", "value", "proj"):
            shapes |= {f"{p}attn.{lin}.weight": (d, d), f"{p}attn.{lin}.bias": (d,)}
        shapes |= {f"{p}mlp.0.weight": (4 * d, d), f"{p}mlp.0.bias": (4 * d,),
                   f"{p}mlp.2.weight": (d, 4 * d), f"{p}mlp.2.bias": (d,)}
    return shapes | {"ln_f.weight": (d,), "ln_f.bias": (d,), "head.weight": (rows, d)}


def check_generator(ckpt: LightningFile, rows: int) -> None:
    want = expected_generator(ckpt.args, rows)
    have = {k: tuple(v.shape) for k, v in ckpt.generator.items() if k not in UNUSED}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    shapes = [f"{k} {have[k]} (expected {want[k]})" for k in want
              if k in have and have[k] != want[k]]
    if missing or extra or shapes:
        raise NBPImportError(
            f"{ckpt.path}: the '{GENERATOR}*' tensors do not fit an NBP GPT of n_layer="
            f"{ckpt.args['n_layer']}, n_embd={ckpt.args['n_embd']}, block_size="
            f"{ckpt.args['block_size']}, {rows} ids: {len(missing)} missing {missing[:4]}, "
            f"{len(extra)} unexpected {extra[:4]}, {len(shapes)} of other shape {shapes[:3]}")


def _fuse_qkv(g: dict, prefix: str, suffix: str, heads: int) -> torch.Tensor:
    """q, k, v [d(, d)] -> qkv [3d(, d)] with rows [N, 3, D] (head n: its q, k, v rows)."""
    parts = [g[f"{prefix}attn.{kind}.{suffix}"] for kind in ("query", "key", "value")]
    per_head = [p.reshape(heads, -1, *p.shape[1:]) for p in parts]  # each [N, D(, d)]
    return torch.stack(per_head, dim=1).reshape(-1, *parts[0].shape[1:])


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t


def generator_weights(cfg: ModelConfig, ckpt: LightningFile) -> Weights:
    """Weights (nbp_mega's TP=1 names, padded rows zero) of the file's generator; each tensor
    is made when read, from the memory-mapped file."""
    plan, layout = model_plan(cfg)
    g, N, V, off = ckpt.generator, cfg.heads, cfg.vocab_size, layout.video_offset
    make = {"tok_emb.weight": lambda: g["tok_emb.weight"], "pos_emb.table": lambda: g["pos_emb"][0],
            "norm.weight": lambda: g["ln_f.weight"], "norm.bias": lambda: g["ln_f.bias"],
            "head.linear.weight": lambda: g["head.weight"][off:off + V]}
    for i in range(cfg.layers):
        ours, theirs = f"layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            for a, b in LAYER_KEYS.items():
                make[f"{ours}{a}.{kind}"] = lambda k=f"{theirs}{b}.{kind}": g[k]
            make[f"{ours}attn.qkv.linear.{kind}"] = (
                lambda p=theirs, s=kind: _fuse_qkv(g, p, s, N))
    plan.check_names(make, "the imported generator")

    def read(name: str) -> torch.Tensor:
        tensor = _pad_rows(make[name]().float(), plan.shapes[name][0])
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # a slice (the head's video rows): save only its rows
        if tuple(tensor.shape) != plan.shapes[name]:  # a bug of this map, not of the file
            raise NBPImportError(f"{name}: made {tuple(tensor.shape)}, the model has "
                                 f"{plan.shapes[name]}")
        return tensor

    return Weights(ckpt.path, read, plan, layout)


def tokenizer_preset(ckpt: LightningFile):
    """(preset name, Magvit2Config) whose state-dict keys and shapes the file's
    `first_stage_model.*` tensors are exactly, or an NBPImportError naming the differences
    from the published architecture (nbp-magvit2)."""
    from nbp_mega.tokenizer.magvit2 import PRESETS, Magvit2

    def shapes(cfg) -> dict:
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in Magvit2(cfg).state_dict().items()}

    have = {k: tuple(v.shape) for k, v in ckpt.tokenizer.items()}
    for name, cfg in PRESETS.items():
        if shapes(cfg) == have:
            return name, cfg
    published = shapes(PRESETS["nbp-magvit2"])
    missing, extra = sorted(set(published) - set(have)), sorted(set(have) - set(published))
    raise NBPImportError(f"{ckpt.path}: the '{TOKENIZER}*' tensors ({len(have)}) are no known "
                         f"tokenizer; against the published nbp-magvit2 ({len(published)}): "
                         f"missing {missing[:3]}, unexpected {extra[:3]}")


def write_tokenizer(ckpt: LightningFile, path: str, preset) -> dict:
    """The tokenizer in nbp_mega's tokenizer format (load_video_tokenizer reads it)."""
    from nbp_mega.tokenizer.video import save_tokenizer_state

    name, cfg = preset
    state = {k: v.float().contiguous() for k, v in ckpt.tokenizer.items()}
    save_tokenizer_state(cfg, state, path, meta={"source": os.path.abspath(ckpt.path),
                                                 "preset": name})
    return {"path": path, "preset": name, "tensors": len(state)}


def convert_from_nbp(path: str, out: str, *, tokenizer_out: str | None = None, grid=None,
                     video_vocab: int | None = None, dtype=torch.float32,
                     progress=None) -> dict:
    """The Lightning file at `path` -> an nbp_mega state-dict file `out` (and the tokenizer
    in nbp_mega's format at `tokenizer_out`); everything is checked before anything is
    written, an existing output is refused, each file is written atomically."""
    from nbp_mega.config import Config
    from nbp_mega.export.state_dict import write_state_dict

    for target in (out, tokenizer_out):
        if target is not None and os.path.exists(target):
            raise FileExistsError(f"{target} exists: expected a new path (nothing was written)")
    ckpt = read_lightning(path)
    model_cfg, notes = model_config(ckpt, grid, video_vocab)
    weights = generator_weights(model_cfg, ckpt)
    if tokenizer_out is not None and not ckpt.tokenizer:
        raise NBPImportError(f"{path}: no '{TOKENIZER}*' tensors to write to {tokenizer_out}")
    preset = tokenizer_preset(ckpt) if tokenizer_out is not None else None
    cfg = dataclasses.replace(Config(), model=model_cfg)
    summary = {"source": os.path.abspath(path), **notes,
               "model": {k: getattr(model_cfg, k) for k in SUMMARY_FIELDS},
               "state_dict": write_state_dict(cfg, weights, out, dtype=dtype,
                                              progress=progress),
               "tokenizer": ({"tensors": len(ckpt.tokenizer), "written": False}
                             if ckpt.tokenizer else None)}
    if preset is not None:
        summary["tokenizer"] = {**write_tokenizer(ckpt, tokenizer_out, preset), "written": True}
    return summary
