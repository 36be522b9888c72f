"""Generation speed: next-block prediction against next-token prediction, side by side.

    python tools/bench_generation.py --json [CONFIG] [--set key=value ...] [--batch 1]
                                     [--repeats 3] [--threads 2] [--ntp-block 1 1 1]

Builds the config's model twice with random weights, identical but for model.block_shape:
the config's blocks (NBP) and --ntp-block (default 1x1x1: NTP, one token per step), and
generates whole clips with nbp_mega.generate (KV cache, one forward per block) on the CPU in
fp32. Every (setup, round) is timed in turns, alternating NBP and NTP, after a warm-up clip
each; "seconds" is the median per clip of the batch. The speed-up is NTP seconds / NBP
seconds of the same run. The machine record's "load" (nbp_mega/machine_load.py) says what
else ran: only a "quiet" run may give README figures.

--json prints a list: {"shape": "machine", ...}, one record per setup (block_shape, block_len,
steps (forwards per clip), seconds (median per clip), min, max, tokens_per_s, rounds), and
{"shape": "speedup", "ntp_over_nbp", "steps_ratio"}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nbp_mega.config import load_config  # noqa: E402
from nbp_mega.generate import SamplingConfig, generate  # noqa: E402
from nbp_mega.machine_load import LoadWatch  # noqa: E402
from nbp_mega.model import NBPTransformer  # noqa: E402
from nbp_mega.parallel.layers import TensorParallel  # noqa: E402


def build_model(cfg, dims, block_shape):
    from dataclasses import replace

    model_cfg = replace(cfg.model, block_shape=list(block_shape), dropout=0.0)
    torch.manual_seed(cfg.seed)
    return NBPTransformer(model_cfg, TensorParallel(dims, init_std=model_cfg.init_std)).eval()


def time_clip(model, batch: int, seed: int) -> float:
    labels = torch.zeros(batch, dtype=torch.long) if model.layout.prefix_len else None
    context = None
    if not model.cfg.start_block:  # block 0 is context: give the first block's frames
        context = torch.zeros(batch, model.layout.blocks.block[0], *model.cfg.grid[1:],
                              dtype=torch.long)
    start = time.perf_counter()
    generate(model, seeds=list(range(seed, seed + batch)), labels=labels, context=context,
             sampling=SamplingConfig())
    return (time.perf_counter() - start) / batch


def record(name: str, model, times: list[float]) -> dict:
    steps = model.layout.generation_steps
    seconds = statistics.median(times)
    return {"shape": name, "block_shape": list(model.cfg.block_shape),
            "block_len": model.layout.block_len, "steps": steps,
            "tokens_per_clip": model.layout.blocks.num_tokens, "seconds": round(seconds, 5),
            "min": round(min(times), 5), "max": round(max(times), 5),
            "tokens_per_s": round(model.layout.blocks.num_tokens / seconds, 1),
            "rounds": len(times)}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=os.path.join(ROOT, "configs/tiny.yaml"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. model.layers=8")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--ntp-block", type=int, nargs=3, default=[1, 1, 1])
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from nbp_mega.parallel.dims import ParallelConfig, init_parallel, shutdown_parallel

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    dims = init_parallel(ParallelConfig(tensor=1))
    watch = LoadWatch()
    models = {"nbp": build_model(cfg, dims, cfg.model.block_shape),
              "ntp": build_model(cfg, dims, args.ntp_block)}
    times = {name: [] for name in models}
    for model in models.values():
        time_clip(model, args.batch, 0)  # warm-up
    for r in range(args.repeats):
        for name in (("nbp", "ntp") if r % 2 == 0 else ("ntp", "nbp")):
            times[name].append(time_clip(models[name], args.batch, 1 + r))
            watch.sample(f"{name} round {r}")
    rows = [record(name, models[name], times[name]) for name in models]
    nbp, ntp = rows
    machine = {"shape": "machine", "cpu": platform.processor() or platform.machine(),
               "threads": args.threads, "torch": torch.__version__, "batch": args.batch,
               "config": os.path.relpath(args.config, ROOT), "overrides": args.set,
               "load": watch.summary()}
    speedup = {"shape": "speedup", "ntp_over_nbp": round(ntp["seconds"] / nbp["seconds"], 2),
               "steps_ratio": round(ntp["steps"] / nbp["steps"], 2)}
    out = [machine, *rows, speedup]
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for row in rows:
            print(f"{row['shape']}: block {row['block_shape']}, {row['steps']} steps, "
                  f"{row['seconds']:.3f} s per clip, {row['tokens_per_s']:.0f} tokens/s")
        print(f"NTP / NBP: {speedup['ntp_over_nbp']}x time, {speedup['steps_ratio']}x steps; "
              f"quiet: {machine['load']['quiet']}")
    shutdown_parallel()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
