"""The time model: one optimizer step = compute + communication (no overlap assumed).

Legend: G global batch (clips per step); Nt targets per clip; m micro batch; A accumulation
steps (G / (m * dp)); S input length; d width; P parameters on one TP rank; b bytes of the
model dtype; t, dp tensor- and data-parallel sizes.

compute   training FLOPs of the step (nbp_mega.info: 6 x matmul parameters + attention, per
          target token; one more forward under activation checkpointing) over all GPUs at
          peak x efficiency.
tensor    megatron's all-reduces of [m, S, d] activations inside a node: 2 per layer in the
          forward, 2 in the backward (2 more for a checkpointed recompute), 1 for the
          vocab-parallel embedding; ring all-reduce moves 2 (t-1)/t of the bytes.
data      ZeRO's collectives over the data-parallel group, inside a node when t x dp fits
          one (intra_bw), else across nodes (inter_bw, the slowest link of the ring):
          one collective moves (dp-1)/dp P b per GPU. ZeRO-0 all-reduces the gradients once a
          step (2 of them); ZeRO-1 reduce-scatters them once and all-gathers the updated
          parameters (also 2); ZeRO-2 reduce-scatters every micro step, all-gathers once;
          ZeRO-3 gathers the parameters for the forward and the backward (and the recompute)
          and reduce-scatters the gradients, every micro step.
offload   gradients to the host and parameters back over PCIe, and the host's Adam.
pipeline  (pp > 1, DeepSpeed's 1F1B) the slowest stage's compute and TP traffic (its share of
          the layers, plus the head's matmuls on the last stage) over A micro-batches, plus
          the bubble: (pp - 1) more micro-batch slots of it, while the pipeline fills and
          drains; each stage boundary sends one [m, S, d] activation forward and its gradient
          back per micro-batch (1/t of it per TP rank: DeepSpeed partitions it over the TP
          group), across nodes once a stage (t x dp GPUs) fills a node; the data-parallel
          traffic is the largest stage's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from nbp_mega.plan.layout import Cluster, Job, Layout


@dataclass(frozen=True)
class StepTime:
    compute: float  # seconds
    tensor_parallel: float
    data_parallel: float
    offload: float
    pipeline_bubble: float = 0.0  # stages idle while the pipeline fills and drains
    pipeline_p2p: float = 0.0  # activations and their gradients between stages

    @property
    def total(self) -> float:
        return (self.compute + self.tensor_parallel + self.data_parallel + self.offload
                + self.pipeline_bubble + self.pipeline_p2p)

    def as_dict(self) -> dict:
        return {"compute": self.compute, "tensor_parallel": self.tensor_parallel,
                "data_parallel": self.data_parallel, "offload": self.offload,
                "pipeline_bubble": self.pipeline_bubble, "pipeline_p2p": self.pipeline_p2p,
                "total": self.total}


def step_flops(job: Job, layout: Layout) -> float:
    """FLOPs of one optimizer step over the whole job (recompute included)."""
    from nbp_mega.info import training_flops_per_token

    shape = job.shape
    flops = training_flops_per_token(shape.cfg, shape.matmul_params) * shape.targets
    if layout.activation_checkpointing:
        flops *= 4 / 3  # forward (1/3 of forward + backward) once more
    return flops * job.global_batch


def data_parallel_bandwidth(layout: Layout, cluster: Cluster) -> float:
    """GB/s of the data-parallel ring: consecutive ranks form TP groups, so a DP group
    (stride t, inside one pipeline stage) stays in a node while t x dp GPUs fit in one."""
    inside = layout.tensor * layout.data <= cluster.node_gpus
    return cluster.intra_bw if inside else cluster.inter_bw


def _tensor_seconds(job: Job, layout: Layout, cluster: Cluster, layers: int | None = None
                    ) -> float:
    """megatron's TP all-reduces of one step over `layers` layers (default: all)."""
    t = layout.tensor
    if t == 1:
        return 0.0
    shape = job.shape
    per_layer = 4 + (2 if layout.activation_checkpointing else 0)
    calls = (shape.layers if layers is None else layers) * per_layer + 1
    size = layout.micro_batch * shape.seq_len * shape.hidden * job.bytes
    micro_steps = layout.accumulation(job.global_batch)
    return micro_steps * calls * 2 * (t - 1) / t * size / (cluster.intra_bw * 1e9)


def _data_bytes(job: Job, layout: Layout, params: int) -> float:
    """Bytes one GPU sends over the data-parallel ring in one step."""
    dp = layout.data
    if dp == 1:
        return 0.0
    share = (dp - 1) / dp * params * job.bytes  # one all-gather or reduce-scatter
    micro_steps = layout.accumulation(job.global_batch)
    if layout.zero_stage in (0, 1):  # reduce (or all-reduce) once; ZeRO-1 then all-gathers
        return 2 * share
    if layout.zero_stage == 2:
        return share * micro_steps + share
    gathers = 2 + (1 if layout.activation_checkpointing else 0)
    return (gathers + 1) * share * micro_steps


def _stage_work_share(job: Job, layout: Layout) -> tuple[float, int]:
    """(the slowest stage's share of the step's matmul work, its layers): layers weigh
    their parameters, the last stage's head its rows x d (the embedding is a lookup)."""
    stages = job.shape.stages(layout.pipeline)
    work = [s.non_embedding_params + (s.head_rows * s.hidden if s.has_head else 0)
            for s in stages]
    slowest = max(range(len(stages)), key=work.__getitem__)
    return work[slowest] / sum(work), stages[slowest].layers


def step_time(job: Job, layout: Layout, cluster: Cluster) -> StepTime:
    pp = layout.pipeline
    stages = job.shape.stages(pp)
    params = max(s.numel(layout.tensor) for s in stages)  # the largest stage's, per TP rank
    rate = cluster.peak_tflops * 1e12 * cluster.efficiency
    compute = step_flops(job, layout) / layout.gpus / rate
    tensor = _tensor_seconds(job, layout, cluster)
    bubble = p2p = 0.0
    if pp > 1:
        share, layers = _stage_work_share(job, layout)
        micro_steps = layout.accumulation(job.global_batch)
        compute = step_flops(job, layout) / (layout.tensor * layout.data) * share / rate
        tensor = _tensor_seconds(job, layout, cluster, layers)
        bubble = (compute + tensor) * (pp - 1) / micro_steps
        size = layout.micro_batch * job.shape.seq_len * job.shape.hidden * job.bytes
        crosses = layout.tensor * layout.data >= cluster.node_gpus
        bw = cluster.inter_bw if crosses else cluster.intra_bw
        p2p = micro_steps * 2 * size / layout.tensor / (bw * 1e9)
    data = _data_bytes(job, layout, params) / (data_parallel_bandwidth(layout, cluster) * 1e9)
    offload = 0.0
    if layout.offload_optimizer and layout.zero_stage:
        share = params / layout.data
        offload = share * (4 + job.bytes) / (cluster.pcie_bw * 1e9) + share / cluster.cpu_adam_rate
    return StepTime(compute=compute, tensor_parallel=tensor, data_parallel=data,
                    offload=offload, pipeline_bubble=bubble, pipeline_p2p=p2p)
