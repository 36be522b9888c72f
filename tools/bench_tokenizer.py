"""Encode/decode throughput and peak memory of the video tokenizer presets.

    python tools/bench_tokenizer.py --json [--presets tiny nbp-magvit2] [--batches 1 8]

Each (preset, batch) runs in a fresh process so its peak memory (CPU: max RSS; CUDA: max
allocated) is its own. Prints a JSON list of {preset, batch, frames, resolution, device,
threads, encode_clips_per_s, decode_clips_per_s, peak_memory_gb}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time

import torch


def measure(preset: str, batch: int, frames: int, resolution: int, repeats: int,
            device: str, threads: int, warmup: int) -> dict:
    from nbp_mega.tokenizer import load_video_tokenizer

    torch.set_num_threads(threads)
    tok = load_video_tokenizer(preset, device=device, batch_size=batch)
    video = torch.rand(batch, 3, frames, resolution, resolution) - 0.5
    tokens = tok.encode(video)
    for _ in range(warmup):
        tok.decode(tok.encode(video))

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times)

    enc, dec = best(lambda: tok.encode(video)), best(lambda: tok.decode(tokens))
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 1e9
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB
    return {"preset": preset, "batch": batch, "frames": frames, "resolution": resolution,
            "device": device, "threads": threads, "encode_clips_per_s": batch / enc,
            "decode_clips_per_s": batch / dec, "peak_memory_gb": round(peak, 3)}


def _child(queue, *args):
    queue.put(measure(*args))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "nbp-magvit2"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="timed runs (the best counts)")
    p.add_argument("--warmup", type=int, default=1, help="untimed encode+decode runs first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", action="store_true", help="print only the JSON list")
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    records = []
    for preset in args.presets:
        for batch in args.batches:
            queue = ctx.Queue()
            proc = ctx.Process(target=_child, args=(queue, preset, batch, args.frames,
                                                    args.resolution, args.repeats,
                                                    args.device, args.threads,
                                                    args.warmup))
            proc.start()
            records.append(queue.get())
            proc.join()
            if not args.json:
                print(records[-1], file=sys.stderr)
    print(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
