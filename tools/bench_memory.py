"""Measured peak memory per rank of one training step, next to the planner's estimate.

    python tools/bench_memory.py CONFIG [key=value ...] --nproc N [--forward-only]
                                 [--steps K] [--json] [--out FILE] [--force]

Launches N ranks (this file with --worker, one process each, RANK/WORLD_SIZE/... set as
torchrun would, one thread each; gloo on the CPU, nccl on GPUs). Each builds the model the way
nbp_mega.train does - `partitioned_build`, `NBPTransformer`, `.to(device)`,
`declare_tp_layout`, `build_optimizer`, `build_scheduler`, `build_engine` (the same functions)
- then runs K training steps the way the trainer's train_step does (engine forward, backward,
step per micro batch) on random tokens; --forward-only builds the engine without an optimizer
(DeepSpeed's ZeRO-3 inference path) and runs a forward under torch.no_grad.

With parallel.pipeline > 1 each rank builds its stage (as nbp_mega.train does) and a step is
DeepSpeed's train_batch over the accumulation micro-batches (one phase: 1F1B and the optimizer
are inside it); the record's comparison.stages sets each stage's measured peak beside the
planner's estimate of that stage.

Memory: on the CPU the resident set (VmHWM of /proc/self/status, reset at the start of every
phase through /proc/self/clear_refs, so each phase reports its own peak); on a GPU
torch.cuda.max_memory_allocated (reset per phase). The baseline is the rank's memory after the
imports (torch, deepspeed, megatron) and joining the job, before the model: "model" figures
are peak - baseline, what the planner (nbp_mega.plan.memory) estimates. Phases: build, engine,
then per step forward, backward, optimizer (forward-only: forward). Components the engine
holds (parameters, gradients, master weights, Adam moments) are also counted tensor by tensor
after the last step, where DeepSpeed's objects expose them.

Before starting, the planner's estimate x N + the baseline must fit the machine's MemAvailable
with 3 GiB to spare (else it says so and exits 3; --force runs anyway); during the run a
watchdog stops the ranks if MemAvailable falls under 1 GiB.

Record (--json prints it, --out writes it): {"shape": "bench_memory", settings, ranks (per
rank: baseline, phases, components), measured, estimate, comparison, machine, load}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nbp_mega.machine_load import proc_status, reset_peak_rss  # noqa: E402 (needs ROOT)

GiB = 2**30
SPARE_BYTES = 3 * GiB  # free memory left to the machine's other users at the estimate
BASELINE_GUESS = GiB  # per rank, before measuring: torch + deepspeed + megatron imported
WATCHDOG_FLOOR = GiB  # stop the ranks when MemAvailable falls below this
# glibc maps every block over 64 KiB on its own and unmaps it when freed (no heap growth, no
# dynamic threshold), so a freed tensor leaves the RSS as it leaves a GPU's allocated bytes
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# -- /proc -------------------------------------------------------------------------------------
def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


# -- one rank ----------------------------------------------------------------------------------
class Phases:
    """Peak and end memory of each labelled phase of this rank."""

    def __init__(self, device):
        import torch

        self.torch, self.device, self.records = torch, device, {}

    def _reset(self) -> None:
        reset_peak_rss()
        if self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def now(self) -> dict:
        status = proc_status()
        out = {"rss_peak": status["VmHWM"], "rss_end": status["VmRSS"]}
        if self.device.type == "cuda":
            cuda = self.torch.cuda
            cuda.synchronize(self.device)
            out.update(peak=cuda.max_memory_allocated(self.device),
                       end=cuda.memory_allocated(self.device))
        else:
            out.update(peak=status["VmHWM"], end=status["VmRSS"])
        return out

    def run(self, name: str, fn):
        self._reset()
        start = time.perf_counter()
        result = fn()
        self.records[name] = {**self.now(), "seconds": round(time.perf_counter() - start, 2)}
        return result


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not t.numel():
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def engine_components(engine, model) -> dict[str, int]:
    """Bytes of what the engine holds, by the planner's components, where DeepSpeed's
    objects expose it (ZeRO-3 partitions, ZeRO-1/2 flat buffers, the inner optimizer)."""
    import torch

    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    params = list(model.parameters())
    param_tensors = [getattr(p, "ds_tensor", None) for p in params] + [
        p.data for p in params if p.numel()]
    out = {"parameters": _unique_bytes(param_tensors)}
    model_ptrs = {t.untyped_storage().data_ptr() for t in param_tensors if t is not None
                  and t.numel()}
    masters = [t for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups",
                              "fp32_groups_flat_partition") for t in getattr(opt, name, None) or []]
    if not hasattr(inner, "param_groups"):  # no optimizer (--forward-only)
        return out
    if not masters:  # a plain torch optimizer: the model's parameters
        masters = [p for g in inner.param_groups for p in g["params"]]
    out["master_weights"] = _unique_bytes(
        p for p in masters if p.numel() and p.untyped_storage().data_ptr() not in model_ptrs)
    out["optimizer_states"] = _unique_bytes(
        v for state in inner.state.values() for v in state.values()
        if torch.is_tensor(v) and v.dim() > 0)
    grads = [getattr(opt, name, None) for name in ("grad_partitions_flat_buffer",
                                                   "grads_in_partition")]
    grads += list(getattr(opt, "fp32_groups_gradients_flat", None) or [])
    grads += [p.grad for p in params]
    out["gradients"] = _unique_bytes(grads)
    return out


def random_batch(layout, cfg, rows: int, device):
    """input ids [rows, S] and targets [rows, Nt] of random clips, as the trainer builds them."""
    import torch

    g = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(cfg.model.vocab_size, (rows, *cfg.model.grid), generator=g)
    if layout.text_len:
        text = torch.randint(cfg.model.text_vocab, (rows, layout.text_len), generator=g)
        return layout.build(tokens.to(device), text=text.to(device))
    labels = None
    if layout.prefix_len:
        labels = torch.randint(cfg.model.num_classes, (rows,), generator=g).to(device)
    return layout.build(tokens.to(device), labels)


def worker(out_path: str, config: str, overrides: list[str], forward_only: bool,
           steps: int) -> None:
    from nbp_mega.train import quiet_third_party_warnings

    quiet_third_party_warnings()
    import logging

    import deepspeed  # noqa: F401  (imported before the baseline, as training has it)
    import torch

    from nbp_mega.config import load_config
    from nbp_mega.model import NBPTransformer
    from nbp_mega.optim import build_optimizer, build_scheduler
    from nbp_mega.parallel.deepspeed import (
        batch_arithmetic,
        build_engine,
        declare_tp_layout,
        partitioned_build,
    )
    from nbp_mega.parallel.dims import init_parallel, shutdown_parallel
    from nbp_mega.parallel.layers import TensorParallel
    from nbp_mega.parallel.pipeline import stage_of

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    cfg = load_config(config, overrides)
    dims = init_parallel(cfg.parallel)
    phases = Phases(dims.device)
    baseline = phases.now()

    stage = stage_of(cfg.model, cfg.parallel, dims.pp_rank) if dims.pp > 1 else None

    def build():
        torch.manual_seed(cfg.seed)
        with partitioned_build(cfg, dims):
            model = NBPTransformer(cfg.model, TensorParallel(dims, init_std=cfg.model.init_std),
                                   stage)
        model = model.to(dims.device)
        declare_tp_layout(model)
        return model

    def engine_of(model):
        if forward_only:
            return build_engine(model, None, None, cfg, dims)
        optimizer = build_optimizer(model, cfg.optim, cpu_offload=cfg.parallel.offload_optimizer)
        return build_engine(model, optimizer, build_scheduler(optimizer, cfg.optim,
                                                              cfg.train.steps), cfg, dims)

    model = phases.run("build", build)
    engine = phases.run("engine", lambda: engine_of(model))
    micro, accum = batch_arithmetic(cfg.train.global_batch, cfg.train.micro_batch, dims.dp)
    input_ids, targets = random_batch(model.layout, cfg, micro * accum, dims.device)
    for step in range(1, steps + 1):
        if stage is not None:  # as Trainer._pipeline_step: 1F1B over the micro-batches, then
            # the optimizer, inside DeepSpeed's train_batch (not separable into phases)
            batches = [(input_ids[i : i + micro], targets[i : i + micro])
                       for i in range(0, micro * accum, micro)]
            phases.run(f"step{step}.train_batch", lambda b=batches: engine.train_batch(iter(b)))
            continue
        if forward_only:
            engine.eval()
            with torch.no_grad():
                phases.run(f"step{step}.forward", lambda: engine(input_ids[:micro],
                                                                 targets[:micro]))
            continue
        engine.train()
        for i in range(accum):  # as Trainer.train_step
            rows = slice(i * micro, (i + 1) * micro)
            loss = phases.run(f"step{step}.forward", lambda r=rows: engine(input_ids[r],
                                                                          targets[r]))
            phases.run(f"step{step}.backward", lambda x=loss: engine.backward(x.mean()))
            phases.run(f"step{step}.optimizer", engine.step)
            del loss
    result = {"rank": dims.rank, "stage": dims.pp_rank, "baseline": baseline,
              "phases": phases.records,
              "components": engine_components(engine, model),
              "peak": max(r["peak"] for r in phases.records.values())}
    with open(out_path, "w") as f:
        json.dump(result, f)
    shutdown_parallel()


# -- the launcher ------------------------------------------------------------------------------
def child_env(rank: int, nproc: int, port: int) -> dict:
    job = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in job}
    env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
               LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS="1", **MALLOC_ENV)
    return env


def launch(args, work: str) -> list[dict]:
    """Run the ranks; their results ordered by rank. Stops them all if one fails or the
    machine runs low on memory."""
    from nbp_mega.parallel.dims import free_port

    port, procs, logs = free_port(), [], []
    for rank in range(args.nproc):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker",
               os.path.join(work, f"rank{rank}.json"), args.config, *args.overrides,
               "--steps", str(args.steps)] + (["--forward-only"] if args.forward_only else [])
        logs.append(open(os.path.join(work, f"rank{rank}.log"), "w"))
        procs.append(subprocess.Popen(cmd, env=child_env(rank, args.nproc, port),
                                      stdout=logs[-1], stderr=subprocess.STDOUT))
    try:
        _wait(procs, args.watch, work)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    results = []
    for rank in range(args.nproc):
        with open(os.path.join(work, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results


def _wait(procs, watch, work: str) -> None:
    lowest = mem_available()
    while any(p.poll() is None for p in procs):
        watch.tick()
        lowest = min(lowest, mem_available())
        failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed or lowest < WATCHDOG_FLOOR:
            rank = failed[0] if failed else 0
            with open(os.path.join(work, f"rank{rank}.log")) as f:
                tail = f.read()[-4000:]
            why = (f"rank {rank} failed (exit {procs[rank].returncode})" if failed else
                   f"MemAvailable fell to {lowest / GiB:.1f} GiB: stopped the ranks")
            raise RuntimeError(f"bench_memory: {why}; its output:\n{tail}")
        time.sleep(0.05)


# -- estimate and record -----------------------------------------------------------------------
def estimate(cfg, args, device: str):
    """The planner's phases and peak for exactly this run."""
    from nbp_mega.plan.layout import Job, Layout
    from nbp_mega.plan.memory import memory_phases, resident_between_steps, training_memory

    job = Job.of_config(cfg, backend="nccl" if device == "cuda" else "gloo")
    layout = Layout.of_config(cfg, args.nproc)
    kwargs = dict(device=device, step=min(args.steps, 2), forward_only=args.forward_only)
    phases = memory_phases(job, layout, **kwargs)
    residents = ({"parameters": phases["forward"]["parameters"]} if args.forward_only else
                 resident_between_steps(job, layout))
    return job, layout, phases, training_memory(job, layout, **kwargs), residents


def compare_stages(ranks: list[dict], job, layout, device: str, steps: int) -> list[dict]:
    """Pipeline: each stage's estimated peak (its largest phase: DeepSpeed's train_batch runs
    them all) against the measured peak of its ranks."""
    from nbp_mega.plan.memory import phase_total, stage_phases

    out = []
    for s, phases in enumerate(stage_phases(job, layout, device=device, step=min(steps, 2))):
        est = max(phase_total(p) for p in phases.values())
        got = max(r["peak"] - r["baseline"]["end"] for r in ranks if r["stage"] == s)
        out.append({"stage": s, "estimated": est, "measured": got,
                    "ratio": round(est / got, 3)})
    return out


def _measured_groups(rank: dict) -> dict[str, int]:
    """A rank's peak - baseline per phase group: build, engine, forward_backward (the forward
    alone with --forward-only), optimizer."""
    base = rank["baseline"]["end"]
    groups: dict[str, int] = {}
    for name, r in rank["phases"].items():
        kind = name.split(".")[-1]
        group = {"forward": "forward_backward", "backward": "forward_backward"}.get(kind, kind)
        groups[group] = max(groups.get(group, 0), r["peak"] - base)
    return groups


ESTIMATED_GROUPS = {"build": ("build",),
                    "engine": ("engine_cast", "engine_defragment", "engine_flatten",
                               "engine_states", "engine_hooks"),
                    "forward_backward": ("forward_backward", "gradient_reduce", "forward"),
                    "optimizer": ("optimizer_step",)}


def compare(ranks: list[dict], phases: dict, memory, residents: dict) -> dict:
    from nbp_mega.plan.memory import phase_total

    measured = [_measured_groups(r) for r in ranks]
    per_phase = {}
    for group, names in ESTIMATED_GROUPS.items():
        est = [phase_total(phases[n]) for n in names if n in phases]
        got = [m[group] for m in measured if group in m]
        if est and got:
            per_phase[group] = {"estimated": max(est), "measured": max(got),
                                "ratio": round(max(est) / max(got), 3)}
    model = max(r["peak"] - r["baseline"]["end"] for r in ranks)
    components = {name: {"estimated": residents.get(name, 0), "measured": got}
                  for name, got in ranks[0]["components"].items()}
    return {"model_estimated": memory.total, "model_measured": model,
            "ratio": round(memory.total / model, 3), "estimated_peak_phase": memory.peak_phase,
            "per_phase": per_phase, "components_rank0": components}


def machine_record() -> dict:
    import deepspeed
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def settings_record(cfg, args, job, layout, device: str) -> dict:
    return {"config": args.config, "overrides": args.overrides, "nproc": args.nproc,
            "device": device, "forward_only": args.forward_only, "steps": args.steps,
            "precision": cfg.train.precision, "zero_init": cfg.parallel.zero_init,
            "grid": cfg.model.grid, "parameters": job.shape.total_params,
            "loss_chunk": job.loss_chunk, "layout": layout.as_dict()}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--forward-only", action="store_true",
                   help="no optimizer; one forward under torch.no_grad per step")
    p.add_argument("--steps", type=int, default=1,
                   help="training steps (default 1; from the second on ZeRO-3 prefetches and "
                        "the Adam moments exist: the steady state the planner assumes)")
    p.add_argument("--json", action="store_true", help="print the JSON record")
    p.add_argument("--out", help="also write the record to this file")
    p.add_argument("--force", action="store_true",
                   help="run even if the estimate does not fit the free memory")
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_intermixed_args(argv)
    if args.nproc < 1 or args.steps < 1:
        p.error(f"need --nproc >= 1 and --steps >= 1, got {args.nproc}, {args.steps}")
    return args


def fits_machine(memory, nproc: int) -> tuple[bool, str]:
    need = nproc * (memory.total + BASELINE_GUESS) + SPARE_BYTES
    free = mem_available()
    return need <= free, (f"needs ~{need / GiB:.1f} GiB ({nproc} ranks x (estimate "
                          f"{memory.total / GiB:.1f} + baseline ~{BASELINE_GUESS / GiB:.0f}) "
                          f"+ {SPARE_BYTES / GiB:.0f} spare), MemAvailable is "
                          f"{free / GiB:.1f} GiB")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.config, args.overrides, args.forward_only, args.steps)
        return 0
    import torch

    from nbp_mega.config import load_config
    from nbp_mega.config_fields import ConfigError
    from nbp_mega.machine_load import LoadWatch

    try:
        cfg = load_config(args.config, args.overrides)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        job, layout, phases, memory, residents = estimate(cfg, args, device)
    except ConfigError as e:
        print(f"bench_memory: {e}", file=sys.stderr)
        return 2
    ok, why = fits_machine(memory, args.nproc) if device == "cpu" else (True, "")
    if not ok and not args.force:
        print(f"bench_memory: not run, it would not fit this machine: {why}", file=sys.stderr)
        return 3
    args.watch = LoadWatch()
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as work:
        try:
            ranks = launch(args, work)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
    record = {"shape": "bench_memory", "date": datetime.date.today().isoformat(),
              "settings": settings_record(cfg, args, job, layout, device), "ranks": ranks,
              "estimate": {"total": memory.total, "peak_phase": memory.peak_phase,
                           "components": memory.components(), "phases": memory.phases},
              "comparison": compare(ranks, phases, memory, residents), "machine": machine_record(),
              "load": args.watch.summary()}
    if layout.pipeline > 1:
        record["comparison"]["stages"] = compare_stages(ranks, job, layout, device, args.steps)
    record["quiet"] = record["load"]["quiet"]
    text = json.dumps(record, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    c = record["comparison"]
    print(text if args.json else
          f"model memory per rank: estimated {c['model_estimated'] / GiB:.2f} GiB, measured "
          f"{c['model_measured'] / GiB:.2f} GiB (ratio {c['ratio']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
