"""A plan as a table (for people) and as a JSON record (for tools)."""

from __future__ import annotations

from dataclasses import asdict

from nbp_mega.plan.layout import GiB
from nbp_mega.plan.search import Option, Plan

COLUMNS = ("parameters", "gradients", "master_weights", "optimizer_states", "activations")
HEADER = (" tp  dp  pp zero off  mb ckpt | params  grads master  optim  activ   temp  total"
          " peak at | kv/clip |  step s   tok/s")
PHASES = {"forward_backward": "fwd/bwd", "optimizer_step": "step", "gradient_reduce": "reduce",
          "build": "build", "forward": "forward"}


def _gib(n: float) -> str:
    return f"{n / GiB:6.2f}"


def option_row(option: Option, job, mark: str = " ") -> str:
    lay, mem = option.layout, option.memory
    parts = " ".join(_gib(getattr(mem, c)) for c in COLUMNS)
    temp = sum(mem.temporary.values())
    return (f"{lay.tensor:3d} {lay.data:3d} {lay.pipeline:3d} {lay.zero_stage:4d} "
            f"{'y' if lay.offload_optimizer else 'n':>3} {lay.micro_batch:3d} "
            f"{'y' if lay.activation_checkpointing else 'n':>4} | {parts} {_gib(temp)} "
            f"{_gib(mem.total)} {PHASES.get(mem.peak_phase, 'engine'):>7} | "
            f"{_gib(mem.kv_cache):>7} | {option.time.total:7.3f} "
            f"{option.tokens_per_s(job):7.0f}{mark}")


def format_table(plan: Plan, top: int = 15) -> str:
    job, c = plan.job, plan.cluster
    s = job.shape
    lines = [f"model: {s.total_params / 1e9:.2f}B parameters ({s.layers} layers, d={s.hidden}, "
             f"{s.heads} heads), {s.seq_len} positions, {job.global_batch} clips x "
             f"{s.targets} targets per step, {job.precision}",
             f"cluster: {c.gpus} GPUs of {c.gpu_mem_gib:g} GiB ({c.node_gpus} per node, "
             f"{c.intra_bw:g}/{c.inter_bw:g} GB/s intra/inter, {c.peak_tflops:g} TFLOP/s x "
             f"{c.efficiency:g}); usable {c.gpu_mem_gib - c.reserve_gib:g} GiB, recommended "
             f"within {c.margin:.0%} of that",
             f"{len(plan.feasible)} of {len(plan.options)} layouts fit; memory in GiB per GPU "
             "(peak phase), fastest first:", HEADER]
    shown = plan.feasible[:top]
    if plan.recommended is not None and plan.recommended not in shown:
        shown.append(plan.recommended)
    lines += [option_row(o, job, "  <- recommended" if o is plan.recommended else "")
              for o in shown]
    for size, why in plan.skipped.items():
        lines.append(f"not tried: {size} ({why})")
    if plan.recommended is not None:
        r = plan.recommended
        temp = ", ".join(f"{k} {v / GiB:.2f}" for k, v in r.memory.temporary.items())
        lines += [f"recommended: {' '.join(r.layout.overrides())}",
                  f"  peak {r.memory.total / GiB:.2f} GiB in {r.memory.peak_phase}; "
                  f"temporary: {temp or 'none'}",
                  f"  step {r.time.total:.3f} s = compute {r.time.compute:.3f} + tensor "
                  f"{r.time.tensor_parallel:.3f} + data {r.time.data_parallel:.3f} + offload "
                  f"{r.time.offload:.3f}"
                  + (f" + pipeline bubble {r.time.pipeline_bubble:.3f} + p2p "
                     f"{r.time.pipeline_p2p:.3f}" if r.layout.pipeline > 1 else "")
                  + (f"; host memory {r.memory.host / GiB:.1f} GiB per GPU"
                     if r.memory.host else "")]
        if not r.within_margin:
            lines.append(f"  (no layout fits with the {c.margin:.0%} margin; this one fits "
                         "without it)")
    return "\n".join(lines)


def option_record(option: Option, job) -> dict:
    mem = option.memory
    return {"layout": option.layout.as_dict(), "overrides": option.layout.overrides(),
            "memory_bytes": {**mem.components(), "total": mem.total},
            "peak_phase": mem.peak_phase, "phases_bytes": mem.phases,
            "kv_cache_bytes_per_clip": mem.kv_cache, "host_bytes": mem.host,
            "step_seconds": option.time.as_dict(), "tokens_per_s": option.tokens_per_s(job),
            "fits": option.fits, "within_margin": option.within_margin}


def plan_record(plan: Plan) -> dict:
    job, s = plan.job, plan.job.shape
    return {
        "model": {"parameters": s.total_params, "layers": s.layers, "hidden": s.hidden,
                  "heads": s.heads, "sequence_length": s.seq_len, "targets": s.targets,
                  "precision": job.precision, "global_batch": job.global_batch,
                  "loss_chunk": job.loss_chunk, "zero": asdict(job.zero)},
        "cluster": asdict(plan.cluster),
        "tried": len(plan.options), "feasible": len(plan.feasible), "skipped": plan.skipped,
        "recommended": option_record(plan.recommended, job) if plan.recommended else None,
        "layouts": [option_record(o, job) for o in plan.feasible],
    }
