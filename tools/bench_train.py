"""Training throughput: tokens/s and model FLOP utilisation, ZeRO-3 vs a plain PyTorch loop.

    python tools/bench_train.py --json [--configs configs/tiny.yaml configs/bench_100m.yaml]

For each config, on synthetic token shards of its grid and vocabulary:
  zero3_dp2  the real trainer as `make demo` runs it: `bash launch.sh` with 2 ranks (torchrun,
             gloo, one thread per rank), DeepSpeed ZeRO-3, the config's global batch;
  plain      one process, torch.set_num_threads(<ranks>), the same model class, data loader,
             AdamW and global batch in a plain forward/backward/step loop (no DeepSpeed).
Both use the whole machine (2 cores: 2 ranks x 1 thread vs 1 process x 2 threads). A step's
time includes waiting for data. The first --warmup steps are not timed; the median of the
next --steps is; then --profile steps run under torch.profiler (not timed) and give the time
breakdown (nbp_mega/profiling.py: attention, matmul, communication, optimizer, data, other).

MFU = model FLOP/s / measured peak, where model FLOPs per target token are nbp_mega.info's
(6 x matmul parameters + attention over the visible keys, forward + backward) and the peak is
the best of square fp32 matmuls (2048^2) on all the machine's threads, measured in this run
before, between and after the configs (the best of those: a shared machine's neighbours
can only make a measurement slower, and an underestimated peak would inflate MFU).
Prints a JSON list: one "machine" record, one record per (config, setup), one "targets"
record per config: zero3_dp2 >= 0.8x plain tokens/s, and MFU >= 0.4 for the ~100M config.
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

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TARGET_RATIO = 0.8  # zero3_dp2 tokens/s >= this x plain
TARGET_MFU = 0.4  # for configs of >= MFU_TARGET_PARAMS parameters
MFU_TARGET_PARAMS = 50_000_000


def matmul_peak_tflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def machine(threads: int, peaks: list[float]) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return {"shape": "machine", "cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "matmul_peak_tflops": max(peaks),
            "matmul_peak_measurements": peaks}


def bench_overrides(data_dir: str, run_dir: str, total_steps: int, profile_start: int,
                    profile_steps: int) -> list[str]:
    return [f"run_dir={run_dir}", f"data.shards={data_dir}/train",
            f"data.val_shards={data_dir}/val", f"train.steps={total_steps}",
            "train.save_every=0", f"train.stop_at={total_steps}", "train.eval_every=0",
            "log.progress=false", "log.tensorboard=false", f"log.profile_start={profile_start}",
            f"log.profile_steps={profile_steps}"]


def make_data(cfg, out_dir: str, clips: int) -> None:
    from nbp_mega.data.synthetic import write_synthetic_shards

    write_synthetic_shards(out_dir, num_train=clips, num_val=cfg.train.global_batch,
                           grid=tuple(cfg.model.grid), vocab=cfg.model.vocab_size,
                           classes=cfg.model.num_classes, shard_size=max(clips // 8, 1))


def child_env(**changes) -> dict:
    """This environment without the job variables model_info's one-process job set."""
    job = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    return {**{k: v for k, v in os.environ.items() if k not in job}, **changes}


def run_zero3(config: str, overrides: list[str], ranks: int) -> None:
    env = child_env(NPROC_PER_NODE=str(ranks), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    run = subprocess.run(["bash", os.path.join(ROOT, "launch.sh"), config, *overrides],
                         env=env, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"launch.sh {config} failed:\n{run.stderr[-3000:]}")


def run_plain(config: str, overrides: list[str], threads: int) -> None:
    """The plain loop in a fresh process (its own threads and memory)."""
    run = subprocess.run([sys.executable, os.path.abspath(__file__), "--plain-loop", config,
                          "--threads", str(threads), "--", *overrides],
                         env=child_env(), capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"plain loop {config} failed:\n{run.stderr[-3000:]}")


def plain_loop(config: str, overrides: list[str], threads: int) -> None:
    """Writes <run_dir>/metrics.jsonl (step, step_seconds) and profile/ like the trainer."""
    from nbp_mega.config import load_config
    from nbp_mega.data.loader import build_loaders
    from nbp_mega.model import NBPTransformer
    from nbp_mega.optim import build_optimizer
    from nbp_mega.parallel.dims import ParallelConfig, init_parallel
    from nbp_mega.parallel.layers import TensorParallel
    from nbp_mega.profiling import StepProfiler, record_function

    torch.set_num_threads(threads)
    cfg = load_config(config, overrides)
    dims = init_parallel(ParallelConfig(tensor=1))
    loader, _ = build_loaders(cfg.data, seed=cfg.seed, global_batch=cfg.train.global_batch,
                              dp_rank=0, dp_size=1, grid=tuple(cfg.model.grid),
                              vocab_size=cfg.model.vocab_size)
    torch.manual_seed(cfg.seed)
    model = NBPTransformer(cfg.model, TensorParallel(dims, init_std=cfg.model.init_std)).train()
    optimizer = build_optimizer(model, cfg.optim)
    profiler = StepProfiler(os.path.join(cfg.run_dir, "profile"), start=cfg.log.profile_start,
                            steps=cfg.log.profile_steps)
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "metrics.jsonl"), "w") as out:
        for step in range(1, cfg.train.steps + 1):
            with profiler.step(step):
                start = time.perf_counter()
                with record_function("nbp.data"):
                    batch = loader.next_batch()
                labels = batch.labels if model.layout.prefix_len else None
                input_ids, targets = model.layout.build(batch.tokens, labels)
                model(input_ids, targets).mean().backward()
                with record_function("nbp.optimizer"):
                    if cfg.optim.grad_clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                seconds = time.perf_counter() - start
            out.write(json.dumps({"step": step, "step_seconds": seconds}) + "\n")
            out.flush()


def summarize(run_dir: str, timed: range, tokens_per_step: int, flops_per_token: float) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = {r["step"]: r for r in map(json.loads, f) if "step_seconds" in r}
    seconds = statistics.median(rows[s]["step_seconds"] + rows[s].get("data_seconds", 0.0)
                                for s in timed)
    tokens_per_s = tokens_per_step / seconds
    record = {"step_seconds": seconds, "tokens_per_s": tokens_per_s,
              "model_tflops": flops_per_token * tokens_per_s / 1e12}
    profile = os.path.join(run_dir, "profile", "profile_rank0.json")
    if os.path.exists(profile):
        with open(profile) as f:
            record["breakdown"] = json.load(f)["fraction"]
    return record


def bench_config(config: str, args, work_dir: str) -> list[dict]:
    """The zero3_dp2 and plain records of one config (without MFU: see add_mfu) and its
    "targets" record."""
    from nbp_mega.config import load_config
    from nbp_mega.info import model_info

    cfg = load_config(config)
    info = model_info(cfg.model)
    name = os.path.splitext(os.path.basename(config))[0]
    data_dir = os.path.join(work_dir, f"data_{name}")
    steps = args.steps or (3 if info["parameters"] >= MFU_TARGET_PARAMS else 20)
    total = args.warmup + steps + args.profile
    make_data(cfg, data_dir, clips=cfg.train.global_batch * (total + 2))
    timed = range(args.warmup + 1, args.warmup + steps + 1)
    tokens = cfg.train.global_batch * info["targets_per_clip"]
    records = []
    for setup, runner, width in (("zero3_dp2", run_zero3, args.ranks),
                                 ("plain", run_plain, args.ranks)):
        run_dir = os.path.join(work_dir, f"{name}_{setup}")
        runner(config, bench_overrides(data_dir, run_dir, total, args.warmup + steps + 1,
                                       args.profile) + args.set, width)
        records.append({"shape": name, "setup": setup, "parameters": info["parameters"],
                        "tokens_per_step": tokens, "steps_timed": steps,
                        **summarize(run_dir, timed, tokens, info["training_flops_per_token"])})
    zero3, plain = records
    ratio = zero3["tokens_per_s"] / plain["tokens_per_s"]
    targets = {"zero3_vs_plain": {"ratio": ratio, "target": TARGET_RATIO,
                                  "met": ratio >= TARGET_RATIO}}
    return [*records, {"shape": name, "setup": "targets", **targets}]


def add_mfu(records: list[dict], peak: float) -> None:
    """MFU of every run record against `peak` (TFLOP/s), and the MFU target of configs with
    >= MFU_TARGET_PARAMS parameters (met by the ZeRO-3 run)."""
    runs = {}
    for r in records:
        if "model_tflops" in r:
            r["mfu"] = r["model_tflops"] / peak
            runs[r["shape"], r["setup"]] = r
    for r in records:
        zero3, plain = runs.get((r["shape"], "zero3_dp2")), runs.get((r["shape"], "plain"))
        if r.get("setup") == "targets" and zero3["parameters"] >= MFU_TARGET_PARAMS:
            r["mfu"] = {"zero3_dp2": zero3["mfu"], "plain": plain["mfu"], "target": TARGET_MFU,
                        "met": zero3["mfu"] >= TARGET_MFU}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+",
                   default=["configs/tiny.yaml", "configs/bench_100m.yaml"])
    p.add_argument("--ranks", type=int, default=2, help="ZeRO-3 ranks = plain-loop threads")
    p.add_argument("--warmup", type=int, default=4,
                   help="untimed steps first (ZeRO-3 settles after ~4: it traces the order "
                        "in which modules fetch parameters)")
    p.add_argument("--steps", type=int, default=0,
                   help="timed steps (median; 0 = 3 for ~100M+ configs, 20 for smaller ones)")
    p.add_argument("--profile", type=int, default=1, help="profiled steps after the timed ones")
    p.add_argument("--work-dir", help="keep runs and data here (default: a temporary dir)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides for both setups (e.g. deepspeed.zero_optimization."
                        "reduce_scatter=true: ZeRO-3 on gloo with DeepSpeed's reduce-scatter)")
    p.add_argument("--json", action="store_true", help="print only the JSON list")
    p.add_argument("--plain-loop", metavar="CONFIG", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plain_loop:
        return plain_loop(args.plain_loop, args.overrides, args.threads)
    peaks = [matmul_peak_tflops(args.ranks)]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            records += bench_config(os.path.abspath(config), args, args.work_dir or tmp)
            peaks.append(matmul_peak_tflops(args.ranks))
            if not args.json:
                print(json.dumps(records[-3:], indent=1), file=sys.stderr, flush=True)
    records.insert(0, machine(args.ranks, peaks))
    add_mfu(records, max(peaks))
    print(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
