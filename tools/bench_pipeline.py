"""DeepSpeed's pipeline engine on this machine: step time, bubble and memory of PP=2 against
PP=1 for the same job, side by side.

    python tools/bench_pipeline.py --json [--config configs/bench_100m.yaml] [--set k=v ...]
                                   [--pp2-set k=v ...] [--steps N] [--rounds R] [--warmup W]
                                   [--profile P]

Two setups of the config, each the real trainer through `bash launch.sh` on 2 ranks (gloo,
one thread per rank), ZeRO-1, the same global batch and micro batch:
  pp1_dp2   data parallel: each rank runs global_batch / (2 x micro) micro-batches;
  pp2       two pipeline stages (DeepSpeed's 1F1B), global_batch / micro micro-batches.
They take turns on the machine (tools/bench_train.py's harness: both started once, one runs
while the other is stopped, ABBA order, the step in progress at a stop dropped). Reported per
setup: the median step time (quartiles, range), tokens/s, each rank's time breakdown over the
profiled steps (nbp_mega/profiling.py; "pipeline" is the time in sends and receives between
stages: the bubble while the pipeline fills and drains, and the transfers) and each rank's
peak RSS; and the 1F1B bubble the schedule implies, (pp - 1) / (A + pp - 1) of a stage's
time for A micro-batches. "quiet" in the machine record says whether anything else ran.

megatron-core's pipeline schedules cannot be measured here: they allocate on CUDA
(README, Pipeline parallelism).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from bench_train import (
    ROOT,
    Run,
    bench_overrides,
    interleave,
    machine,
    make_data,
    plan_steps,
    summarize,
    warm_up,
    zero3_command,
)

from nbp_mega.machine_load import LoadWatch

SETUPS = (("pp1_dp2", ["parallel.pipeline=1"]), ("pp2", ["parallel.pipeline=2"]))
DEFAULT_SET = ["model.layers=4", "model.grid=[2,16,16]", "train.global_batch=8",
               "train.micro_batch=1"]


def rank_profiles(run_dir: str, ranks: int) -> list[dict]:
    out = []
    for rank in range(ranks):
        with open(os.path.join(run_dir, "profile", f"profile_rank{rank}.json")) as f:
            profile = json.load(f)
        out.append({"rank": rank, "fraction": profile["fraction"],
                    "seconds": profile["seconds"], "wall_seconds": profile["wall_seconds"],
                    "peak_memory_gb": profile.get("peak_memory_gb")})
    return out


def bench(args, work_dir: str, watch: LoadWatch) -> list[dict]:
    from nbp_mega.config import load_config
    from nbp_mega.info import model_info

    common = ["parallel.zero_stage=1", *args.set]
    cfg = load_config(args.config, common)
    info = model_info(cfg.model)
    per_turn = -(-args.steps // args.rounds)
    plans = plan_steps(args.warmup, args.rounds, per_turn, args.profile)
    data_dir = os.path.join(work_dir, "data")
    make_data(cfg, data_dir, clips=cfg.train.global_batch * (max(p["total"] for p in plans) + 2))
    runs = []
    try:
        for (setup, extra), plan in zip(SETUPS, plans, strict=True):
            extra = extra + (args.pp2_set if setup == "pp2" else [])
            run_dir = os.path.join(work_dir, setup)
            overrides = [*common, *extra, *bench_overrides(data_dir, run_dir, plan["total"],
                                                           plan["profile_start"], args.profile)]
            runs.append(Run(setup, zero3_command(args.config, overrides, 2), run_dir, True))
            warm_up(runs[-1], args.warmup, watch)
        interleave(runs, args.rounds, per_turn, plans, watch)
    finally:
        for run in runs:
            run.kill()
    tokens = cfg.train.global_batch * info["targets_per_clip"]
    micro = cfg.train.micro_batch or cfg.train.global_batch // 2
    records = []
    for (setup, _), run in zip(SETUPS, runs, strict=True):
        pp = 2 if setup == "pp2" else 1
        accumulation = cfg.train.global_batch // (micro * (2 // pp))
        record = summarize(run.run_dir, run.timed, tokens, info["training_flops_per_token"])
        record.pop("breakdown", None)  # rank 0's: all ranks' are below
        records.append({"shape": os.path.basename(args.config), "setup": setup,
                        "parameters": info["parameters"], "pipeline": pp,
                        "micro_batch": micro, "micro_batches_per_step": accumulation,
                        "schedule_bubble": (pp - 1) / (accumulation + pp - 1),
                        "overrides": [*common, *(args.pp2_set if pp == 2 else [])],
                        "tokens_per_step": tokens, **record,
                        "ranks": rank_profiles(run.run_dir, 2)})
    pp1, pp2 = records
    return [*records, {"shape": pp1["shape"], "setup": "comparison",
                       "pp2_over_pp1_step_seconds": pp2["step_seconds"] / pp1["step_seconds"],
                       "pp2_pipeline_fraction": [r["fraction"]["pipeline"] for r in pp2["ranks"]],
                       "peak_memory_gb": {r["setup"]: [x["peak_memory_gb"] for x in r["ranks"]]
                                          for r in records}}]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "bench_100m.yaml"))
    p.add_argument("--set", nargs="+", default=DEFAULT_SET, metavar="KEY=VALUE",
                   help=f"overrides for both setups (default: {' '.join(DEFAULT_SET)})")
    p.add_argument("--pp2-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="overrides for the pipeline setup only (e.g. parallel.pipeline_layers="
                        "[3,1])")
    p.add_argument("--steps", type=int, default=12, help="timed steps per setup")
    p.add_argument("--rounds", type=int, default=4, help="turns of each setup (ABBA order)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--profile", type=int, default=2, help="profiled steps after the timed")
    p.add_argument("--work-dir", help="keep runs and data here (default: a temporary dir)")
    p.add_argument("--json", action="store_true", help="print only the JSON list")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.rounds < 1 or args.steps < args.rounds or args.profile < 1:
        p.error("need --warmup >= 1, --rounds >= 1, --steps >= --rounds, --profile >= 1")
    args.config = os.path.abspath(args.config)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    watch = LoadWatch()
    with tempfile.TemporaryDirectory() as tmp:
        records = bench(args, args.work_dir or tmp, watch)
    records.insert(0, machine(2, [{"tflops": 0.0}], watch.summary()))
    del records[0]["matmul_peak_tflops"], records[0]["matmul_peaks"]
    if not records[0]["quiet"]:
        print("bench_pipeline: other processes ran during the bench (see machine.load): not "
              "a run for the README", file=sys.stderr)
    if not args.json:
        print(json.dumps(records[-1], indent=1), file=sys.stderr)
    print(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
