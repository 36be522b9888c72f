"""What a plan is about: the job (a config's model, precision and DeepSpeed settings), one
layout of it on a cluster (the choices the planner searches over), and the cluster.

Layout.pipeline is part of every layout: the memory and time functions take it (a pipeline's
memory is its largest stage's), and the search enumerates it (search.pipeline_sizes).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from nbp_mega.config_fields import ConfigError
from nbp_mega.plan.shapes import ModelShape

GiB = 2**30


@dataclass(frozen=True)
class Layout:
    """One way to run a job: parallel sizes and the memory settings that trade for speed."""

    tensor: int  # tensor-parallel size (inside a node)
    data: int  # data-parallel size (ZeRO shards over it)
    pipeline: int = 1  # pipeline stages (DeepSpeed's pipeline engine; ZeRO 0-1)
    zero_stage: int = 3  # DeepSpeed ZeRO stage 0-3
    offload_optimizer: bool = False  # master weights and Adam moments on the host
    micro_batch: int = 1  # clips per forward on one GPU
    activation_checkpointing: bool = True  # recompute each layer in the backward

    @property
    def gpus(self) -> int:
        return self.tensor * self.data * self.pipeline

    @classmethod
    def of_config(cls, cfg, world_size: int) -> Layout:
        """The layout a config runs with on `world_size` processes."""
        from nbp_mega.parallel.deepspeed import batch_arithmetic

        tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
        if world_size % (tp * pp):
            raise ConfigError(f"parallel.tensor={tp} x parallel.pipeline={pp} does not divide "
                              f"{world_size} processes")
        data = world_size // (tp * pp)
        micro, _ = batch_arithmetic(cfg.train.global_batch, cfg.train.micro_batch, data)
        return cls(tensor=tp, data=data, pipeline=pp, zero_stage=cfg.parallel.zero_stage,
                   offload_optimizer=cfg.parallel.offload_optimizer, micro_batch=micro,
                   activation_checkpointing=cfg.model.activation_checkpointing)

    def accumulation(self, global_batch: int) -> int:
        return global_batch // (self.micro_batch * self.data)

    def overrides(self) -> list[str]:
        """The config overrides that train with this layout."""
        return [f"parallel.tensor={self.tensor}", f"parallel.pipeline={self.pipeline}",
                f"parallel.zero_stage={self.zero_stage}",
                f"parallel.offload_optimizer={str(self.offload_optimizer).lower()}",
                f"train.micro_batch={self.micro_batch}",
                f"model.activation_checkpointing={str(self.activation_checkpointing).lower()}"]

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed zero_optimization values that size buffers (DeepSpeed 0.19's defaults;
    a config's `deepspeed.zero_optimization` keys override them)."""

    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    sub_group_size: int = 1_000_000_000
    reduce_scatter: bool = True

    ALIASES = {"stage3_prefetch_bucket_size": "prefetch_bucket_size",
               "stage3_param_persistence_threshold": "param_persistence_threshold",
               "stage3_max_live_parameters": "max_live_parameters",
               "stage3_max_reuse_distance": "max_reuse_distance"}

    @classmethod
    def of_config(cls, cfg, backend: str) -> ZeroSettings:
        """As nbp_mega.parallel.deepspeed.deepspeed_config sets them for `backend`: on gloo,
        ZeRO-3 reduces gradients by all-reduce (reduce_scatter=false); raw keys win."""
        values = {}
        if backend == "gloo" and cfg.parallel.zero_stage == 3:
            values["reduce_scatter"] = False
        names = {f.name for f in fields(cls)}
        for key, value in cfg.deepspeed.get("zero_optimization", {}).items():
            key = cls.ALIASES.get(key, key)
            if key in names:
                values[key] = type(getattr(cls, key))(value)
        return cls(**values)


@dataclass(frozen=True)
class Job:
    """A config's part of every plan: the model and how it computes."""

    shape: ModelShape
    precision: str  # "bf16" | "fp32"
    zero: ZeroSettings
    global_batch: int
    zero_init: bool = True  # ZeRO-3 builds the model partitioned (parallel.zero_init)
    dropout: bool = True  # dropout > 0: its masks are saved for the backward
    loss_chunk: int = 0  # model.loss_chunk (0 = all positions at once)

    @property
    def bytes(self) -> int:
        """Bytes of one parameter / activation element in the model dtype."""
        return 2 if self.precision == "bf16" else 4

    @classmethod
    def of_config(cls, cfg, backend: str = "nccl") -> Job:
        return cls(shape=ModelShape(cfg.model), precision=cfg.train.precision,
                   zero=ZeroSettings.of_config(cfg, backend), global_batch=cfg.train.global_batch,
                   zero_init=cfg.parallel.zero_init, dropout=cfg.model.dropout > 0,
                   loss_chunk=getattr(cfg.model, "loss_chunk", 0))


@dataclass(frozen=True)
class Cluster:
    """The machines: GPU count and memory, node size, link and compute rates."""

    gpus: int
    gpu_mem_gib: float  # memory of one GPU (GiB)
    node_gpus: int = 8  # GPUs per node: tensor parallelism stays inside one
    intra_bw: float = 150.0  # GB/s per GPU inside a node (NVLink), achieved bus bandwidth
    inter_bw: float = 25.0  # GB/s per GPU between nodes (InfiniBand / RoCE)
    peak_tflops: float = 312.0  # dense bf16 TFLOP/s of one GPU (A100: 312, H100 SXM: 989)
    efficiency: float = 0.45  # fraction of the peak the matmuls reach
    pcie_bw: float = 16.0  # GB/s host <-> GPU (optimizer offload)
    cpu_adam_rate: float = 1.0e9  # parameters/s the host's Adam updates for one GPU
    reserve_gib: float = 2.0  # CUDA context, NCCL buffers: outside max_memory_allocated
    margin: float = 0.10  # the recommendation leaves this fraction of memory free

    def check(self) -> None:
        for name in ("gpus", "gpu_mem_gib", "node_gpus", "intra_bw", "inter_bw", "peak_tflops",
                     "efficiency", "pcie_bw", "cpu_adam_rate"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)}: expected a positive number")
        if self.gpus > self.node_gpus and self.gpus % self.node_gpus:
            raise ConfigError(f"--gpus {self.gpus} is not a multiple of --node-gpus "
                              f"{self.node_gpus}: nodes are filled whole")
        if not 0 <= self.margin < 1 or self.reserve_gib < 0:
            raise ConfigError(f"margin={self.margin}, reserve={self.reserve_gib}: expected "
                              "0 <= margin < 1 and reserve >= 0")

    @property
    def usable_bytes(self) -> float:
        """What a layout may use and still count as fitting."""
        return (self.gpu_mem_gib - self.reserve_gib) * GiB
