"""A training checkpoint -> a Hugging Face folder (and/or a plain state-dict file).

    python tools/convert_to_hf.py RUN_DIR_OR_CHECKPOINT OUT_DIR [--checkpoint NAME]
        [--dtype fp32|bf16] [--max-shard-size 5GB] [--tokenizer FILE]
        [--text-tokenizer FILE.model] [--state-dict FILE.pt [--state-dict-dtype fp32|bf16]]
    python tools/convert_to_hf.py RUN_DIR --state-dict FILE.pt       # the state dict alone

RUN_DIR_OR_CHECKPOINT: a run directory (its latest checkpoint, or --checkpoint NAME), one
checkpoint folder of it, or a state-dict file (--state-dict's, tools/convert_from_nbp.py's); any
ZeRO stage (0-3, optimizer offload included), any
tensor-parallel size: the ZeRO partitions are gathered and the TP shards merged one tensor at a
time from the rank files (nbp_mega.export.weights). OUT_DIR (must not exist) loads with

    model = transformers.AutoModel.from_pretrained(OUT_DIR, trust_remote_code=True)
    model(input_ids=ids).logits            # [B, S, vocab_size], no padded rows
    model.generate_video(labels=...)       # NBP: one step per block, KV cache; greedy

and needs only torch and transformers (nbp_mega/export/hf_modeling/). --state-dict writes the
model as one file in nbp_mega's names (TP=1, padded rows kept, with the run's config) that
tools/sample.py and nbp_mega.generate.load_trained_model read. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' (bytes) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 5GB, 500MB, 2GiB")
    number, unit = float(match[1]), match[2].rstrip("B")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "KI": 2 ** 10, "MI": 2 ** 20, "GI": 2 ** 30, "TI": 2 ** 40}[unit]
    return int(number * scale)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("out", metavar="OUT_DIR", nargs="?", default=None,
                   help="the Hugging Face folder to write (must not exist)")
    p.add_argument("--checkpoint", default=None, help="checkpoint name (default: latest)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--max-shard-size", type=parse_size, default="5GB",
                   help="safetensors shard size limit (default 5GB)")
    p.add_argument("--tokenizer", default=None, help="video tokenizer file to put beside")
    p.add_argument("--text-tokenizer", default=None, help="sentencepiece .model of the text")
    p.add_argument("--state-dict", default=None, metavar="FILE.pt",
                   help="also (or only) write a plain state-dict file")
    p.add_argument("--state-dict-dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.out is None and args.state_dict is None:
        p.error("nothing to write: expected OUT_DIR and/or --state-dict FILE.pt")
    return args


def progress_bar(total: int, what: str, enabled: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=what, unit="tensor", disable=not enabled, file=sys.stderr)
    return bar, (lambda name: (bar.set_postfix_str(name[-40:], refresh=False), bar.update()))


def convert(args) -> dict:
    from nbp_mega.export import export_hf, open_checkpoint, write_state_dict

    cfg, weights = open_checkpoint(args.run, args.checkpoint)
    summary = {"checkpoint": weights.path,
               "layout": vars(weights.ckpt.layout) if weights.ckpt else "state-dict file"}
    for path in (args.out, args.state_dict):  # refuse before the first tensor is read
        if path is not None and os.path.exists(path):
            raise FileExistsError(f"{path} exists: expected a new path (nothing was written)")
    if args.out is not None:
        bar, tick = progress_bar(len(weights.names), "export", not args.no_progress)
        with bar:
            summary["hf"] = export_hf(cfg, weights, args.out, dtype=DTYPES[args.dtype],
                                      max_shard_bytes=args.max_shard_size,
                                      tokenizer=args.tokenizer,
                                      text_tokenizer=args.text_tokenizer, progress=tick)
    if args.state_dict is not None:
        bar, tick = progress_bar(len(weights.names), "state dict", not args.no_progress)
        with bar:
            summary["state_dict"] = write_state_dict(
                cfg, weights, args.state_dict, dtype=DTYPES[args.state_dict_dtype],
                progress=tick)
    return summary


def main(argv=None) -> int:
    from nbp_mega.parallel.zero_checkpoint import CheckpointError

    args = parse_args(argv)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON summary alone
            summary = convert(args)
    except (ValueError, OSError, CheckpointError) as e:  # bad input: said, nothing written
        print(f"convert_to_hf.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
