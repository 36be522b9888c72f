"""`make demo`: synthetic videos -> tokenizer -> shards -> NBP and NTP models trained with
ZeRO-3 on 2 ranks -> clips generated per class -> a report (nbp_mega/demo/).

    python tools/demo.py [--out runs/demo] [--quick] [--steps N --train-per-class N ...]
    python tools/demo.py tokenizer                 # remake the shipped demo tokenizer

Prints each stage's time and, at the end, the report's path (OUT/report/report.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nbp_mega.demo.pipeline import QUICK, DemoError, DemoScale, run_demo  # noqa: E402

SCALE_FLAGS = ("train_per_class", "val_per_class", "steps", "eval_every", "samples_per_class",
               "preprocess_workers")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (emptied first)")
    p.add_argument("--quick", action="store_true", help="test scale: tiny data, model, steps")
    for name in SCALE_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"default {getattr(DemoScale(), name)} ({getattr(QUICK, name)} "
                            "with --quick)")
    return p.parse_args(argv)


def scale_from(args) -> DemoScale:
    base = QUICK if args.quick else DemoScale()
    changes = {k: getattr(args, k) for k in SCALE_FLAGS if getattr(args, k) is not None}
    return dataclasses.replace(base, **changes)


def remake_tokenizer(argv) -> int:
    p = argparse.ArgumentParser(prog="tools/demo.py tokenizer",
                                description="train the demo tokenizer (nbp_mega/demo/tokenizer.py)")
    p.add_argument("--work", default="runs/demo_tokenizer", help="run directory (emptied)")
    p.add_argument("--videos", default="data/demo_tokenizer_videos", help="(emptied)")
    args = p.parse_args(argv)
    from nbp_mega.demo.tokenizer import remake_demo_tokenizer
    from nbp_mega.train import setup_logging

    setup_logging(0)

    path, digest = remake_demo_tokenizer(args.videos, args.work)
    print(f"{path}\nsha256 {digest}: record it as TOKENIZER_SHA256 in "
          "nbp_mega/demo/tokenizer.py")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tokenizer"]:
        return remake_tokenizer(argv[1:])
    args = parse_args(argv)
    try:
        run_demo(args.out, scale_from(args))
    except DemoError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
