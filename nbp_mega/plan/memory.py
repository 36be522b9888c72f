"""The memory model: bytes per GPU of one training layout, by component and phase.

Legend: P parameters on one TP rank (all of them, ZeRO or not); Pd = ceil(P / dp) summed per
parameter (a ZeRO partition); b bytes of the model dtype (bf16 2, fp32 4); m micro batch;
S input length; Nt targets; d width; F MLP width; N heads; t tensor-parallel size; Vp head
rows; c positions of one loss chunk.

What DeepSpeed 0.19 allocates (runtime/zero/stage3.py, stage_1_and_2.py, bf16_optimizer.py),
each checked against tools/bench_memory.py's measurements:
  ZeRO-3  parameters b*Pd (+ small "persistent" parameters whole), gradient partitions b*Pd,
          fp32 master partitions 4*Pd (a clone in fp32 training too), Adam moments 8*Pd
          (made at the first step), one gradient bucket of reduce_bucket_size elements, the
          gathered parameters and their all-gather buffer (nbp_mega/plan/zero3.py); its step
          flattens one sub-group's gradients (b, and 4 more as fp32 under bf16).
  ZeRO-1/2  parameters b*P whole; fp32 master 4*Pd (a clone in fp32 too), Adam 8*Pd; whole
          gradients through the backward, copied into a bucket to be reduced to partitions.
  ZeRO-0  fp32: torch's AdamW on the whole model (4P params, 4P grads, 8P moments); bf16:
          DeepSpeed's BF16_Optimizer (bf16 params and gradients whole, fp32 master and
          moments partitioned over dp like ZeRO-1).
  offload_optimizer  master, moments (and ZeRO-3's gradient partitions) live on the host.
The peak is the largest of the phases (build, engine set-up, forward/backward, gradient
reduction, optimizer step), each the sum of what is alive then; in the backward, activations
are freed layer by layer as gradients appear. A CUDA run counts allocations
(torch.cuda.max_memory_allocated); a CPU run counts touched pages (the RSS), so an allocated
but partly written buffer (the gradient bucket) counts only what was written on
`device="cpu"`, and the CPU's own kernels (dropout, AdamW) keep other temporaries.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from dataclasses import dataclass, field, fields

from nbp_mega.plan.layout import Job, Layout
from nbp_mega.plan.zero3 import gathered_peak, step_visits

ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32
LOGIT_BYTES = 12  # per logit on top of the head's own output (b): the fp32 copy, the masked
# copy, the shifted copy megatron's vocab-parallel cross entropy keeps as its softmax; in the
# backward the softmax, its gradient and the masked gradient (fp32 each)


@dataclass
class Memory:
    """Bytes per GPU at the peak phase, by component (temporary: what lives only for a part
    of the step, by name); `phases` holds every phase's total."""

    parameters: int = 0
    gradients: int = 0
    master_weights: int = 0
    optimizer_states: int = 0
    activations: int = 0
    temporary: dict[str, int] = field(default_factory=dict)
    peak_phase: str = ""
    phases: dict[str, int] = field(default_factory=dict)
    kv_cache: int = 0  # generation: keys and values of the whole sequence, per clip
    host: int = 0  # offloaded states, on the CPU (per GPU)

    @property
    def total(self) -> int:
        return self.phases[self.peak_phase]

    def components(self) -> dict[str, int]:
        """The peak's parts: the resident components and each temporary buffer."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name in ("parameters", "gradients", "master_weights", "optimizer_states",
                             "activations")}
        return {**out, **{f"temporary.{k}": v for k, v in self.temporary.items()}}


def phase_total(parts: dict) -> int:
    """Bytes of one phase's parts (resident components + temporary buffers)."""
    return sum(v for k, v in parts.items() if k != "temporary") + sum(parts["temporary"].values())


def _phase(**parts) -> dict:
    temporary = {k: v for k, v in parts.pop("temporary", {}).items() if v}
    return {**parts, "temporary": temporary}


# -- the pieces -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Sizes:
    """Per-GPU element counts of one job under one layout."""

    P: int  # parameters on this TP rank
    Pd: int  # their ZeRO partitions (ceil per parameter)
    persistent: int  # ZeRO-3 parameters kept whole (<= the persistence threshold)
    largest: int  # the largest parameter (its gradient appears whole in the backward)
    sub_group: int  # ZeRO-3: elements of the largest optimizer sub-group partition
    group: int  # the largest AdamW parameter group (whole, this TP rank)
    group_part: int  # ... and its ZeRO partition


def _sizes(job: Job, layout: Layout) -> _Sizes:
    tp, dp = layout.tensor, layout.data
    params = job.shape.params
    local = [p.local_numel(tp) for p in params]
    groups = {True: 0, False: 0}
    parts = {True: 0, False: 0}
    for p, n in zip(params, local, strict=True):
        groups[p.no_decay] += n
        parts[p.no_decay] += math.ceil(n / dp)
    group_part = max(parts.values())
    return _Sizes(P=sum(local), Pd=sum(math.ceil(n / dp) for n in local),
                  persistent=sum(n for n in local if n <= job.zero.param_persistence_threshold),
                  largest=max(local), sub_group=min(group_part, job.zero.sub_group_size),
                  group=max(groups.values()), group_part=group_part)


def loss_positions(job: Job, layout: Layout) -> int:
    """c: positions whose logits exist at once (model.loss_chunk of the m * Nt targets)."""
    positions = layout.micro_batch * job.shape.targets
    return min(job.loss_chunk, positions) if job.loss_chunk else positions


def logits_bytes(job: Job, layout: Layout) -> int:
    """The head's output and the cross entropy's fp32 copies for one loss chunk."""
    return loss_positions(job, layout) * job.shape.head_rows // layout.tensor * (
        job.bytes + LOGIT_BYTES)


def dropout_mask_bytes(job: Job, device: str) -> int:
    """Bytes per element of a saved dropout mask: CUDA's fused dropout keeps a bool mask,
    the CPU's multiplies by a noise tensor of the input's dtype and keeps that."""
    return 1 if device == "cuda" else job.bytes


def layer_saved_per_token(job: Job, tp: int, device: str = "cuda") -> float:
    """Bytes one transformer layer saves for its backward, per token (nbp_mega.model;
    tests/test_plan.py counts what autograd saves)."""
    s, b = job.shape, job.bytes
    d, F, N = s.hidden, s.ffn, s.heads
    norm_stats = 8 if s.cfg.family == "gpt" else 4  # fp32 mean and rstd (RMSNorm: rstd)
    saved = b * d  # the layer input x (norm1's input)
    saved += 2 * b * d + 2 * norm_stats  # norm1 and norm2 outputs (qkv's, fc's input) ...
    saved += b * d  # ... and norm2's input x + attention
    saved += b * 3 * d / tp  # q, k, v (views of the qkv output) for the attention kernel
    saved += b * d / tp + 4 * N / tp  # attention output and its log-sum-exp (fp32)
    if s.cfg.family == "llama":
        saved += 2 * b * d  # torch's RMSNorm also keeps x * rstd, once per norm
    saved += b * d / tp  # the output transposed to [B, S, Nl*D]: proj's input
    if s.cfg.position == "rope_3d":
        saved += b * 2 * d / tp  # the rotated q and k (new tensors) instead of views
    saved += b * (4 if s.gated else 2) * F / tp  # gelu in/out; gated: gate, silu, fc, product
    if job.dropout:
        saved += 2 * d * dropout_mask_bytes(job, device)  # the two residual dropouts
    return saved


def _activation_parts(job: Job, layout: Layout, device: str) -> tuple[float, float, float]:
    """Bytes per micro batch: (kept per layer, kept outside the layers, the backward's own
    working set: a recomputed layer under checkpointing plus the gradients flowing)."""
    s, b, tp = job.shape, job.bytes, layout.tensor
    tokens = layout.micro_batch * s.seq_len
    per_layer = layer_saved_per_token(job, tp, device)
    kept = b * s.hidden if layout.activation_checkpointing else per_layer  # layer inputs
    ends = 0
    if s.has_embedding:  # ids, the embedding dropout's mask
        ends += 8 + (s.hidden * dropout_mask_bytes(job, device) if job.dropout else 0)
    if s.has_head:  # the final norm's input and output
        ends += (3 if s.gated else 2) * b * s.hidden + 8
    working = b * (2 * s.hidden + s.ffn / tp)  # gradients flowing through one layer
    if layout.activation_checkpointing:
        working += per_layer  # the layer being recomputed
    return tokens * kept, tokens * ends, tokens * working


def activation_bytes(job: Job, layout: Layout, device: str = "cuda") -> int:
    """What the forward keeps for the backward, plus the backward's working set."""
    kept, ends, working = _activation_parts(job, layout, device)
    return int(job.shape.layers * kept + ends + working)


def backward_peak(job: Job, layout: Layout, grad_bytes: int, grad_cap: int,
                  device: str = "cuda") -> dict:
    """The forward/backward's peak moment when gradients of `grad_bytes` per element appear
    as the backward goes (head first, then the layers, the embeddings last; at most
    `grad_cap` elements resident, e.g. a reused bucket) while the activations of the layers
    already done are freed: {"activations", "gradients", "loss_logits"} at that moment."""
    s, tp = job.shape, layout.tensor
    kept, ends, working = _activation_parts(job, layout, device)
    head = s.modules[-1][1][0].local_numel(tp) if s.has_head else 0
    per_layer = sum(p.local_numel(tp) for name, params in s.modules
                    if name.startswith(f"layers.{s.first_layer}.")
                    for p in params)
    logits = logits_bytes(job, layout) if s.has_head else 0
    # a pipeline stage holds the activations of other micro-batches in flight meanwhile
    others = (s.in_flight - 1) * (s.layers * kept + ends)
    # at the loss: every activation, the logits of a chunk, the head's gradient appearing
    moments = [(others + s.layers * kept + ends + working, min(head, grad_cap), logits)]
    for done in range(1, s.layers + 1):  # after `done` layers of the backward
        grads = min(head + done * per_layer, grad_cap)
        moments.append((others + (s.layers - done) * kept
                        + (working if done < s.layers else 0), grads, 0))
    act, grads, logits = max(moments, key=lambda m: m[0] + grad_bytes * m[1] + m[2])
    return {"activations": int(act), "gradients": int(grad_bytes * grads),
            "loss_logits": logits}


def gathered_bytes(job: Job, layout: Layout, *, steady: bool) -> int:
    """ZeRO-3: the parameters gathered whole at once (zero3.py's replay)."""
    chunks = math.ceil(layout.micro_batch * job.shape.targets / loss_positions(job, layout))
    return job.bytes * _gathered_elements(job, layout.tensor, layout.activation_checkpointing,
                                          chunks, steady)


def gather_buffer_bytes(job: Job, layout: Layout, s: _Sizes, *, steady: bool) -> int:
    """ZeRO-3's all-gather lands in one flat buffer per call, which each parameter then
    copies its whole value out of: a module's parameters (first step), or a prefetch of up
    to stage3_prefetch_bucket_size elements (steady state), twice for a moment."""
    if steady:
        return job.bytes * min(job.zero.prefetch_bucket_size, s.P - s.persistent)
    tp = layout.tensor
    return job.bytes * max(sum(p.local_numel(tp) for p in params
                               if p.local_numel(tp) > job.zero.param_persistence_threshold)
                           for _, params in job.shape.modules)


@functools.lru_cache(maxsize=256)
def _gathered_elements(job: Job, tp: int, checkpointing: bool, chunks: int,
                       steady: bool) -> int:
    z = job.zero
    persistent = {p.name for p in job.shape.params
                  if p.local_numel(tp) <= z.param_persistence_threshold}
    visits = step_visits(job.shape, tp, persistent=persistent, loss_chunks=chunks,
                         checkpointing=checkpointing)
    return gathered_peak(visits, steady=steady, prefetch_bucket=z.prefetch_bucket_size,
                         max_live=z.max_live_parameters, max_reuse_distance=z.max_reuse_distance)


def _bucket(job: Job, s: _Sizes, device: str, step: int) -> tuple[int, int]:
    """ZeRO-3's gradient bucket (reduce_bucket_size elements, allocated once, reused):
    (resident bytes, elements that fill in during this backward). A GPU allocates it whole;
    a CPU's RSS counts the part ever written (at most all gradients), written during the
    first backward and resident from then on."""
    elements = job.zero.reduce_bucket_size
    if device == "cuda":
        return job.bytes * elements, 0
    used = min(elements, s.P)
    return (0, used) if step == 1 else (job.bytes * used, 0)


def _adam_temporary(elements: int, device: str) -> int:
    """torch AdamW's temporary for the update of one tensor of `elements`: sqrt(v) divided
    in place on CUDA (foreach), sqrt(v) and its quotient both alive for a moment on the CPU."""
    return (4 if device == "cuda" else 8) * elements


def _forward_backward(job: Job, layout: Layout, device: str, grad_bytes: int, grad_cap: int,
                      **resident) -> dict:
    """The forward/backward phase: `resident` parts plus the backward's peak moment (growing
    gradients of grad_bytes per element, at most grad_cap elements)."""
    temporary = resident.pop("temporary", {})
    moment = backward_peak(job, layout, grad_bytes, grad_cap, device)
    gradients = resident.pop("gradients", 0) + moment["gradients"]
    return _phase(**resident, gradients=gradients, activations=moment["activations"],
                  temporary={**temporary, "loss_logits": moment["loss_logits"]})


# -- the stages -------------------------------------------------------------------------------
def _zero3_phases(job: Job, layout: Layout, s: _Sizes, device: str, step: int) -> dict:
    b, off = job.bytes, layout.offload_optimizer
    lp = b * (s.Pd + s.persistent)
    # fp32 training too: DeepSpeed clones the partition (its same-device test compares a
    # torch.device with a device name, which is never equal)
    master = 0 if off else 4 * s.Pd
    grads = 0 if off else b * s.Pd
    adam = 0 if off else ADAM_BYTES * s.Pd
    if job.zero_init:  # each parameter built whole (on the host), then partitioned
        largest_full = max(p.numel for p in job.shape.params)
        whole = 4 * (largest_full + s.largest) + b * s.largest if device == "cpu" else 0
        build = _phase(parameters=lp, temporary={"build_whole_parameter": whole})
    else:  # every rank builds the whole fp32 model, the engine casts and partitions it
        build = _whole_build(job, s, device)
    bucket, filling = _bucket(job, s, device, step)
    reduce_copy = b * min(job.zero.reduce_bucket_size, s.P) if job.zero.reduce_scatter else 0
    return {
        **(build if not job.zero_init else {"build": build}),
        # partitions move into one flat buffer through the host, each freed as it is copied
        "engine_defragment": _phase(parameters=lp, temporary={
            "flat_copy": b * s.largest if device == "cpu" else 0}),
        "engine_states": _phase(parameters=lp, master_weights=master,
                                temporary={"init_gradients": 0 if off else 4 * s.sub_group}),
        # the gradient hooks are set up on each parameter gathered whole (and its buffer)
        "engine_hooks": _phase(parameters=lp, master_weights=master, gradients=grads,
                               temporary={"gathered_parameters": 2 * b * s.largest}),
        "forward_backward": _forward_backward(
            job, layout, device, b, filling, parameters=lp, gradients=grads, master_weights=master,
            optimizer_states=adam if step > 1 else 0,
            temporary={"gathered_parameters": gathered_bytes(job, layout, steady=step > 1),
                       "gather_buffer": gather_buffer_bytes(job, layout, s, steady=step > 1),
                       "gradient_bucket": bucket, "reduce_scatter_copy": reduce_copy,
                       "parameter_gradient": b * s.largest}),
        "optimizer_step": _phase(
            parameters=lp, gradients=grads, master_weights=master, optimizer_states=adam,
            temporary={"gradient_bucket": bucket + b * filling,
                       "flat_gradients": 0 if off else (b + (4 if b != 4 else 0)) * s.sub_group,
                       "adam_update": 0 if off else _adam_temporary(s.sub_group, device)}),
    }


def _whole_build(job: Job, s: _Sizes, device: str) -> dict:
    """Phases of a model built whole on every rank (ZeRO 0-2, or parallel.zero_init=false):
    fp32 parameters (megatron initialises each from a full master weight on the host and
    copies its TP shard out), then the engine's cast to the model dtype, one at a time."""
    largest_full = max(p.numel for p in job.shape.params)
    phases = {"build": _phase(parameters=4 * s.P, temporary={
        "initialisation": 8 * largest_full if device == "cpu" else 0})}
    if job.bytes != 4:
        phases["engine_cast"] = _phase(parameters=4 * s.P,
                                       temporary={"cast": job.bytes * s.largest})
    return phases


def _zero12_phases(job: Job, layout: Layout, s: _Sizes, device: str, step: int) -> dict:
    """Whole gradients appear through the backward (ZeRO-2 reduces them when
    reduce_bucket_size elements have gathered: with the default 5e8 only at the end for
    smaller models); at the step each rank keeps its reduced partition and its own
    parameters' gradients (an upper bound: 1.5x the partition measured at 56M parameters),
    then flattens and updates one parameter group at a time."""
    b, off = job.bytes, layout.offload_optimizer
    master = 0 if off else 4 * s.Pd  # a clone of the partition, fp32 training too
    adam = 0 if off else ADAM_BYTES * s.Pd
    cap = s.P if layout.zero_stage == 1 else min(job.zero.reduce_bucket_size, s.P)
    fb = _forward_backward(job, layout, device, b, cap, parameters=b * s.P, master_weights=master,
                           optimizer_states=adam if step > 1 else 0)
    # the first step's peak comes at the first group, before the others have moments
    moments = adam if step > 1 else ADAM_BYTES * s.group_part
    return {
        **_whole_build(job, s, device),
        "engine_flatten": _phase(parameters=b * s.P, temporary={"flat_copy": b * s.group}),
        "engine_states": _phase(parameters=b * s.P, master_weights=master,
                                temporary={"init_gradients": 0 if off else 4 * s.Pd}),
        "forward_backward": fb,
        # the end of the backward: whole gradients copied into the bucket to be reduced
        "gradient_reduce": _phase(
            parameters=b * s.P, master_weights=master, optimizer_states=adam if step > 1 else 0,
            gradients=b * cap,
            temporary={"gradient_bucket": b * min(job.zero.reduce_bucket_size, s.P)}),
        "optimizer_step": _phase(
            parameters=b * s.P, gradients=2 * b * s.Pd, master_weights=master,
            optimizer_states=0 if off else moments,
            temporary={"flat_gradients": 0 if off else (b + (4 if b != 4 else 0)) * s.group_part,
                       "adam_update": 0 if off else _adam_temporary(s.group_part, device)}),
    }


def _zero0_phases(job: Job, layout: Layout, s: _Sizes, device: str, step: int) -> dict:
    b = job.bytes
    if b == 4:  # torch's AdamW on the whole model; DeepSpeed all-reduces flattened buckets
        master, adam, flat_grads = 0, ADAM_BYTES * s.P, 0
        # torch's foreach path on CUDA (a group at once), one parameter at a time on the CPU
        update = 4 * s.group if device == "cuda" else _adam_temporary(s.largest, device)
        reduce = b * min(job.zero.allgather_bucket_size, s.P)
    else:  # BF16_Optimizer: fp32 master and moments partitioned over dp, a flat gradient
        master, adam, flat_grads = 4 * s.Pd, ADAM_BYTES * s.Pd, b * s.P
        update, reduce = _adam_temporary(s.group_part, device), 0
    fb = _forward_backward(job, layout, device, b, s.P, parameters=b * s.P, gradients=flat_grads,
                           master_weights=master, optimizer_states=adam if step > 1 else 0)
    return {
        **_whole_build(job, s, device),
        "engine_states": _phase(parameters=b * s.P, master_weights=master,
                                gradients=flat_grads),
        "forward_backward": fb,
        "gradient_reduce": _phase(parameters=b * s.P, gradients=flat_grads + b * s.P,
                                  master_weights=master, optimizer_states=adam if step > 1 else 0,
                                  temporary={"flat_bucket": reduce}),
        "optimizer_step": _phase(
            parameters=b * s.P, gradients=flat_grads + (b * s.P if b == 4 else 0),
            master_weights=master, optimizer_states=adam,
            temporary={"fp32_gradients": 4 * s.Pd if b != 4 else 0, "adam_update": update}),
    }


def _forward_only_phases(job: Job, layout: Layout, s: _Sizes, device: str) -> dict:
    """An engine without optimizer (DeepSpeed's ZeRO-3 inference path, or whole parameters)
    and a forward under torch.no_grad: one layer's intermediates at a time."""
    b = job.bytes
    tokens = layout.micro_batch * job.shape.seq_len
    working = int(tokens * (layer_saved_per_token(job, layout.tensor, device)
                            + 2 * b * job.shape.hidden))
    if layout.zero_stage == 3:
        phases = _zero3_phases(job, layout, s, device, step=1)
        build = {k: v for k, v in phases.items() if k in ("build", "engine_cast")}
        forward = _phase(parameters=b * (s.Pd + s.persistent), activations=working, temporary={
            "gathered_parameters": gathered_bytes(job, layout, steady=False),
            "gather_buffer": gather_buffer_bytes(job, layout, s, steady=False),
            "loss_logits": logits_bytes(job, layout)})
        return {**build, "forward": forward}
    return {**_whole_build(job, s, device),
            "forward": _phase(parameters=b * s.P, activations=working,
                              temporary={"loss_logits": logits_bytes(job, layout)})}


def resident_between_steps(job: Job, layout: Layout) -> dict[str, int]:
    """What the engine holds from one step to the next, on the device: parameters, the
    gradient buffers it keeps (ZeRO-3's partitions, BF16_Optimizer's flat gradients; the
    others free their gradients after the step), fp32 master weights and Adam moments."""
    s, b, off = _sizes(job, layout), job.bytes, layout.offload_optimizer
    stage = layout.zero_stage
    params = b * (s.Pd + s.persistent) if stage == 3 else b * s.P
    if stage == 0:
        partitioned = b != 4  # BF16_Optimizer partitions master and moments over dp
        n = s.Pd if partitioned else s.P
        return {"parameters": params, "gradients": b * s.P if partitioned else 0,
                "master_weights": 4 * n if partitioned else 0,
                "optimizer_states": ADAM_BYTES * n}
    return {"parameters": params, "gradients": b * s.Pd if stage == 3 and not off else 0,
            "master_weights": 0 if off else 4 * s.Pd,
            "optimizer_states": 0 if off else ADAM_BYTES * s.Pd}


def kv_cache_bytes(job: Job, layout: Layout, clips: int = 1) -> int:
    """Generation's static KV cache: keys and values of every layer over the whole sequence."""
    s = job.shape
    return 2 * s.layers * clips * s.seq_len * s.hidden // layout.tensor * job.bytes


def pipeline_stage_jobs(job: Job, layout: Layout) -> list[Job]:
    """The job of each pipeline stage: its parameters, and the micro-batches whose
    activations it holds at once under 1F1B (stage s: pipeline - s, at most the
    accumulation steps)."""
    accumulation = layout.accumulation(job.global_batch)
    out = []
    for stage in job.shape.stages(layout.pipeline):
        stage = copy.copy(stage)  # the cached stage, with this layout's in-flight count
        stage.in_flight = min(layout.pipeline - stage.index, accumulation)
        out.append(dataclasses.replace(job, shape=stage))
    return out


def _pipeline_buffers(job: Job, layout: Layout) -> int:
    """DeepSpeed's pipeline buffers of one stage: the received input and the output of each
    micro-batch in flight ([m, S, d] each; stage 0 receives ids, the last sends nothing)."""
    s = job.shape
    one = layout.micro_batch * s.seq_len * s.hidden * job.bytes
    return s.in_flight * one * ((not s.has_embedding) + (not s.has_head))


def stage_phases(job: Job, layout: Layout, *, device: str = "cuda", step: int = 2
                 ) -> list[dict[str, dict]]:
    """memory_phases of each pipeline stage (its parameters, its in-flight activations, its
    pipeline buffers in the forward/backward), stage 0 first."""
    if layout.zero_stage > 1:
        raise ValueError(f"pipeline={layout.pipeline} with ZeRO-{layout.zero_stage}: "
                         "DeepSpeed's pipeline engine trains with ZeRO 0 or 1")
    one = dataclasses.replace(layout, pipeline=1)
    out = []
    for stage_job in pipeline_stage_jobs(job, layout):
        phases = memory_phases(stage_job, one, device=device, step=step)
        phases["forward_backward"]["temporary"]["pipeline_buffers"] = \
            _pipeline_buffers(stage_job, layout)
        out.append(phases)
    return out


def memory_phases(job: Job, layout: Layout, *, device: str = "cuda", step: int = 2,
                  forward_only: bool = False) -> dict[str, dict]:
    """Every phase's parts: {phase: {component: bytes, "temporary": {name: bytes}}}.

    With pipeline > 1: those of the stage that needs the most (DeepSpeed's pipeline engine:
    ZeRO 0 or 1, parameters partitioned over dp within the stage), its pipeline buffers
    counted in the forward/backward."""
    if layout.pipeline > 1:
        if forward_only:
            raise ValueError(f"pipeline={layout.pipeline} forward-only: DeepSpeed's pipeline "
                             "engine trains (its eval_batch is not modelled)")
        options = stage_phases(job, layout, device=device, step=step)
        return max(options, key=lambda p: max(phase_total(v) for v in p.values()))
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: expected 'cuda' or 'cpu'")
    s = _sizes(job, layout)
    if forward_only:
        return _forward_only_phases(job, layout, s, device)
    stage = {0: _zero0_phases, 1: _zero12_phases, 2: _zero12_phases, 3: _zero3_phases}
    return stage[layout.zero_stage](job, layout, s, device, step)


def training_memory(job: Job, layout: Layout, *, device: str = "cuda", step: int = 2,
                    forward_only: bool = False) -> Memory:
    """The peak bytes per GPU of `layout` and what makes it up.

    step: which training step (1: the Adam moments appear in its optimizer step, a CPU's
    gradient bucket fills in its backward, ZeRO-3 records its trace; >= 2, the steady
    state: all exist from the start, ZeRO-3 prefetches and keeps reused parameters).
    forward_only: no optimizer, a forward without autograd (tools/bench_memory
    --forward-only). device: "cuda" counts allocations, "cpu" touched pages (see the legend).
    """
    phases = memory_phases(job, layout, device=device, step=step, forward_only=forward_only)
    totals = {name: phase_total(parts) for name, parts in phases.items()}
    peak = max(totals, key=totals.get)
    host = 0
    if layout.offload_optimizer and layout.zero_stage and not forward_only:
        jobs = pipeline_stage_jobs(job, layout) if layout.pipeline > 1 else [job]
        one = dataclasses.replace(layout, pipeline=1)
        host = (4 + ADAM_BYTES + (4 if layout.zero_stage == 3 else 0)) * max(
            _sizes(j, one).Pd for j in jobs)
    return Memory(**phases[peak], peak_phase=peak, phases=totals,
                  kv_cache=kv_cache_bytes(job, layout), host=host)
