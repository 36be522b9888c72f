"""How many parameters ZeRO-3 holds gathered (whole) at once: a replay of DeepSpeed's fetch,
prefetch and release rules over the modules of one training step.

DeepSpeed 0.19 (runtime/zero/partitioned_param_coordinator.py) gathers a module's parameters
before it runs (forward, activation-checkpoint recompute, backward) and releases them after.
Each forward starts by resetting its trace: the first step records the order of modules, and
from the second on ("steady state") it prefetches up to stage3_prefetch_bucket_size elements
at every module call (bounded by stage3_max_live_parameters gathered in all), and at a
release keeps every parameter that is used again within stage3_max_reuse_distance elements
of the coming calls. With the defaults (5e7, 1e9, 1e9) prefetching runs ahead until about
1e9 elements are gathered: a model under that per TP rank is held whole from the forward
into the backward. Parameters of <= stage3_param_persistence_threshold elements stay whole
all the time (counted apart).
"""

from __future__ import annotations

import collections
import math

from nbp_mega.plan.shapes import ModelShape

Visit = list[tuple[str, int]]  # (parameter name, elements on this TP rank) of one module call


def step_visits(shape: ModelShape, tp: int, *, checkpointing: bool, loss_chunks: int,
                persistent: set[str]) -> list[Visit]:
    """The module calls of one forward + backward, each with its non-persistent parameters.

    Backward runs the modules in reverse; with activation checkpointing each layer is first
    recomputed (its forward calls again); a chunked loss (loss_chunks > 1) calls the head per
    chunk and recomputes it in the backward.
    """
    def visit(params) -> Visit:
        return [(p.name, p.local_numel(tp)) for p in params if p.name not in persistent]

    body = [(name, visit(params)) for name, params in shape.modules[:-1]]
    head = visit(shape.modules[-1][1])
    layer_calls = collections.defaultdict(list)  # layer index -> its forward calls
    for name, v in body:
        if name.startswith("layers."):
            layer_calls[name.split(".")[1]].append(v)
    forward = [v for _, v in body] + [head] * loss_chunks
    backward = [head, head] * loss_chunks if loss_chunks > 1 else [head]
    for name, v in reversed(body):
        layer = name.split(".")[1] if name.startswith("layers.") else None
        if checkpointing and layer in layer_calls:
            backward += layer_calls.pop(layer)  # recompute the layer before its backward
        backward.append(v)
    return [v for v in forward + backward if v]


def gathered_peak(visits: list[Visit], *, steady: bool, prefetch_bucket: int,
                  max_live: int, max_reuse_distance: int) -> int:
    """The most elements gathered at once over one step (first step or steady state)."""
    if not steady:  # fetched before a call, released after it: one module at a time
        return max((sum(n for _, n in v) for v in visits), default=0)
    queue = collections.deque((name, n, step) for step, v in enumerate(visits) for name, n in v)
    fetched_for = collections.defaultdict(lambda: -math.inf)  # latest use a fetch covered
    available: dict[str, int] = {}
    peak = 0
    for step, v in enumerate(visits):
        available.update(v)
        _pop_current(queue, fetched_for, v, step)
        _prefetch(queue, fetched_for, available, min(max_live - sum(available.values()),
                                                     prefetch_bucket))
        peak = max(peak, sum(available.values()))
        keep = _reused_soon(visits, step + 1, max_reuse_distance)
        for name, _ in v:
            if fetched_for[name] <= step + 1 and name not in keep:
                available.pop(name, None)
    return peak


def _pop_current(queue, fetched_for, visit: Visit, step: int) -> None:
    """Take this call's own parameters off the prefetch queue (DeepSpeed checks they come
    next, unless a prefetch already covered them)."""
    wanted = {name for name, _ in visit if fetched_for[name] < step}
    taken = set()
    while queue and len(taken) < len(wanted):
        name, _, used_at = queue.popleft()
        fetched_for[name] = used_at
        taken.add(name)


def _prefetch(queue, fetched_for, available: dict[str, int], budget: int) -> None:
    got = 0
    while queue and got < budget:
        name, n, used_at = queue.popleft()
        fetched_for[name] = max(fetched_for[name], used_at)
        if name not in available:
            available[name] = n
            got += n


def _reused_soon(visits: list[Visit], start: int, distance: int) -> set[str]:
    """Parameters of the calls from `start` on, until `distance` elements have been passed."""
    seen, traversed = set(), 0
    for v in visits[start:]:
        if traversed >= distance:
            break
        for name, n in v:
            seen.add(name)
            traversed += n
    return seen
