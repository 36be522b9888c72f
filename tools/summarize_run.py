"""Summarise a run: loss curve, validation losses, and how far below the data's unigram entropy.

    python tools/summarize_run.py runs/demo [--manifest data/synthetic/manifest.json]

Exits with status 1 when --manifest is given and the final validation loss is not below the
unigram entropy (a model that learned nothing beyond token frequencies).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from nbp_mega.metrics import read_metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--manifest", help="synthetic data manifest with unigram_entropy_nats")
    args = parser.parse_args()
    train, evals = read_metrics(os.path.join(args.run_dir, "metrics.jsonl"))
    if not train:
        print(f"{args.run_dir}: no training steps logged", file=sys.stderr)
        return 1
    speed = sorted(r["tokens_per_s"] for r in train)[len(train) // 2]
    print(f"steps {train[-1]['step']}: train loss {train[0]['loss']:.3f} -> "
          f"{train[-1]['loss']:.3f} nats/token, median {speed:,.0f} tokens/s")
    for record in evals:
        print(f"  step {record['step']:>6}: val loss {record['val_loss']:.3f}")
    if not (args.manifest and evals):
        return 0
    with open(args.manifest) as f:
        entropy = json.load(f)["unigram_entropy_nats"]
    final = evals[-1]["val_loss"]
    print(f"unigram entropy of the data: {entropy:.3f} nats; final val loss {final:.3f} "
          f"= {final / entropy:.0%} of it")
    return 0 if final < entropy else 1


if __name__ == "__main__":
    sys.exit(main())
