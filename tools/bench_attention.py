"""Block-causal attention: the fused kernel against the PyTorch ways of computing it, on the
CPU or on a GPU.

    python tools/bench_attention.py --json [--device cpu|cuda] [--shapes paper long]
        [--repeats 7] [--calls N] [--threads 2] [--dtype D] [--impls fused dense_mask ...]

Legend: B batch; N heads; S sequence (queries = keys); D head dim; L block length.

Implementations (same inputs; all block-causal except sdpa_causal):
    fused        the kernel of nbp_mega._C for the tensors' device (C++ on the CPU, CUDA on a
                 GPU), called directly (nbp_mega.ops.fused.fused_attention), never a fallback:
                 where it cannot run (not built, built without CUDA, fp32 on CUDA) its records
                 carry the reason as their error
    flex         FlexAttention with the block-sparse mask (nbp_mega/ops/flex.py), compiled on
                 CUDA; eager and forward-only on the CPU (so not among the CPU defaults)
    dense_mask   one SDPA call with the dense [S, S] block-causal boolean mask: what the
                 paper's reference code does (nbp_mega/ops/reference.py)
    block_loop   one unmasked SDPA call per query block (nbp_mega/ops/block_loop.py): the best
                 pure-PyTorch way on the CPU
    sdpa_causal  SDPA with is_causal=True: not block-causal, but the same work as block-causal
                 attention with small blocks on PyTorch's flash kernel: a practical lower bound
Defaults: --device cpu: fused dense_mask block_loop sdpa_causal in float32, 2 threads;
--device cuda: fused flex dense_mask sdpa_causal in bfloat16.
Passes: "fwd" runs under torch.no_grad(); "fwd+bwd" is the forward with autograd plus the
gradients of q, k, v for a fixed upstream gradient.

Timing: every (impl, pass) of a shape is timed once per round, the order rotating between
rounds, so background load hits all of them alike; "seconds" is the median over the rounds,
after one warm-up round. A round times --calls back-to-back calls (seconds are per call): on
the CPU 1 call with perf_counter; on CUDA 20 calls between CUDA events after a synchronize.
Ratios are what to read on a noisy machine.

Correctness: before timing, each impl runs forward and backward once (also its first warm-up,
and FlexAttention's compilation) and is compared with the float32 reference of what it
computes (the dense block-causal mask; for sdpa_causal the causal mask), evaluated on the
same device from the same (rounded) inputs: "max_abs_error" {out, dq, dk, dv} and "correct"
(each error <= TOLERANCE[dtype] x the largest magnitude of that reference tensor). A fast
wrong kernel shows as wrong, and cannot meet a target.

Failures: an impl that raises (in the check or in any timed call) gets "error" (type and
message) in its records instead of seconds; the others go on. A CUDA error that poisons the
context (an illegal memory access) makes every later CUDA call fail too: then the first impl
with an error is the culprit.

--json prints one JSON list of records, told apart by "shape":
    {"shape": "machine", device, cpu, cores, torch, threads, dtype, repeats, calls,
     load_average, load (nbp_mega/machine_load.py: others' CPU time, steal, "quiet"),
     kernel_isa, torch_cpu_capability (CPU) | gpu, capability, cuda, driver,
     gpu_memory_gb, kernel_cuda_archs (CUDA)}                 (first; once)
    {"shape": "paper" | "long" | "tiny", B, N, S, D, L, "impl", "pass", "device", "dtype",
     "seconds" (median; null after an error), "min", "max", "repeats", "calls", "threads",
     "vs_fused" (seconds / fused seconds of the same shape and pass: > 1 means the fused kernel
     is faster), "max_abs_error", "correct", "error" (only if it failed)}
                                                              (one per shape, impl, pass)
    {"shape": "targets", "all_met", "targets": [{"target", "shape", "pass", "ratio" (fused
     seconds / the fastest listed baseline's; null if one failed), "limit", "met"}]}
     (last). The targets are set for the CPU; those whose shape or impls were not measured
     are left out. "all_met" is true or false when at least one target was evaluated, and
     null when none applies (another device, or only the tiny shape).
Without --json it prints the same as markdown tables.
Exit status: 1 if an impl failed or was wrong, or a target was missed; else 0 (also when no
target applies: the output says so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nbp_mega.machine_load import LoadWatch  # noqa: E402
from nbp_mega.ops import flex, fused  # noqa: E402  (a checkout that is not installed too)
from nbp_mega.ops.block_loop import block_loop_attention  # noqa: E402
from nbp_mega.ops.reference import dense_block_causal_attention  # noqa: E402


@dataclass(frozen=True)
class Shape:
    B: int
    N: int
    S: int
    D: int
    L: int


SHAPES = {
    "paper": Shape(B=2, N=16, S=1280, D=96, L=16),  # one 700M training step's attention
    "long": Shape(B=1, N=8, S=4096, D=64, L=256),  # long video, large blocks
    "tiny": Shape(B=1, N=2, S=256, D=32, L=16),  # smoke test of the tool
}


def _fused(q, k, v, L):
    reason = fused.unsupported_reason(q)
    if reason is not None:  # say why instead of failing somewhere inside the op
        raise RuntimeError(reason)
    return fused.fused_attention(q, k, v, L)[0]


def _sdpa_causal(q, k, v, L):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


IMPLS = {
    "fused": _fused,
    "flex": flex.flex_block_causal_attention,
    "dense_mask": dense_block_causal_attention,
    "block_loop": block_loop_attention,
    "sdpa_causal": _sdpa_causal,
}
DEFAULT_IMPLS = {"cpu": ["fused", "dense_mask", "block_loop", "sdpa_causal"],
                 "cuda": ["fused", "flex", "dense_mask", "sdpa_causal"]}
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
DEFAULT_CALLS = {"cpu": 1, "cuda": 20}
PASSES = ("fwd", "fwd+bwd")
# Correct when max |impl - fp32 reference| <= this x max |reference|, per output and gradient:
# some 10x the rounding of a dtype's result (bf16 keeps 8 bits, fp16 11), far below the O(1)
# error of a missed or extra tile.
TOLERANCE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}


@dataclass(frozen=True)
class Target:
    shape: str
    baselines: tuple[str, ...]  # fused is compared with the fastest of these
    limit: float  # met when fused seconds <= limit * that baseline's seconds
    pass_: str = "fwd+bwd"
    device: str = "cpu"  # where the target was set

    @property
    def name(self) -> str:
        return f"fused <= {self.limit} x min({', '.join(self.baselines)})"


TARGETS = (
    Target("paper", ("dense_mask", "block_loop"), 0.7),
    Target("paper", ("sdpa_causal",), 1.1),
    Target("long", ("block_loop",), 0.9),
    Target("long", ("dense_mask",), 0.6),
)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def gpu_driver() -> str | None:
    try:
        run = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return run.stdout.strip().splitlines()[0] if run.returncode == 0 and run.stdout else None


def machine_record(device: torch.device, threads: int, dtype: str, repeats: int,
                   calls: int) -> dict:
    record = {"shape": "machine", "device": device.type, "cpu": cpu_name(),
              "cores": os.cpu_count(), "torch": torch.__version__, "threads": threads,
              "dtype": dtype, "repeats": repeats, "calls": calls,
              "load_average": [round(x, 2) for x in os.getloadavg()]}
    if device.type == "cpu":
        return {**record, "kernel_isa": fused.build_info().get("cpu", {}).get("isa"),
                "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    props = torch.cuda.get_device_properties(device)
    return {**record, "gpu": props.name, "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda, "driver": gpu_driver(),
            "gpu_memory_gb": round(props.total_memory / 2**30, 1),
            "kernel_cuda_archs": fused.build_info().get("cuda", {}).get("archs")}


@dataclass
class Inputs:
    q: torch.Tensor  # [B, N, S, D], leaves requiring grad
    k: torch.Tensor
    v: torch.Tensor
    grad_out: torch.Tensor  # [B, N, S, D], the upstream gradient of fwd+bwd

    def frozen(self) -> tuple[torch.Tensor, ...]:
        """q, k, v without autograd, for the forward pass (FlexAttention on the CPU refuses
        inputs that require grad even under no_grad)."""
        return self.q.detach(), self.k.detach(), self.v.detach()


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Inputs:
    g = torch.Generator().manual_seed(0)
    make = lambda: torch.randn(shape.B, shape.N, shape.S, shape.D, generator=g)  # noqa: E731
    q, k, v = (make().to(device, dtype).requires_grad_() for _ in range(3))
    return Inputs(q, k, v, make().to(device, dtype))


def forward_backward(fn, x: Inputs, L: int) -> tuple[torch.Tensor, tuple]:
    out = fn(x.q, x.k, x.v, L)
    return out, torch.autograd.grad(out, (x.q, x.k, x.v), x.grad_out)


def references(x: Inputs, L: int, impls: list[str]) -> dict:
    """{"block_causal" | "causal": {"out", "dq", "dk", "dv"}} in float32 from x's values."""
    x32 = Inputs(*(t.detach().float().requires_grad_() for t in (x.q, x.k, x.v)),
                 x.grad_out.float())
    kinds = {"block_causal": dense_block_causal_attention, "causal": _sdpa_causal}
    if "sdpa_causal" not in impls:
        del kinds["causal"]
    refs = {}
    for kind, fn in kinds.items():
        out, grads = forward_backward(fn, x32, L)
        refs[kind] = dict(zip(("out", "dq", "dk", "dv"), (out, *grads), strict=True))
    return refs


def error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).strip()[:500]}"


def judge(errors: dict, ref: dict, dtype: str) -> dict:
    correct = all(e <= TOLERANCE[dtype] * ref[name].abs().max().item()
                  for name, e in errors.items())
    return {"max_abs_error": {n: float(f"{e:.3g}") for n, e in errors.items()},
            "correct": correct}


def check_impl(name: str, x: Inputs, refs: dict, L: int, dtype: str) -> dict:
    """{pass: {"max_abs_error", "correct"} or {"error"}}: impl `name` against its reference,
    each pass run as it is timed (the forward alone under no_grad)."""
    ref, fn = refs["causal" if name == "sdpa_causal" else "block_causal"], IMPLS[name]
    diff = lambda a, b: (a.float() - b).abs().max().item()  # noqa: E731
    result = {}
    try:  # a kernel may fail in any way: record it and go on
        out, grads = forward_backward(fn, x, L)
        got = dict(zip(("out", "dq", "dk", "dv"), (out, *grads), strict=True))
        result["fwd+bwd"] = judge({n: diff(t, ref[n]) for n, t in got.items()}, ref, dtype)
    except Exception as error:
        result["fwd+bwd"] = {"error": error_text(error)}
    try:
        with torch.no_grad():
            result["fwd"] = judge({"out": diff(fn(*x.frozen(), L), ref["out"])}, ref, dtype)
    except Exception as error:
        result["fwd"] = {"error": error_text(error)}
    return {p: result[p] for p in PASSES}


def run_once(fn, pass_: str, x: Inputs, L: int, frozen: tuple) -> None:
    if pass_ == "fwd":
        with torch.no_grad():
            fn(*frozen, L)
    else:
        forward_backward(fn, x, L)


def time_calls(fn, pass_: str, x: Inputs, L: int, calls: int) -> float:
    """Seconds per call over `calls` back-to-back calls."""
    frozen = x.frozen()
    if not x.q.is_cuda:
        start = time.perf_counter()
        for _ in range(calls):
            run_once(fn, pass_, x, L, frozen)
        return (time.perf_counter() - start) / calls
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(x.q.device)
    start.record()
    for _ in range(calls):
        run_once(fn, pass_, x, L, frozen)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def measure_shape(shape: Shape, impls: list[str], repeats: int, dtype: torch.dtype,
                  device: torch.device = torch.device("cpu"), calls: int = 1):
    """({(impl, pass): [seconds of each round]}, {(impl, pass): check result or error}),
    rounds interleaved across impls and passes; a unit that fails is timed no more."""
    try:
        x = make_inputs(shape, dtype, device)
        refs = references(x, shape.L, impls)
    except Exception as error:  # e.g. a CUDA context an earlier shape's kernel broke
        failure = {"error": f"inputs or reference: {error_text(error)}"}
        return {}, {(impl, p): failure for impl in impls for p in PASSES}
    dtype_name = str(dtype).removeprefix("torch.")
    status = {}
    for impl in impls:
        for p, result in check_impl(impl, x, refs, shape.L, dtype_name).items():
            status[impl, p] = result
    units = [(impl, p) for impl in impls for p in PASSES if "error" not in status[impl, p]]
    times = {unit: [] for unit in units}

    def timed(unit, record: bool) -> None:
        if "error" in status[unit]:
            return
        try:
            seconds = time_calls(IMPLS[unit[0]], unit[1], x, shape.L, calls)
        except Exception as error:
            status[unit] = {"error": error_text(error)}
            return
        if record:
            times[unit].append(seconds)

    for unit in units:  # warm-up round
        timed(unit, record=False)
    for r in range(repeats if units else 0):
        for unit in units[r % len(units):] + units[: r % len(units)]:
            timed(unit, record=True)
    return times, status


def shape_records(name: str, times: dict, threads: int, dtype: str, status: dict | None = None,
                  device: str = "cpu", calls: int = 1) -> list[dict]:
    shape = SHAPES[name]
    status = status or {}
    units = list(status) or list(times)
    ok = lambda unit: times.get(unit) and "error" not in status.get(unit, {})  # noqa: E731
    medians = {unit: statistics.median(times[unit]) for unit in units if ok(unit)}
    records = []
    for impl, p in units:
        record = {"shape": name, **shape.__dict__, "impl": impl, "pass": p, "device": device,
                  "dtype": dtype, "seconds": None, "min": None, "max": None,
                  "repeats": len(times.get((impl, p), [])), "calls": calls, "threads": threads,
                  "vs_fused": None, **status.get((impl, p), {})}
        if (impl, p) in medians:
            t, fused_s = times[impl, p], medians.get(("fused", p))
            record.update(seconds=round(medians[impl, p], 6), min=round(min(t), 6),
                          max=round(max(t), 6))
            if fused_s:
                record["vs_fused"] = round(medians[impl, p] / fused_s, 3)
        records.append(record)
    return records


def targets_record(records: list[dict], device: str = "cpu") -> dict:
    rows = {(r["shape"], r["impl"], r["pass"]): r for r in records if "impl" in r}
    results = []
    for t in TARGETS:
        needed = [(t.shape, impl, t.pass_) for impl in ("fused", *t.baselines)]
        if t.device != device or not all(key in rows for key in needed):
            continue
        fused_row, *baselines = (rows[key] for key in needed)
        seconds = [r.get("seconds") for r in (fused_row, *baselines)]
        ratio = None if None in seconds else seconds[0] / min(seconds[1:])
        met = ratio is not None and ratio <= t.limit and fused_row.get("correct", True)
        results.append({"target": t.name, "shape": t.shape, "pass": t.pass_,
                        "ratio": None if ratio is None else round(ratio, 3), "limit": t.limit,
                        "met": met})
    return {"shape": "targets", "all_met": all(r["met"] for r in results) if results else None,
            "targets": results}


def failed(records: list[dict]) -> bool:
    """Whether an impl raised or was wrong, or a target was missed."""
    rows = [r for r in records if "impl" in r]
    return (any("error" in r or r.get("correct") is False for r in rows)
            or records[-1]["all_met"] is False)


def markdown(records: list[dict]) -> str:
    machine, *rows, targets = records
    where = (f"{machine['cpu']}, {machine['cores']} cores, kernel {machine['kernel_isa']}, "
             f"{machine['threads']} threads" if machine["device"] == "cpu" else
             f"{machine['gpu']} (sm {machine['capability']}), CUDA {machine['cuda']}, driver "
             f"{machine['driver']}, kernel archs {machine['kernel_cuda_archs']}")
    lines = [f"{where}, torch {machine['torch']}, {machine['dtype']}, median of "
             f"{machine['repeats']} rounds of {machine['calls']} call(s), load average "
             f"{machine['load_average']}", "",
             "| shape | pass | impl | seconds | vs fused | max abs error | correct |",
             "|---|---|---|---:|---:|---|---|"]
    for r in sorted(rows, key=lambda r: (r["shape"], r["pass"])):
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.5f}"
        errors = ", ".join(f"{k} {v:.2g}" for k, v in r.get("max_abs_error", {}).items())
        verdict = ("ERROR: " + r["error"][:120]) if "error" in r else (
            "yes" if r["correct"] else "NO")
        lines.append(f"| {r['shape']} | {r['pass']} | {r['impl']} | {seconds} | "
                     f"{r['vs_fused'] if r['vs_fused'] is not None else '-'} | {errors} | "
                     f"{verdict} |")
    if not targets["targets"]:
        return "\n".join(lines + ["", "No target applies (the targets are set for the paper "
                                  "and long shapes on the CPU)."])
    lines += ["", "| target | ratio | met |", "|---|---:|---|"]
    lines += [f"| {t['shape']} {t['pass']}: {t['target']} | {t['ratio']} | "
              f"{'yes' if t['met'] else 'NO'} |" for t in targets["targets"]]
    return "\n".join(lines + ["", f"All targets met: {'yes' if targets['all_met'] else 'NO'}"])


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", nargs="+", default=["paper", "long"], choices=list(SHAPES))
    p.add_argument("--impls", nargs="+", choices=list(IMPLS),
                   help="default: fused dense_mask block_loop sdpa_causal (cpu), fused flex "
                        "dense_mask sdpa_causal (cuda)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds after one warm-up")
    p.add_argument("--calls", type=int, help="calls per timed round (default: 1 cpu, 20 cuda)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--dtype", choices=list(TOLERANCE),
                   help="default: float32 (cpu), bfloat16 (cuda)")
    p.add_argument("--json", action="store_true", help="print the JSON list (else markdown)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if args.repeats < 1 or (args.calls is not None and args.calls < 1):
        p.error(f"--repeats and --calls must be >= 1, got {args.repeats} and {args.calls}")
    args.impls = args.impls or DEFAULT_IMPLS[args.device]
    args.dtype = args.dtype or DEFAULT_DTYPE[args.device]
    args.calls = args.calls or DEFAULT_CALLS[args.device]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    watch = LoadWatch()
    records = [machine_record(device, args.threads, args.dtype, args.repeats, args.calls)]
    for name in args.shapes:
        times, status = measure_shape(SHAPES[name], args.impls, args.repeats,
                                      getattr(torch, args.dtype), device, args.calls)
        records += shape_records(name, times, args.threads, args.dtype, status, args.device,
                                 args.calls)
        watch.sample(f"after {name}")
    records[0]["load"] = watch.summary()  # what else ran: README figures need "quiet"
    records.append(targets_record(records, args.device))
    print(json.dumps(records, indent=1) if args.json else markdown(records))
    return 1 if failed(records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
