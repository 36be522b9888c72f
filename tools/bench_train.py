"""Training throughput: tokens/s and model FLOP utilisation, ZeRO-3 vs a plain PyTorch loop.

    python tools/bench_train.py --json [--configs configs/tiny.yaml configs/bench_100m.yaml]
                                [--steps N] [--rounds R] [--warmup W]

For each config, on synthetic token shards of its grid and vocabulary:
  zero3_dp2  the real trainer as `make demo` runs it: `bash launch.sh` with 2 ranks (torchrun,
             gloo, one thread per rank), DeepSpeed ZeRO-3, the config's global batch;
  plain      one process, torch.set_num_threads(<ranks>), the same model class, data loader,
             AdamW and global batch in a plain forward/backward/step loop (no DeepSpeed).
Both use the whole machine (2 cores: 2 ranks x 1 thread vs 1 process x 2 threads), so they
take turns: both are started once and stay alive, and only one runs at a time while the
other's processes are stopped (SIGSTOP; torchrun's agent is left running, idle). Each first
runs --warmup steps alone (ZeRO-3 settles after ~4: it traces the order in which modules
fetch parameters); then --rounds rounds of one turn each, in the order A B B A A B ... so that
slow drift of the machine hits both alike. A turn times --steps / --rounds consecutive steps;
the step a process was in when it was stopped contains the pause and is dropped. After the
last turn each finishes alone: --profile steps under torch.profiler (not timed) give the time
breakdown (nbp_mega/profiling.py: attention, matmul, communication, optimizer, data, other).
A step's time includes waiting for data. Reported: the median step time, its quartiles and
range, and the steps it came from. Default --steps: 16 for ~100M+ configs (4 turns of 4; at
13-16 s a step on 2 cores the 100M config takes ~13 minutes, the default run ~16), 40 for
smaller ones.

MFU = model FLOP/s / measured peak, where model FLOPs per target token are nbp_mega.info's
(6 x matmul parameters + attention over the visible keys, forward + backward) and the peak is
the best fp32 GEMM on all the machine's threads (nbp_mega.metrics.matmul_peak: squares of
1024, 2048, 4096 and the configs' own [tokens x d] x [d x 3d | d x ffn] and [tokens x ffn] x
[ffn x d] products, 3 times each), measured before, between and after the configs: neighbours
can only slow a measurement down, and an underestimated peak would inflate MFU.

Load: "load" in the machine record says what else ran. CPU time of every visible process
outside the bench's own process tree (/proc/<pid>/stat: utime + stime + the children it
reaped, a delta for those alive at the start, all of it for those started later; kernel
threads counted apart), the CPU time the hypervisor stole (/proc/stat), and the load averages
at the start, at every switch of turns and at the end (they include the bench's own ~2).
"quiet" is true when other processes used <= QUIET_MAX_FRACTION of the cores' time over the
run and steal was <= QUIET_MAX_FRACTION: only such a run may give README figures. (/proc
shows this container's processes only; neighbours outside it appear as steal, if at all.)

Prints a JSON list: one "machine" record, one record per (config, setup), one "targets"
record per config: zero3_dp2 >= 0.8x plain tokens/s, and MFU >= 0.4 for the ~100M config.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nbp_mega.machine_load import LoadWatch, process_tree, read_processes  # noqa: E402

TARGET_RATIO = 0.8  # zero3_dp2 tokens/s >= this x plain
TARGET_MFU = 0.4  # for configs of >= MFU_TARGET_PARAMS parameters
MFU_TARGET_PARAMS = 50_000_000
# -- the peak ---------------------------------------------------------------------------------
def gemm_shapes(cfg, ranks: int) -> list[tuple[int, int, int]]:
    """The model's own products [M, K] x [K, N] on one ZeRO-3 rank: M = its tokens."""
    from nbp_mega.info import model_info

    model = cfg.model.resolved()
    m = model_info(model)["sequence_length"] * max(cfg.train.global_batch // ranks, 1)
    d, ffn = model.hidden, model.ffn_hidden
    return [(m, d, 3 * d), (m, d, ffn), (m, ffn, d)]


def measure_peak(label: str, threads: int, shapes, watch: LoadWatch) -> dict:
    from nbp_mega.metrics import SQUARE_GEMMS, matmul_peak

    torch.set_num_threads(threads)
    result = {"at": label, **matmul_peak(torch.device("cpu"), [*SQUARE_GEMMS, *shapes])}
    watch.sample(f"peak {label}")
    return result


def machine(threads: int, peaks: list[dict], load: dict) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return {"shape": "machine", "cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "quiet": load["quiet"],
            "matmul_peak_tflops": max(p["tflops"] for p in peaks), "matmul_peaks": peaks,
            "load": load}


# -- the two setups ---------------------------------------------------------------------------
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


def zero3_command(config: str, overrides: list[str], ranks: int) -> tuple[list, dict]:
    env = child_env(NPROC_PER_NODE=str(ranks), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return ["bash", os.path.join(ROOT, "launch.sh"), config, *overrides], env


def plain_command(config: str, overrides: list[str], threads: int) -> tuple[list, dict]:
    """The plain loop in a fresh process (its own threads and memory)."""
    return [sys.executable, os.path.abspath(__file__), "--plain-loop", config, "--threads",
            str(threads), "--", *overrides], child_env()


class Run:
    """One setup's training processes, started once, stopped between its turns.

    timed: the step numbers whose times count; a stop drops the step then in progress."""

    def __init__(self, setup: str, command: tuple[list, dict], run_dir: str, keep_root: bool):
        self.setup, self.run_dir, self.keep_root = setup, run_dir, keep_root
        self.metrics = os.path.join(run_dir, "metrics.jsonl")
        self.timed, self.turns, self.clean_from = [], 0, None
        os.makedirs(run_dir, exist_ok=True)
        self.log = open(os.path.join(run_dir, "bench_output.log"), "w")
        argv, env = command
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def last_step(self) -> int:
        """The last step in metrics.jsonl (0 before the first)."""
        if not os.path.exists(self.metrics):
            return 0
        with open(self.metrics) as f:
            lines = f.read().split("\n")[:-1]  # the last line may be half written
        steps = [json.loads(line)["step"] for line in lines if '"step_seconds"' in line]
        return max(steps, default=0)

    def wait_for(self, step: int, watch: LoadWatch, timeout: float = 1800.0) -> None:
        deadline = time.monotonic() + timeout
        while self.last_step() < step:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.setup} ended or stalled before step {step} "
                                   f"(exit {self.proc.returncode}):\n{self.output_tail()}")
            watch.tick()
            time.sleep(0.02)

    def output_tail(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-3000:]

    def _pids(self) -> list[int]:
        keys = process_tree(read_processes(), self.proc.pid)
        return [pid for pid, _ in keys if not (self.keep_root and pid == self.proc.pid)]

    def _signal(self, sig: int) -> list[int]:
        pids = self._pids()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def pause(self) -> None:
        """Stop the processes, wait until they are stopped; the step in progress is dropped."""
        pids = self._signal(signal.SIGSTOP)
        for pid in pids:
            for _ in range(200):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] in "TtZX":
                            break
                except OSError:
                    break
                time.sleep(0.005)
        self.clean_from = self.last_step() + 2

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def turn(self, steps: int, watch: LoadWatch, last_timed: int) -> None:
        """Let it run `steps` clean steps (it was resumed, or runs on from its last turn)."""
        first = self.clean_from
        self.wait_for(first + steps - 1, watch)
        self.timed += [s for s in range(first, first + steps) if s <= last_timed]
        self.clean_from, self.turns = first + steps, self.turns + 1

    def finish(self) -> None:
        self.resume()
        if self.proc.wait():
            raise RuntimeError(f"{self.setup} failed (exit {self.proc.returncode}):\n"
                               f"{self.output_tail()}")
        self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self._signal(signal.SIGCONT)
            for pid in self._pids() + [self.proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()


def schedule(rounds: int) -> list[list[int]]:
    """Turns of setups 0 and 1, ABBA-ordered (linear drift cancels), grouped where one setup
    runs twice in a row: [[0], [1, 1], [0, 0], [1]] for 2 rounds."""
    order = [i for r in range(rounds) for i in ((0, 1) if r % 2 == 0 else (1, 0))]
    return [list(group) for _, group in itertools.groupby(order)]


def plan_steps(warmup: int, rounds: int, per_turn: int, profile: int) -> list[dict]:
    """For setups 0 and 1: the last timed step, the profiled steps and the total."""
    plans = []
    for i in (0, 1):
        resumes = sum(1 for group in schedule(rounds) if group[0] == i)
        last_timed = warmup + resumes + rounds * per_turn  # one dropped step per resume
        profile_start = last_timed + 2  # after the step stopped at the end of the last turn
        plans.append({"last_timed": last_timed, "profile_start": profile_start,
                      "total": profile_start + max(profile, 1) - 1})
    return plans


def warm_up(run: Run, steps: int, watch: LoadWatch) -> None:
    """Start-up and the first `steps` steps alone; then it is stopped."""
    run.wait_for(steps, watch)
    run.pause()
    watch.sample(f"{run.setup} warmed up")


def interleave(runs: list[Run], rounds: int, per_turn: int, plans: list[dict],
               watch: LoadWatch) -> None:
    """The turns of the (warmed-up, stopped) runs, then each finishes alone."""
    for group in schedule(rounds):
        run = runs[group[0]]
        run.resume()
        for _ in group:
            run.turn(per_turn, watch, plans[group[0]]["last_timed"])
        run.pause()
        watch.sample(f"{run.setup} turn {run.turns}")
    for run in runs:
        run.finish()


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


# -- the report -------------------------------------------------------------------------------
def summarize(run_dir: str, timed, tokens_per_step: int, flops_per_token: float) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = {r["step"]: r for r in map(json.loads, f) if "step_seconds" in r}
    each = [rows[s]["step_seconds"] + rows[s].get("data_seconds", 0.0) for s in timed]
    seconds = statistics.median(each)
    quartiles = statistics.quantiles(each, n=4, method="inclusive") if len(each) > 1 else each * 3
    tokens_per_s = tokens_per_step / seconds
    record = {"step_seconds": seconds, "step_seconds_quartiles": [quartiles[0], quartiles[2]],
              "step_seconds_range": [min(each), max(each)], "steps_timed": len(each),
              "timed_steps": list(timed), "tokens_per_s": tokens_per_s,
              "model_tflops": flops_per_token * tokens_per_s / 1e12}
    profile = os.path.join(run_dir, "profile", "profile_rank0.json")
    if os.path.exists(profile):
        with open(profile) as f:
            record["breakdown"] = json.load(f)["fraction"]
    return record


def default_steps(parameters: int) -> int:
    return 16 if parameters >= MFU_TARGET_PARAMS else 40


def bench_config(config: str, args, work_dir: str, watch: LoadWatch) -> list[dict]:
    """The zero3_dp2 and plain records of one config (without MFU: see add_mfu) and its
    "targets" record."""
    from nbp_mega.config import load_config
    from nbp_mega.info import model_info

    cfg = load_config(config)
    info = model_info(cfg.model)
    name = os.path.splitext(os.path.basename(config))[0]
    data_dir = os.path.join(work_dir, f"data_{name}")
    per_turn = -(-(args.steps or default_steps(info["parameters"])) // args.rounds)
    plans = plan_steps(args.warmup, args.rounds, per_turn, args.profile)
    make_data(cfg, data_dir, clips=cfg.train.global_batch * (max(p["total"] for p in plans) + 2))
    setups = (("zero3_dp2", zero3_command, True), ("plain", plain_command, False))
    runs = []
    try:
        for (setup, command, keep_root), plan in zip(setups, plans, strict=True):
            run_dir = os.path.join(work_dir, f"{name}_{setup}")
            overrides = bench_overrides(data_dir, run_dir, plan["total"], plan["profile_start"],
                                        args.profile) + args.set
            runs.append(Run(setup, command(config, overrides, args.ranks), run_dir, keep_root))
            warm_up(runs[-1], args.warmup, watch)  # the next starts once this one is stopped
        interleave(runs, args.rounds, per_turn, plans, watch)
    finally:
        for run in runs:
            run.kill()
    tokens = cfg.train.global_batch * info["targets_per_clip"]
    records = [{"shape": name, "setup": run.setup, "parameters": info["parameters"],
                "tokens_per_step": tokens, "turns": run.turns,
                **summarize(run.run_dir, run.timed, tokens, info["training_flops_per_token"])}
               for run in runs]
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


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+",
                   default=["configs/tiny.yaml", "configs/bench_100m.yaml"])
    p.add_argument("--ranks", type=int, default=2, help="ZeRO-3 ranks = plain-loop threads")
    p.add_argument("--warmup", type=int, default=4,
                   help="untimed steps first (ZeRO-3 settles after ~4: it traces the order "
                        "in which modules fetch parameters)")
    p.add_argument("--steps", type=int, default=0,
                   help="timed steps per setup (median; 0 = 16 for ~100M+ configs, 40 for "
                        "smaller ones), split over the rounds")
    p.add_argument("--rounds", type=int, default=4, help="turns of each setup (ABBA order)")
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
    if args.warmup < 1 or args.rounds < 1 or args.steps < 0:
        p.error(f"need --warmup >= 1, --rounds >= 1, --steps >= 0; got {args.warmup}, "
                f"{args.rounds}, {args.steps}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.plain_loop:
        return plain_loop(args.plain_loop, args.overrides, args.threads)
    from nbp_mega.config import load_config

    watch = LoadWatch()
    configs = [os.path.abspath(c) for c in args.configs]
    shapes = sorted({s for c in configs for s in gemm_shapes(load_config(c), args.ranks)})
    peaks, records = [measure_peak("start", args.ranks, shapes, watch)], []
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            records += bench_config(config, args, args.work_dir or tmp, watch)
            name = os.path.splitext(os.path.basename(config))[0]
            peaks.append(measure_peak(f"after {name}", args.ranks, shapes, watch))
            if not args.json:
                print(json.dumps(records[-3:], indent=1), file=sys.stderr, flush=True)
    records.insert(0, machine(args.ranks, peaks, watch.summary()))
    add_mfu(records, records[0]["matmul_peak_tflops"])
    if not records[0]["quiet"]:
        print("bench_train: other processes ran during the bench (see machine.load): not a "
              "run for the README", file=sys.stderr)
    print(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
