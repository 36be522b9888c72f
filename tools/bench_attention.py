"""Block-causal attention on CPU: the fused kernel against the PyTorch ways of computing it.

    python tools/bench_attention.py --json [--shapes paper long] [--repeats 7] [--threads 2]
                                    [--impls fused dense_mask block_loop sdpa_causal]

Legend: B batch; N heads; S sequence (queries = keys); D head dim; L block length.

Implementations (all exact, same inputs):
    fused        the C++ kernel of nbp_mega._C (nbp_mega.ops "fused"; refuses to run if absent)
    dense_mask   one SDPA call with the dense [S, S] block-causal boolean mask: what the
                 paper's reference code does (nbp_mega/ops/reference.py)
    block_loop   one unmasked SDPA call per query block (nbp_mega/ops/block_loop.py): the best
                 pure-PyTorch way
    sdpa_causal  SDPA with is_causal=True: not block-causal, but the same work as block-causal
                 attention with small blocks on PyTorch's flash kernel: a practical lower bound
Passes: "fwd" runs under torch.no_grad(); "fwd+bwd" is the forward with autograd plus the
gradients of q, k, v for a fixed upstream gradient.

Every (impl, pass) of a shape is timed once per round, the order rotating between rounds, so
background load on a shared machine hits all of them alike; "seconds" is the median over the
rounds, after one warm-up round. Ratios are what to read on a noisy machine.

--json prints one JSON list of records, told apart by "shape":
    {"shape": "machine", cpu, cores, torch, kernel_isa, torch_cpu_capability, threads, dtype,
     repeats, load_average}                                   (first; once)
    {"shape": "paper" | "long", B, N, S, D, L, "impl", "pass", "seconds" (median), "min",
     "max", "repeats", "threads", "dtype", "vs_fused" (seconds / fused seconds of the same
     shape and pass: > 1 means the fused kernel is faster)}   (one per shape, impl, pass)
    {"shape": "targets", "all_met", "targets": [{"target", "shape", "pass", "ratio" (fused
     seconds / the fastest listed baseline's), "limit", "met"}]}   (last; targets whose
     shape or impls were not measured are left out)
Without --json it prints the same as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nbp_mega.ops import fused
from nbp_mega.ops.block_loop import block_loop_attention
from nbp_mega.ops.reference import dense_block_causal_attention


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
    return fused.fused_attention(q, k, v, L)[0]


def _sdpa_causal(q, k, v, L):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


IMPLS = {
    "fused": _fused,
    "dense_mask": dense_block_causal_attention,
    "block_loop": block_loop_attention,
    "sdpa_causal": _sdpa_causal,
}
PASSES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Target:
    shape: str
    baselines: tuple[str, ...]  # fused is compared with the fastest of these
    limit: float  # met when fused seconds <= limit * that baseline's seconds
    pass_: str = "fwd+bwd"

    @property
    def name(self) -> str:
        return f"fused <= {self.limit} x min({', '.join(self.baselines)})"


TARGETS = (
    Target("paper", ("dense_mask", "block_loop"), 0.7),
    Target("paper", ("sdpa_causal",), 1.1),
    Target("long", ("block_loop",), 0.9),
    Target("long", ("dense_mask",), 0.6),
)


def machine_record(threads: int, dtype: str, repeats: int) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"shape": "machine", "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "kernel_isa": fused.build_info().get("cpu", {}).get("isa"),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": threads, "dtype": dtype, "repeats": repeats,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def make_inputs(shape: Shape, dtype: torch.dtype):
    """q, k, v [B, N, S, D] leaves requiring grad, and the upstream gradient [B, N, S, D]."""
    g = torch.Generator().manual_seed(0)
    make = lambda: torch.randn(shape.B, shape.N, shape.S, shape.D, generator=g)  # noqa: E731
    q, k, v = (make().to(dtype).requires_grad_() for _ in range(3))
    return q, k, v, make().to(dtype)


def run_once(fn, pass_: str, q, k, v, grad_out, L: int) -> float:
    start = time.perf_counter()
    if pass_ == "fwd":
        with torch.no_grad():
            fn(q, k, v, L)
    else:
        torch.autograd.grad(fn(q, k, v, L), (q, k, v), grad_out)
    return time.perf_counter() - start


def measure_shape(shape: Shape, impls: list[str], repeats: int, dtype: torch.dtype):
    """{(impl, pass): [seconds of each round]}, rounds interleaved across impls and passes."""
    q, k, v, grad_out = make_inputs(shape, dtype)
    units = [(impl, p) for impl in impls for p in PASSES]
    for impl, p in units:  # warm-up round
        run_once(IMPLS[impl], p, q, k, v, grad_out, shape.L)
    times = {unit: [] for unit in units}
    for r in range(repeats):
        for impl, p in units[r % len(units):] + units[: r % len(units)]:
            times[impl, p].append(run_once(IMPLS[impl], p, q, k, v, grad_out, shape.L))
    return times


def shape_records(name: str, times: dict, threads: int, dtype: str) -> list[dict]:
    shape = SHAPES[name]
    medians = {unit: statistics.median(t) for unit, t in times.items()}
    records = []
    for (impl, p), t in times.items():
        fused_s = medians.get(("fused", p))
        records.append({
            "shape": name, **shape.__dict__, "impl": impl, "pass": p,
            "seconds": round(medians[impl, p], 5), "min": round(min(t), 5),
            "max": round(max(t), 5), "repeats": len(t), "threads": threads, "dtype": dtype,
            "vs_fused": round(medians[impl, p] / fused_s, 3) if fused_s else None,
        })
    return records


def targets_record(records: list[dict]) -> dict:
    seconds = {(r["shape"], r["impl"], r["pass"]): r["seconds"] for r in records
               if "impl" in r}
    results = []
    for t in TARGETS:
        needed = [(t.shape, impl, t.pass_) for impl in ("fused", *t.baselines)]
        if not all(key in seconds for key in needed):
            continue
        ratio = seconds[needed[0]] / min(seconds[key] for key in needed[1:])
        results.append({"target": t.name, "shape": t.shape, "pass": t.pass_,
                        "ratio": round(ratio, 3), "limit": t.limit, "met": ratio <= t.limit})
    return {"shape": "targets", "all_met": all(r["met"] for r in results),
            "targets": results}


def markdown(records: list[dict]) -> str:
    machine, *rows, targets = records
    lines = [f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, kernel "
             f"{machine['kernel_isa']}, {machine['threads']} threads, {machine['dtype']}, "
             f"median of {machine['repeats']}, load average {machine['load_average']}", "",
             "| shape | pass | impl | seconds | vs fused |", "|---|---|---|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["shape"], r["pass"])):
        lines.append(f"| {r['shape']} | {r['pass']} | {r['impl']} | {r['seconds']:.4f} | "
                     f"{r['vs_fused'] if r['vs_fused'] is not None else '-'} |")
    lines += ["", "| target | ratio | met |", "|---|---:|---|"]
    lines += [f"| {t['shape']} {t['pass']}: {t['target']} | {t['ratio']} | "
              f"{'yes' if t['met'] else 'NO'} |" for t in targets["targets"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["paper", "long"], choices=list(SHAPES))
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--repeats", type=int, default=7, help="timed rounds after one warm-up")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print the JSON list (else markdown)")
    args = p.parse_args(argv)
    if "fused" in args.impls and not fused.AVAILABLE:
        p.error(f"the fused kernel is not built ({fused.IMPORT_ERROR}); build it or drop "
                "'fused' from --impls")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    records = [machine_record(args.threads, args.dtype, args.repeats)]
    for name in args.shapes:
        times = measure_shape(SHAPES[name], args.impls, args.repeats, dtype)
        records += shape_records(name, times, args.threads, args.dtype)
    records.append(targets_record(records))
    print(json.dumps(records, indent=1) if args.json else markdown(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
