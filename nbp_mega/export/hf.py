"""A training checkpoint -> a Hugging Face folder that loads with no nbp_mega installed.

    export_hf("runs/x", "hf/x", dtype=torch.bfloat16, tokenizer="tok.pt")

OUT_DIR gets:
  config.json                     NBPVideoConfig (architecture, the sequence layout as lists,
                                  auto_map to the modeling code, nbp_mega's model config)
  model.safetensors               the weights in export names, padded vocabulary rows dropped;
  or model-0000i-of-0000n.safetensors + model.safetensors.index.json above max_shard_bytes
  generation_config.json          the paper's sampling defaults (top-k 16000, top-p 0.9, T 1)
  configuration_nbp.py, modeling_nbp.py   the model code (torch + transformers only)
  video_tokenizer/<file>          with tokenizer=: the video tokenizer, as given
  text_tokenizer.model            with text_tokenizer=: the sentencepiece model of the prompts
Weights stream: each tensor is merged and gathered from the rank files on its own and written
straight into its shard file (export/safetensors_stream.py), so memory stays near the largest
tensor (tools/bench_export.py measures it). Everything is written into
OUT_DIR.partial-<pid> beside OUT_DIR and renamed at the end: an interrupted export leaves no
folder that looks complete, and an existing OUT_DIR is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import torch

from nbp_mega.export.safetensors_stream import SafetensorsWriter
from nbp_mega.export.weights import Weights, export_name

MODELING_DIR = os.path.join(os.path.dirname(__file__), "hf_modeling")
MODELING_FILES = ("configuration_nbp.py", "modeling_nbp.py")
DEFAULT_SHARD_BYTES = 5 * 2 ** 30  # transformers' default max_shard_size
SAMPLING_DEFAULTS = {"do_sample": True, "top_k": 16000, "top_p": 0.9, "temperature": 1.0}


class ExportError(ValueError):
    """An export that cannot be made as asked (output exists, tokenizer mismatch, ...)."""


def hf_config(cfg, weights: Weights, dtype: torch.dtype) -> dict:
    """config.json's contents: architecture, token id layout and the sequence layout."""
    m, layout = cfg.model, weights.layout
    return {
        "model_type": "nbp_video", "architectures": ["NBPVideoModel"],
        "auto_map": {"AutoConfig": "configuration_nbp.NBPVideoConfig",
                     "AutoModel": "modeling_nbp.NBPVideoModel"},
        "torch_dtype": str(dtype).removeprefix("torch."),
        "family": m.family, "layers": m.layers, "hidden": m.hidden, "heads": m.heads,
        "ffn_hidden": m.ffn_hidden, "norm_eps": m.norm_eps, "vocab_size": m.vocab_size,
        "embed_vocab": layout.embed_vocab, "position": m.position,
        "max_positions": m.max_positions, "rope_theta": m.rope_theta,
        "grid": list(m.grid), "block_shape": list(m.block_shape),
        "prefix_len": layout.prefix_len, "block_len": layout.block_len,
        "target_offset": layout.target_offset, "num_targets": layout.num_targets,
        "hybrid_start": layout.hybrid, "num_classes": m.num_classes, "text_len": m.text_len,
        "text_vocab": m.text_vocab, "start_token": layout.start_token,
        "class_offset": layout.class_offset, "null_token": layout.null_token,
        "text_offset": layout.text_offset, "video_offset": layout.video_offset,
        "input_source": layout.input_source.tolist(), "fixed_ids": layout.fixed_ids.tolist(),
        "attention_ranges": [list(r) for r in layout.attention_ranges],
        "slot_index": layout.slot_index.tolist(), "input_coords": layout.input_coords.tolist(),
        "block_order": layout.blocks.order.tolist(),
        "nbp_mega": {"model": dataclasses.asdict(m), "checkpoint": weights.path},
    }


def shard_plan(weights: Weights, dtype: torch.dtype,
               max_shard_bytes: int) -> list[list[str]]:
    """Export names per shard, in the model's order, each shard <= max_shard_bytes (a tensor
    larger than that gets a shard of its own)."""
    size = torch.finfo(dtype).bits // 8
    shards, current, used = [], [], 0
    for name in weights.names:
        nbytes = math.prod(weights.export_shape(name)) * size
        if current and used + nbytes > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    return shards + [current] if current else shards


def export_hf(cfg, weights: Weights, out_dir: str, *, dtype=torch.float32,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer: str | None = None,
              text_tokenizer: str | None = None, progress=None) -> dict:
    """Write the folder (see the module docstring); returns a summary (files, bytes)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise ExportError(f"{out_dir} exists: expected a new folder (remove it, or choose "
                          "another; nothing was written)")
    if tokenizer is not None:
        check_video_tokenizer(tokenizer, cfg.model)
    if text_tokenizer is not None:
        check_text_tokenizer(text_tokenizer, cfg.model)
    partial = f"{out_dir}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        groups = shard_plan(weights, dtype, max_shard_bytes)
        files = (["model.safetensors"] if len(groups) == 1 else
                 [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                  for i in range(len(groups))])
        weight_map, total = {}, 0
        stream = weights.tensors(export=True)
        for file, group in zip(files, groups, strict=True):
            entries = [(export_name(n), weights.export_shape(n), dtype) for n in group]
            with SafetensorsWriter(os.path.join(partial, file), entries,
                                   metadata={"format": "pt"}) as writer:
                for _ in group:
                    name, tensor = next(stream)
                    writer.write(name, tensor.to(dtype))
                    weight_map[name] = file
                    if progress is not None:
                        progress(name)
            total += writer.data_bytes
        if len(files) > 1:
            _write_json(os.path.join(partial, "model.safetensors.index.json"),
                        {"metadata": {"total_size": total}, "weight_map": weight_map})
        config = hf_config(cfg, weights, dtype)
        written = [*files, "config.json", "generation_config.json", *MODELING_FILES]
        if tokenizer is not None:
            os.makedirs(os.path.join(partial, "video_tokenizer"))
            name = os.path.join("video_tokenizer", os.path.basename(tokenizer))
            shutil.copyfile(tokenizer, os.path.join(partial, name))
            config["video_tokenizer"] = name
            written.append(name)
        if text_tokenizer is not None:
            shutil.copyfile(text_tokenizer, os.path.join(partial, "text_tokenizer.model"))
            config["text_tokenizer"] = "text_tokenizer.model"
            written.append("text_tokenizer.model")
        _write_json(os.path.join(partial, "config.json"), config)
        _write_json(os.path.join(partial, "generation_config.json"), SAMPLING_DEFAULTS)
        for file in MODELING_FILES:
            shutil.copyfile(os.path.join(MODELING_DIR, file), os.path.join(partial, file))
        os.replace(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"out": out_dir, "files": written, "weight_bytes": total,
            "tensors": len(weight_map), "dtype": str(dtype).removeprefix("torch.")}


def check_video_tokenizer(path: str, model_cfg) -> None:
    """A tokenizer file whose codebook covers the model's video ids, or an ExportError."""
    from nbp_mega.generate.outputs import check_tokenizer
    from nbp_mega.tokenizer.video import load_video_tokenizer

    if not os.path.isfile(path):
        raise ExportError(f"tokenizer {path}: expected a video tokenizer file (a preset has "
                          "random weights and nothing to export)")
    try:
        check_tokenizer(load_video_tokenizer(path), model_cfg)
    except ValueError as e:
        raise ExportError(f"tokenizer {path}: {e}") from None


def check_text_tokenizer(path: str, model_cfg) -> None:
    from nbp_mega.tokenizer.text import TextTokenizer

    if not model_cfg.text_len:
        raise ExportError(f"text tokenizer {path}: the model is not text-conditional "
                          "(model.text_len=0)")
    size = TextTokenizer(path).vocab_size
    if size != model_cfg.text_vocab:
        raise ExportError(f"text tokenizer {path}: {size} pieces, the model was trained on "
                          f"model.text_vocab={model_cfg.text_vocab}")


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
