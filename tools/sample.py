"""Sample token clips from a trained run: one forward step per block (nbp_mega.generate).

    python tools/sample.py RUN_DIR --out samples.npy [--checkpoint step_00000300] [--num 8]
        [--seed 0] [--labels 3 [3 ...]] [--context tokens.npy --context-frames K]
        [--temperature 1.0] [--top-k 16000] [--top-p 0.9] [--guidance-scale 1.0] [--batch 8]

Writes OUT (int64 [num, T, H, W] token grids) and OUT.json (run, checkpoint, seeds, labels,
sampling). Sample i uses seed + i, so any subset can be regenerated alone. --labels: one id
for all, or one per sample (default for class-conditional models: i mod num_classes).
--context: an .npy of token grids [num or 1, T', H, W]; its first K latent frames are given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nbp_mega.generate import SamplingConfig, generate  # noqa: E402
from nbp_mega.generate.load import load_trained_model  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", default=None, help="checkpoint name (default: latest)")
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", type=int, nargs="*", default=None)
    p.add_argument("--context", default=None)
    p.add_argument("--context-frames", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=16000)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance (models trained with model.cond_dropout)")
    p.add_argument("--batch", type=int, default=8, help="clips per forward")
    return p.parse_args(argv)


def labels_for(args, num_classes: int) -> torch.Tensor | None:
    if num_classes == 0:
        if args.labels:
            raise SystemExit("--labels given, but the model is not class-conditional")
        return None
    labels = args.labels or [i % num_classes for i in range(args.num)]
    if len(labels) == 1:
        labels = labels * args.num
    if len(labels) != args.num or not all(0 <= x < num_classes for x in labels):
        raise SystemExit(f"--labels: expected 1 or {args.num} ids in [0, {num_classes})")
    return torch.tensor(labels)


def context_for(args, grid) -> torch.Tensor | None:
    if args.context is None:
        return None
    tokens = torch.from_numpy(np.load(args.context)).long()
    if tokens.dim() != 4 or tokens.shape[2:] != tuple(grid[1:]) or tokens.shape[0] not in (
            1, args.num) or tokens.shape[1] < args.context_frames:
        raise SystemExit(f"--context {args.context}: expected [{args.num} or 1, >= "
                         f"{args.context_frames}, {grid[1]}, {grid[2]}] tokens, got "
                         f"{list(tokens.shape)}")
    return tokens[:, : args.context_frames].expand(args.num, -1, -1, -1)


def main(argv=None) -> int:
    from nbp_mega.parallel.dims import ParallelConfig, init_parallel, shutdown_parallel

    args = parse_args(argv)
    dims = init_parallel(ParallelConfig(tensor=1))
    model, cfg = load_trained_model(args.run_dir, args.checkpoint, dims=dims)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              guidance_scale=args.guidance_scale)
    sampling.validate()
    labels, context = labels_for(args, cfg.model.num_classes), context_for(args, cfg.model.grid)
    seeds, out = [args.seed + i for i in range(args.num)], []
    for lo in range(0, args.num, args.batch):
        rows = slice(lo, lo + args.batch)
        out.append(generate(model, seeds=seeds[rows], sampling=sampling,
                            labels=None if labels is None else labels[rows],
                            context=None if context is None else context[rows]))
    tokens = torch.cat(out).cpu().numpy()
    np.save(args.out, tokens)
    meta = {"run_dir": os.path.abspath(args.run_dir), "checkpoint": args.checkpoint or "latest",
            "seeds": seeds, "labels": None if labels is None else labels.tolist(),
            "context": args.context, "context_frames": args.context_frames if context is not
            None else 0, "sampling": vars(sampling), "shape": list(tokens.shape)}
    with open(f"{args.out}.json", "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{args.out}: {tokens.shape[0]} clips of {list(tokens.shape[1:])} tokens")
    shutdown_parallel()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
