"""Where a training step's time goes: torch.profiler over a few steps, summed into categories.

Steps are marked with `record_function` ranges (`nbp.data`, `nbp.optimizer`); every profiled
operator's self time goes to the first category that claims it:
    pipeline       point-to-point sends and receives between pipeline stages (DeepSpeed's
                   pipeline engine): the transfers and the bubble, a stage waiting for its
                   neighbour while the pipeline fills and drains
    communication  torch.distributed collectives (gloo/NCCL, DeepSpeed ZeRO gathers/reductions)
    optimizer      anything else inside `nbp.optimizer` (the AdamW update)
    data           anything else inside `nbp.data` (waiting for the loader)
    attention      block-causal attention kernels (fused op, SDPA, flex)
    matmul         mm / addmm / bmm / linear kernels
    other          the rest (element-wise ops, norms, softmax-CE, copies, framework overhead)
Communication (pipeline, for sends and receives) also gets the time the step's main thread
spends outside any operator while a collective runs on a backend thread (or, for gloo's
sends and receives, while their async range on the main thread itself is open): gloo (and
DeepSpeed's async gathers) execute there, and the main thread waits for them in
`Work.wait()`, which the profiler records as no operator.
`other` absorbs the rest of the step time no operator accounts for (Python between ops), so
the categories add up to the profiled steps' wall time.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

CATEGORIES = ("attention", "matmul", "communication", "pipeline", "optimizer", "data", "other")
_P2P = ("c10d::send", "c10d::recv", "gloo:send", "gloo:recv", "nccl:send", "nccl:recv")
_COMM = ("gloo", "nccl", "c10d", "all_gather", "allgather", "reduce_scatter", "all_reduce",
         "allreduce", "broadcast", "record_param_comms")
_ATTENTION = ("block_causal_attention", "scaled_dot_product", "flash_attention",
              "flex_attention")
_MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")


def _claims(name: str, needles) -> bool:
    name = name.lower()
    return any(n in name for n in needles)


def _category(event) -> str | None:
    """The category of one operator event, from its name and its enclosing ranges."""
    if _claims(event.name, _P2P):
        return "pipeline"
    if _claims(event.name, _COMM):
        return "communication"
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == "nbp.optimizer":
            return "optimizer"
        if parent.name == "nbp.data":
            return "data"
        parent = parent.cpu_parent
    if _claims(event.name, _ATTENTION):
        return "attention"
    if event.name in _MATMUL:
        return "matmul"
    return None


def _union(intervals) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _overlap(xs, ys) -> float:
    """Total length of the intersection of two sorted, disjoint interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(xs) and j < len(ys):
        total += max(0.0, min(xs[i][1], ys[j][1]) - max(xs[i][0], ys[j][0]))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def comm_wait_seconds(events, p2p: bool = False) -> float:
    """Seconds the step's thread (the one with the most operator calls) is inside no operator
    while a collective (p2p: a send or receive) runs on another thread (see the module
    docstring)."""
    calls: dict[int, int] = {}
    for e in events:
        calls[e.thread] = calls.get(e.thread, 0) + 1
    if len(calls) < 2:
        return 0.0
    main = max(calls, key=calls.get)
    ops = _union((e.time_range.start, e.time_range.end) for e in events
                 if e.thread == main and not e.name.startswith("nbp.") and not e.is_async)
    # gloo's point-to-point waits are async ranges on the calling thread itself (the
    # blocking receive of a pipeline stage: no operator runs meanwhile)
    comm = _union((e.time_range.start, e.time_range.end) for e in events
                  if (e.thread != main or (p2p and e.is_async))
                  and _claims(e.name, _P2P if p2p else _COMM)
                  and (p2p or not _claims(e.name, _P2P)))
    if not ops or not comm:
        return 0.0
    idle = [(a[1], b[0]) for a, b in zip(ops, ops[1:], strict=False)]  # gaps between its ops
    return _overlap(idle, comm) / 1e6


def breakdown(prof, wall_seconds: float) -> dict:
    """{category: seconds} over the profiled steps, plus `fraction` of the wall time each."""
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    events = prof.events()
    for event in events:
        if event.name.startswith("nbp."):  # our ranges: their time is their children's
            continue
        category = _category(event)
        if category is not None:
            seconds[category] += event.self_cpu_time_total / 1e6
    seconds["communication"] += comm_wait_seconds(events)
    seconds["pipeline"] += comm_wait_seconds(events, p2p=True)
    seconds["other"] = max(wall_seconds - sum(seconds.values()), 0.0)
    total = sum(seconds.values()) or 1.0
    return {"seconds": seconds, "fraction": {k: v / total for k, v in seconds.items()},
            "wall_seconds": wall_seconds}


class StepProfiler:
    """Profiles steps [start, start + steps) of a loop (1-based step numbers) and writes
    `<out_dir>/profile_rank{rank}.json` (the breakdown) and a Chrome trace beside it."""

    def __init__(self, out_dir: str, *, start: int, steps: int, rank: int = 0):
        self.out_dir, self.start, self.steps, self.rank = out_dir, start, steps, rank
        self._prof, self._began, self.result = None, 0.0, None

    @contextlib.contextmanager
    def step(self, step: int):
        """Wrap step number `step` (1-based) of the loop."""
        if self.steps and step == self.start:
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            self._prof = profile(activities=activities)
            self._prof.__enter__()
            self._began = time.perf_counter()
        yield
        if self._prof is not None and step == self.start + self.steps - 1:
            self._finish()

    def _finish(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._began
        self._prof.__exit__(None, None, None)
        from nbp_mega.metrics import peak_memory_gb

        self.result = {"steps": self.steps, **breakdown(self._prof, wall),
                       "peak_memory_gb": peak_memory_gb(torch.device(
                           "cuda" if torch.cuda.is_available() else "cpu"))}
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"profile_rank{self.rank}.json"), "w") as f:
            json.dump(self.result, f, indent=1)
        self._prof.export_chrome_trace(os.path.join(self.out_dir,
                                                    f"trace_rank{self.rank}.json"))
        self._prof = None


__all__ = ["CATEGORIES", "StepProfiler", "breakdown", "record_function"]
