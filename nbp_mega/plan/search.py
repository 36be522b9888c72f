"""The search: every layout of a job on a cluster, its memory and step time, and the pick.

A layout is feasible when its peak memory fits a GPU (minus the reserve for the CUDA context);
the recommendation is the fastest feasible layout that also leaves `cluster.margin` of the
GPU free (ties: the one needing less memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nbp_mega.config_fields import ConfigError
from nbp_mega.plan.cost import StepTime, step_time
from nbp_mega.plan.layout import Cluster, GiB, Job, Layout
from nbp_mega.plan.memory import Memory, training_memory

MAX_MICRO_BATCH = 64


class PlanError(ConfigError):
    """Nothing to plan: bad cluster sizes, or no layout fits."""


@dataclass
class Option:
    layout: Layout
    memory: Memory
    time: StepTime
    fits: bool
    within_margin: bool

    def tokens_per_s(self, job: Job) -> float:
        return job.global_batch * job.shape.targets / self.time.total


@dataclass
class Plan:
    job: Job
    cluster: Cluster
    options: list[Option]  # every layout tried, fastest first
    recommended: Option | None
    skipped: dict[str, str] = field(default_factory=dict)  # size tried -> why not

    @property
    def feasible(self) -> list[Option]:
        return [o for o in self.options if o.fits]


def pipeline_sizes(job: Job, cluster: Cluster) -> list[int]:
    """Pipeline stages to try: the divisors of the GPU count up to the layer count (each
    stage needs a layer)."""
    return _divisors(cluster.gpus, job.shape.layers)


def _divisors(n: int, limit: int) -> list[int]:
    return [k for k in range(1, min(n, limit) + 1) if n % k == 0]


def layouts(job: Job, cluster: Cluster, skipped: dict[str, str]) -> list[Layout]:
    """Every (tensor, pipeline, data, ZeRO stage, offload, micro batch, checkpointing) that
    divides the cluster and the global batch; `skipped` collects sizes that do not."""
    out = []
    for tp in range(1, min(cluster.node_gpus, cluster.gpus) + 1):
        if cluster.gpus % tp:
            continue
        errors = job.shape.tp_errors(tp)
        if errors:
            skipped[f"tensor={tp}"] = "; ".join(errors)
            continue
        for pp in pipeline_sizes(job, cluster):
            if cluster.gpus % (tp * pp):
                continue
            dp = cluster.gpus // (tp * pp)
            key = f"tensor={tp}" + (f" pipeline={pp}" if pp > 1 else "")
            if job.global_batch % dp:
                skipped[key] = (f"data-parallel size {dp} does not divide "
                                f"train.global_batch={job.global_batch}")
                continue
            found = _variants(tp, pp, dp, job.global_batch // dp)
            if not found:
                skipped[key] = (f"{job.global_batch // dp} clips per data-parallel rank "
                                f"make fewer than {pp} micro-batches")
            out += found
    return out


def _variants(tp: int, pp: int, dp: int, per_rank: int) -> list[Layout]:
    """The layouts of one (tp, pp, dp): every ZeRO stage, offload, micro batch and
    checkpointing; with a pipeline only ZeRO 0-1 and at least pp micro-batches per step."""
    stages = (0, 1, 2, 3) if pp == 1 else (0, 1)
    return [Layout(tensor=tp, data=dp, pipeline=pp, zero_stage=stage, offload_optimizer=off,
                   micro_batch=micro, activation_checkpointing=ckpt)
            for stage in stages for off in ((False, True) if stage else (False,))
            for micro in _divisors(per_rank, MAX_MICRO_BATCH) if per_rank // micro >= pp
            for ckpt in (False, True)]


def evaluate(job: Job, layout: Layout, cluster: Cluster) -> Option:
    memory = training_memory(job, layout, device="cuda", step=2)
    usable = cluster.usable_bytes
    return Option(layout=layout, memory=memory, time=step_time(job, layout, cluster),
                  fits=memory.total <= usable,
                  within_margin=memory.total <= usable * (1 - cluster.margin))


def search(job: Job, cluster: Cluster) -> Plan:
    cluster.check()
    skipped: dict[str, str] = {}
    candidates = layouts(job, cluster, skipped)
    if not candidates:
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise PlanError(f"no parallel layout of {cluster.gpus} GPUs suits this model: {why}")
    options = sorted((evaluate(job, layout, cluster) for layout in candidates),
                     key=lambda o: (o.time.total, o.memory.total))
    safe = [o for o in options if o.within_margin] or [o for o in options if o.fits]
    return Plan(job=job, cluster=cluster, options=options,
                recommended=safe[0] if safe else None, skipped=skipped)


def nothing_fits_message(plan: Plan) -> str:
    """What was tried and the smallest need, for a plan without a feasible layout."""
    smallest = min(plan.options, key=lambda o: (o.memory.total, o.layout.micro_batch,
                                                o.layout.tensor))
    tps = sorted({o.layout.tensor for o in plan.options})
    micros = sorted({o.layout.micro_batch for o in plan.options})
    c = plan.cluster
    return (f"no layout fits {c.gpu_mem_gib:g} GiB per GPU ({c.gpu_mem_gib - c.reserve_gib:g} "
            f"GiB usable after the {c.reserve_gib:g} GiB reserve) on {c.gpus} GPUs: tried "
            f"{len(plan.options)} layouts (tensor {tps}, ZeRO 0-3, optimizer offload on/off, "
            f"micro batch {micros}, activation checkpointing on/off); the smallest needs "
            f"{smallest.memory.total / GiB:.1f} GiB per GPU: "
            f"{' '.join(smallest.layout.overrides())}. Use more GPUs, larger ones, or a "
            "smaller model / grid")
