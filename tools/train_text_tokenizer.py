"""Train a small sentencepiece text tokenizer on captions and class names.

    python tools/train_text_tokenizer.py --input SOURCE [--input SOURCE ...] --output text.model
        [--vocab-size 256] [--model-type unigram]

A SOURCE is
  manifest.json   (of tools/preprocess_video_shards.py) its class names, as text
  .csv / .tsv     its caption column and its label column (class names, as text)
  a folder        class names from its sub-folders (UCF-101 layout), as text
  other files     one text per line
Class names become text the way the NBP paper did ("ApplyEyeMakeup" -> "apply eye makeup").
Writes the .model file (unk 0, bos 1, eos 2, pad 3) and prints its vocabulary size as JSON.
Exit codes: 0 written; 1 unusable input or arguments.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from nbp_mega.data.inputs import InputError, list_inputs
from nbp_mega.tokenizer.text import TextTokenizerError, class_name_to_text, train_text_tokenizer


def texts_from(source: str) -> list[str]:
    """The texts one SOURCE contributes (see the module docstring)."""
    if not os.path.exists(source):
        raise InputError(f"input {source} does not exist: expected a manifest.json, a "
                         f".csv/.tsv, a folder of class folders or a text file")
    if source.lower().endswith(".json"):
        with open(source, encoding="utf-8") as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict) or "label_map" not in manifest:
            raise InputError(f"{source}: expected a preprocessing manifest with 'label_map'")
        return [class_name_to_text(n) for n in sorted(manifest["label_map"])]
    if source.lower().endswith((".csv", ".tsv")):
        return _table_texts(source)
    if not source.lower().endswith(".txt"):
        try:  # a folder tree or a list of video paths: its class names
            inputs, _ = list_inputs(source)
            names = sorted({i.label_name for i in inputs if i.label_name})
            if names:
                return [class_name_to_text(n) for n in names]
        except InputError:
            pass
    with open(source, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _table_texts(source: str) -> list[str]:
    with open(source, encoding="utf-8", newline="") as f:
        delimiter = "\t" if source.lower().endswith(".tsv") else ","
        rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()
                 if isinstance(v, str)} for row in csv.DictReader(f, delimiter=delimiter)]
    captions = [r.get("caption") or r.get("text") or "" for r in rows]
    labels = sorted({r.get("label") or r.get("class") or r.get("label_name") or ""
                     for r in rows} - {""})
    texts = [c for c in captions if c] + [class_name_to_text(n) for n in labels]
    if not texts:
        raise InputError(f"{source}: no caption or label column with text")
    return texts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", action="append", required=True,
                   help="manifest.json, .csv/.tsv, folder tree, or text file (repeatable)")
    p.add_argument("--output", required=True, help="the .model file to write")
    p.add_argument("--vocab-size", type=int, default=256, help="at most this many pieces")
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe", "char", "word"])
    args = p.parse_args(argv)
    try:
        texts = [t for source in args.input for t in texts_from(source)]
        tok = train_text_tokenizer(texts, args.output, vocab_size=args.vocab_size,
                                   model_type=args.model_type)
    except (InputError, TextTokenizerError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"model": args.output, "vocab_size": tok.vocab_size, "texts": len(texts),
                      "checksum": tok.checksum()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
