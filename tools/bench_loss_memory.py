"""Peak memory of the head + loss (forward and backward) with and without model.loss_chunk.

    python tools/bench_loss_memory.py --json [--config configs/nbp_700m.yaml]
        [--micro-batch 2] [--hidden 64] [--chunks 0,512,2048] [--out FILE]

The head and cross-entropy of NBPTransformer.loss at the config's vocabulary and sequence
length (the 700M preset: 64,000 codes, 5x16x16 = 1,280 targets per clip) on a micro-batch of
final states. The model width is --hidden (the logits' size does not depend on it; a small
width keeps the head's GEMM cheap). Each chunk size runs in its own child process, which
reports the growth of its resident memory peak (VmHWM, reset through /proc/self/clear_refs)
over the memory it held before the loss: the loss's own temporaries, the logits among them.

--json prints one JSON list: {"shape": "machine", ...load} then one
{"shape": "loss_memory", loss_chunk, positions, vocab, logits_bytes (fp32 logits of the
whole micro-batch), peak_bytes, peak_over_unchunked, seconds} per chunk size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def measure(config: str, micro_batch: int, hidden: int, chunk: int) -> dict:
    """In this process: the loss's peak memory at `chunk` (0 = the whole micro-batch)."""
    import torch

    from nbp_mega.config import load_config
    from nbp_mega.machine_load import proc_status, reset_peak_rss
    from nbp_mega.model import NBPTransformer
    from nbp_mega.parallel.dims import init_parallel, shutdown_parallel
    from nbp_mega.parallel.layers import TensorParallel

    cfg = load_config(config, ["model.layers=1", f"model.hidden={hidden}", "model.heads=1",
                               f"model.ffn_hidden={hidden}", f"model.loss_chunk={chunk}",
                               "parallel.zero_stage=0", "parallel.tensor=1"])
    dims = init_parallel(cfg.parallel)
    torch.manual_seed(0)
    model = NBPTransformer(cfg.model, TensorParallel(dims, init_std=cfg.model.init_std))
    layout = model.layout
    h = torch.randn(micro_batch, layout.num_targets, hidden, requires_grad=True)
    targets = torch.randint(0, cfg.model.vocab_size, (micro_batch, layout.num_targets))
    model.loss(h[:1, :8], targets[:1, :8]).sum().backward()  # libraries loaded, threads up
    h.grad = None
    model.zero_grad()
    reset_peak_rss()
    before, start = proc_status()["VmRSS"], time.perf_counter()
    model.loss(h, targets).mean().backward()
    seconds = time.perf_counter() - start
    peak = proc_status()["VmHWM"] - before
    shutdown_parallel()
    positions = micro_batch * layout.num_targets
    return {"shape": "loss_memory", "loss_chunk": chunk, "positions": positions,
            "vocab": cfg.model.vocab_size, "logits_bytes": positions * cfg.model.vocab_size * 4,
            "peak_bytes": peak, "seconds": round(seconds, 4)}


def run_child(args, chunk: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(chunk), "--config",
           args.config, "--micro-batch", str(args.micro_batch), "--hidden", str(args.hidden)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "RANK": "0", "WORLD_SIZE": "1"})
    if proc.returncode:
        raise SystemExit(f"loss_chunk={chunk} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs/nbp_700m.yaml"))
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--chunks", default="0,512,2048",
                        help="loss_chunk values, comma-separated (0 = unchunked, measured "
                             "first as the reference)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", help="also write the records to this file")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.config, args.micro_batch, args.hidden, args.child)))
        return

    from nbp_mega.machine_load import LoadWatch

    chunks = [int(c) for c in args.chunks.split(",")]
    if chunks[0] != 0:
        chunks.insert(0, 0)
    load = LoadWatch()
    rows = [run_child(args, chunk) for chunk in chunks]
    for row in rows:
        row["peak_over_unchunked"] = round(row["peak_bytes"] / rows[0]["peak_bytes"], 4)
    machine = {"shape": "machine", "cpu": platform.processor() or platform.machine(),
               "config": os.path.relpath(args.config, ROOT), "micro_batch": args.micro_batch,
               "hidden": args.hidden, **load.summary()}
    records = [machine, *rows]
    text = json.dumps(records, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        print(text)
    else:
        for row in rows:
            print(f"loss_chunk={row['loss_chunk']:>5}: peak {row['peak_bytes'] / 2**20:8.1f} MiB "
                  f"({row['peak_over_unchunked']:.2f}x unchunked), logits of the whole "
                  f"micro-batch {row['logits_bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
