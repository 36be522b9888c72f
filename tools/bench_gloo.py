"""Gradient averaging on gloo: ZeRO-3's two ways of averaging a gradient bucket, timed.

    python tools/bench_gloo.py --json [--elements 98700000 --tensors 150 --ranks 2]

On `--ranks` local gloo ranks (one thread each), a bucket of `--elements` fp32 values split
into `--tensors` adjacent views (as ZeRO-3's gradient bucket) is averaged by
  reduce_scatter_coalesced  DeepSpeed's zero_optimization.reduce_scatter=true path
                            (deepspeed...coalesced_collectives.reduce_scatter_coalesced)
  bucket_all_reduce         its reduce_scatter=false path: divide the bucket in place and
                            all_reduce it (what nbp_mega configures for ZeRO-3 on gloo)
and, for reference, the bare torch.distributed calls on the flat buffer:
  reduce_scatter_tensor, all_reduce.
Prints a JSON list of {"impl", "elements", "tensors", "ranks", "seconds"} (median of
--repeats, rank 0's clock after a barrier) and a "ratio" record (all-reduce path / DeepSpeed's
reduce-scatter path).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rank(rank: int, args, port: int, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.ranks), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.comm.coalesced_collectives import reduce_scatter_coalesced

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    deepspeed.init_distributed("gloo", dist_init_required=False)
    bucket = torch.randn(args.elements)
    sizes = [len(c) for c in torch.arange(args.elements).tensor_split(args.tensors)]
    out = torch.empty(args.elements // args.ranks)
    views = list(bucket.split(sizes))

    def bucket_all_reduce():
        dist.all_reduce(bucket.div_(args.ranks))

    impls = {
        "reduce_scatter_coalesced": lambda: reduce_scatter_coalesced(views),
        "bucket_all_reduce": bucket_all_reduce,
        "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(
            out, bucket[:out.numel() * args.ranks]),
        "all_reduce": lambda: dist.all_reduce(bucket),
    }
    records = []
    for name, fn in impls.items():
        fn()  # warm-up
        seconds = []
        for _ in range(args.repeats):
            dist.barrier()
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
        records.append({"impl": name, "elements": args.elements, "tensors": args.tensors,
                        "ranks": args.ranks, "seconds": statistics.median(seconds)})
    dist.destroy_process_group()
    if rank == 0:
        results.put(records)


def main(argv=None) -> None:
    import multiprocessing as mp

    from nbp_mega.parallel.dims import free_port

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--elements", type=int, default=98_700_000, help="bucket size (fp32)")
    p.add_argument("--tensors", type=int, default=150, help="gradients in the bucket")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print only the JSON list")
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, args, port, results)) for r in range(args.ranks)]
    for proc in procs:
        proc.start()
    while True:  # rank 0 reports; a rank that dies fails the run instead of hanging it
        try:
            records = results.get(timeout=1.0)
            break
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for proc in procs:
                    proc.kill()
                raise SystemExit(f"bench_gloo: a rank failed (exit code {dead[0]})") from None
    for proc in procs:
        proc.join()
    by_impl = {r["impl"]: r["seconds"] for r in records}
    records.append({"impl": "ratio", "bucket_all_reduce_vs_reduce_scatter_coalesced":
                    by_impl["bucket_all_reduce"] / by_impl["reduce_scatter_coalesced"]})
    print(json.dumps(records, indent=None if args.json else 1))


if __name__ == "__main__":
    main()
