"""Data throughput: the training loader alone vs what training consumes, on this machine.

    python tools/bench_data.py --json [--config configs/tiny.yaml] [--ranks 2 1]
        [--epochs 2] [--steps 6] [--preprocess]

loader     samples/s of `build_loaders` (nbp_mega/data/loader.py, what train.py uses) over
           synthetic token shards of the config's grid, vocabulary and classes
           (nbp_mega.data.synthetic, 256 clips a shard), with the config's data section
           (workers, shuffle buffer) and global batch. One process makes every global batch
           (dp = 1): the hard case, since with dp ranks each rank's loader makes only its share.
           A few untimed batches start the workers; then --epochs whole epochs of batches are
           timed, so the per-epoch buffer refills (a stream's shuffle buffer never mixes two
           epochs) are in the average; the longest wait for one batch is reported too.
training   samples/s the real trainer consumes: `bash launch.sh CONFIG` (torchrun,
           nbp_mega.train, DeepSpeed with the config's ZeRO stage: 3 for tiny.yaml) for
           --steps steps, with --ranks processes. Rate = global batch / median step_seconds of
           metrics.jsonl after the first two steps. step_seconds is timed after the batch is in
           hand (Trainer.train_step), so it is the compute's demand for data, never limited by
           the loader. Why the real trainer and not a bare forward/backward loop: the target
           is about what training of the config consumes, and a bare loop would leave out
           ZeRO-3's gathers and DeepSpeed's step. --ranks 2 is how tiny.yaml is run (`make
           demo`: 2 ranks x 1 thread); --ranks 1 is one process with all the threads. Each
           listed setup is measured and the ratio uses the fastest (the most demanding).
ratio      loader samples/s / training samples/s; the issue's target is >= 20.
preprocess (--preprocess) clips/s of tools/preprocess_video_shards.py's library on synthetic
           videos (nbp_mega.data.synthetic_video), decode only (raw shards) and with the tiny
           random tokenizer, in this process (workers=0).

The machine is recorded (CPU, cores, load average before and after): on a shared machine the
numbers move with the load, the ratio less so, since both sides share the machine.
Exit code: 0 when the ratio meets the target, 1 when it does not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TARGET_RATIO = 20.0  # issue 4: the loader makes >= 20x what training consumes
SHARD_SIZE = 256  # synthetic clips per shard
WARMUP_BATCHES = 5
WARMUP_STEPS = 2


def machine() -> dict:
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in os.getloadavg()]}


def write_shards(cfg, out: str, batches_per_epoch: int) -> str:
    from nbp_mega.data.synthetic import write_synthetic_shards

    count = cfg.train.global_batch * batches_per_epoch
    write_synthetic_shards(out, num_train=count, num_val=0, grid=tuple(cfg.model.grid),
                           vocab=cfg.model.vocab_size, classes=cfg.model.num_classes,
                           shard_size=SHARD_SIZE, seed=0)
    return os.path.join(out, "train")


# -- the loader alone ------------------------------------------------------------------------
def measure_loader(cfg, shards: str, epochs: int, batches_per_epoch: int) -> dict:
    from nbp_mega.data.loader import build_loaders

    cfg.data.shards, cfg.data.val_shards = shards, ""
    loader, _ = build_loaders(cfg.data, seed=cfg.seed, global_batch=cfg.train.global_batch,
                              dp_rank=0, dp_size=1, grid=tuple(cfg.model.grid),
                              vocab_size=cfg.model.vocab_size)
    try:
        for _ in range(WARMUP_BATCHES):
            loader.next_batch()
        batches, longest = epochs * batches_per_epoch, 0.0
        start = time.perf_counter()
        for _ in range(batches):
            before = time.perf_counter()
            loader.next_batch()
            longest = max(longest, time.perf_counter() - before)
        elapsed = time.perf_counter() - start
    finally:
        loader.close()
    samples = batches * cfg.train.global_batch
    return {"samples_per_s": samples / elapsed, "samples": samples, "seconds": elapsed,
            "longest_batch_wait_s": longest,
            "num_workers": cfg.data.num_workers, "shuffle_buffer": cfg.data.shuffle_buffer,
            "streams": loader.spec.num_streams, "shards": len(loader.spec.paths)}


# -- what training consumes ------------------------------------------------------------------
def measure_training(config: str, shards: str, ranks: int, steps: int, work: str,
                     global_batch: int) -> dict:
    from nbp_mega.metrics import read_metrics

    run_dir = os.path.join(work, f"run_ranks{ranks}")
    overrides = [f"run_dir={run_dir}", f"data.shards={shards}", "data.val_shards=",
                 f"train.steps={steps}", "train.save_every=0", "train.eval_every=0",
                 "log.progress=false", "log.tensorboard=false", "log.peak_tflops=1"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(NPROC_PER_NODE=str(ranks), PYTHON=sys.executable)
    start = time.perf_counter()
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch.sh"), config, *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"training with {ranks} ranks failed ({proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))[0]
    timed = [r["step_seconds"] for r in records if r["step"] > WARMUP_STEPS]
    if not timed:
        raise RuntimeError(f"{steps} steps leave none to time after {WARMUP_STEPS} warm-up "
                           f"steps; use --steps > {WARMUP_STEPS}")
    median = statistics.median(timed)
    return {"ranks": ranks, "samples_per_s": global_batch / median,
            "median_step_seconds": median, "timed_steps": len(timed),
            "job_seconds": time.perf_counter() - start}


# -- preprocessing (optional) ----------------------------------------------------------------
def measure_preprocess(work: str, videos: int, frames: int, resolution: int) -> list[dict]:
    from nbp_mega.data.preprocess import PreprocessConfig, run_preprocess
    from nbp_mega.data.synthetic_video import write_synthetic_videos
    from nbp_mega.data.video import ClipSpec

    folder = os.path.join(work, "videos")
    write_synthetic_videos(folder, count=videos, frames=4 * frames, size=2 * resolution)
    spec = ClipSpec(frames=frames, resolution=resolution)
    results = []
    for name, tokenizer in (("decode_only", None), ("tiny_tokenizer", "tiny")):
        out = os.path.join(work, f"pre_{name}")
        cfg = PreprocessConfig(input=folder, output=out, tokenizer=tokenizer,
                               raw=tokenizer is None, clips=spec, workers=0)
        manifest, _ = run_preprocess(cfg)
        run = manifest["run"]
        results.append({"setup": name, "clips": run["clips_now"], "seconds": run["seconds"],
                        "clips_per_s": run["clips_per_s"], "frames": frames,
                        "resolution": resolution, "videos": videos})
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.yaml"))
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 1],
                   help="training setups to time (processes of launch.sh)")
    p.add_argument("--steps", type=int, default=6, help="training steps per setup")
    p.add_argument("--epochs", type=int, default=2, help="loader epochs to time")
    p.add_argument("--batches-per-epoch", type=int, default=256,
                   help="synthetic data size in global batches")
    p.add_argument("--preprocess", action="store_true", help="also time preprocessing")
    p.add_argument("--pre-videos", type=int, default=4)
    p.add_argument("--pre-frames", type=int, default=17)
    p.add_argument("--pre-resolution", type=int, default=64)
    p.add_argument("--work-dir", help="scratch folder (default: a temporary one)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    from nbp_mega.config import load_config

    report = {"machine": machine(), "config": os.path.relpath(args.config, ROOT)}
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        cfg = load_config(args.config)
        shards = write_shards(cfg, os.path.join(work, "shards"), args.batches_per_epoch)
        report["loader"] = measure_loader(cfg, shards, args.epochs, args.batches_per_epoch)
        report["training"] = [measure_training(args.config, shards, r, args.steps, work,
                                               cfg.train.global_batch) for r in args.ranks]
        if args.preprocess:
            report["preprocess"] = measure_preprocess(work, args.pre_videos, args.pre_frames,
                                                      args.pre_resolution)
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    fastest = max(report["training"], key=lambda t: t["samples_per_s"])
    ratio = report["loader"]["samples_per_s"] / fastest["samples_per_s"]
    report["ratio"] = {"loader_over_training": ratio, "against_ranks": fastest["ranks"],
                       "target": TARGET_RATIO, "meets_target": ratio >= TARGET_RATIO}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"loader {report['loader']['samples_per_s']:.0f} samples/s; training "
              + ", ".join(f"{t['ranks']} ranks {t['samples_per_s']:.1f} samples/s"
                          for t in report["training"])
              + f"; ratio {ratio:.0f}x (target {TARGET_RATIO:.0f}x: "
              + ("met" if ratio >= TARGET_RATIO else "NOT met") + ")")
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
