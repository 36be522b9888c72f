"""A published NBP generator (the authors' PyTorch Lightning *.ckpt) -> an nbp_mega model file.

    python tools/convert_from_nbp.py CKPT OUT.pt [--tokenizer-out TOKENIZER.pt]
        [--grid T H W] [--video-vocab V] [--dtype fp32|bf16]

CKPT: a Lightning checkpoint of their Net2NetTransformer (K600 frame prediction, or UCF-101
with the hybrid text start); `state_dict` has the generator under `transformer.` and the
tokenizer under `first_stage_model.`, `hyper_parameters['args']` the training arguments.
Reading it runs its pickle (torch.load(weights_only=False): `args` is an argparse Namespace),
so convert only files you trust; the tensors are memory-mapped.

OUT.pt (must not exist, written atomically) is an nbp_mega state-dict file (TP=1 names, with a
config whose model section is the import: model.id_layout=nbp keeps the authors' token ids),
which these read as they read any trained model:

    python tools/sample.py OUT.pt --out samples --prefix-tokens first_frames.npy  # K600
    python tools/sample.py OUT.pt --out samples --prompts "apply eye makeup" \\
        --text-tokenizer llama.model                                            # UCF-101
    nbp_mega.generate.load_trained_model("OUT.pt", dims=dims)   # at any TP size
    nbp_mega.export.export_hf(cfg, weights, "hf/")              # a Hugging Face folder

--tokenizer-out writes the frozen video tokenizer (`first_stage_model.*`) in nbp_mega's
tokenizer format (tools/sample.py --tokenizer reads it). --grid: the latent grid when args has
no sequence_length / resolution (published: 5 16 16). --video-vocab: the video codebook size
for a text model (their code hard-codes 64000). The key map, what is dropped and how their
attention masks map: nbp_mega/export/from_nbp.py. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", metavar="CKPT", help="the authors' Lightning checkpoint")
    p.add_argument("out", metavar="OUT", help="the nbp_mega state-dict file to write (new)")
    p.add_argument("--tokenizer-out", default=None, metavar="FILE",
                   help="also write the video tokenizer of the file (new)")
    p.add_argument("--grid", type=int, nargs=3, default=None, metavar=("T", "H", "W"),
                   help="latent grid (default: from args.sequence_length and resolution)")
    p.add_argument("--video-vocab", type=int, default=None, metavar="V",
                   help="video codebook size (default: 64000, or the K600 embedding's rows)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    return p.parse_args(argv)


def main(argv=None) -> int:
    from nbp_mega.export.from_nbp import convert_from_nbp

    args = parse_args(argv)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON summary alone
            summary = convert_from_nbp(args.ckpt, args.out, tokenizer_out=args.tokenizer_out,
                                       grid=args.grid, video_vocab=args.video_vocab,
                                       dtype=DTYPES[args.dtype])
    except (ValueError, OSError) as e:  # bad input: said, nothing written
        print(f"convert_from_nbp.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
