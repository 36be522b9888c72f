"""Process groups: who is who in a (pipeline x data x tensor)-parallel job.

`init_parallel(cfg)` joins the job (torchrun, the DeepSpeed launcher and SLURM all hand us
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain `python` run becomes a
job of one), builds megatron-core's tensor- and data-parallel groups, and returns a
`ParallelDims`: the one object through which the rest of the code sees the groups. Only
nbp_mega/parallel/ imports megatron.core.parallel_state and deepspeed.

Rank layout (megatron's default "tp-cp-ep-dp-pp", which is also DeepSpeed's
PipeModelDataParallelTopology): consecutive ranks form a tensor-parallel group, so TP traffic
stays inside a node; then data-parallel replicas; pipeline stages vary slowest.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nbp_mega.config_fields import ConfigError, option

log = logging.getLogger("nbp_mega.parallel")


@dataclass
class ParallelConfig:
    tensor: int = option(1, "tensor-parallel size (megatron-core TP layers); divides heads",
                         min=1)
    pipeline: int = option(1, "pipeline-parallel stages (DeepSpeed's pipeline engine, 1F1B; "
                           "needs ZeRO <= 1)", min=1)
    pipeline_balance: str = option("parameters", "how layers are split into pipeline stages: "
                                   "parameters (equal memory; the embedding and the head count "
                                   "on the first and last stage) or compute (equal matmul "
                                   "work: the head counts, the embedding does not)",
                                   choices=["parameters", "compute"])
    pipeline_layers: list[int] = option([], "transformer layers of each pipeline stage, "
                                        "e.g. [5,6,6,5] (overrides pipeline_balance)")
    zero_stage: int = option(3, "DeepSpeed ZeRO stage, sharding over the data-parallel group",
                             choices=[0, 1, 2, 3])
    offload_optimizer: bool = option(False, "ZeRO: optimizer states and step on the CPU")
    offload_params: bool = option(False, "ZeRO-3: parameters live on the CPU between uses")
    zero_init: bool = option(True, "ZeRO-3: build the model already partitioned "
                             "(deepspeed.zero.Init), so no rank holds it whole; false builds "
                             "it whole on every rank first")
    backend: str = option("auto", "torch.distributed backend (auto: nccl with GPUs, else gloo)",
                          choices=["auto", "nccl", "gloo"])
    timeout_minutes: int = option(30, "collective timeout before a hung job fails", min=1)

    def validate(self) -> None:
        if self.pipeline > 1 and self.zero_stage > 1:
            raise ConfigError(
                f"parallel.pipeline={self.pipeline} with parallel.zero_stage={self.zero_stage}: "
                "DeepSpeed's pipeline engine supports only ZeRO stage 0 or 1; "
                "set parallel.zero_stage<=1 or parallel.pipeline=1")
        if self.pipeline_layers and len(self.pipeline_layers) != self.pipeline:
            raise ConfigError(f"parallel.pipeline_layers={self.pipeline_layers} has "
                              f"{len(self.pipeline_layers)} stages, parallel.pipeline="
                              f"{self.pipeline}: give one layer count per stage")
        if any(n < 1 for n in self.pipeline_layers):
            raise ConfigError(f"parallel.pipeline_layers={self.pipeline_layers}: every stage "
                              "needs at least one transformer layer")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("parallel.offload_params=true needs parallel.zero_stage=3, "
                              f"got {self.zero_stage}")


@dataclass
class ParallelDims:
    """Sizes, ranks and groups of this process; passed explicitly, never stashed globally."""

    world_size: int
    rank: int
    local_rank: int
    tp: int
    dp: int
    tp_rank: int
    dp_rank: int
    tp_group: object
    dp_group: object
    device: torch.device
    backend: str = "gloo"  # torch.distributed backend of the job
    pp: int = 1  # pipeline stages
    pp_rank: int = 0  # this rank's stage
    pp_group: object = None  # the ranks of this rank's pipeline (one per stage)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r}: expected an integer") from None


def init_parallel(cfg: ParallelConfig) -> ParallelDims:
    """Join the job described by the environment and build the TP/DP groups."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size % (cfg.tensor * cfg.pipeline):
        raise ConfigError(f"parallel.tensor={cfg.tensor} x parallel.pipeline={cfg.pipeline} "
                          f"must divide the number of processes ({world_size})")
    backend = choose_backend(cfg.backend)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        store = None
        if "MASTER_ADDR" not in os.environ and world_size == 1:  # a plain single-process run
            # an in-process store: no port to race other processes for
            store = dist.HashStore()
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        # DeepSpeed reads these from the environment even when we created the group.
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size),
                          LOCAL_RANK=str(local_rank))
        dist.init_process_group(backend, rank=rank, world_size=world_size, store=store,
                                timeout=datetime.timedelta(minutes=cfg.timeout_minutes))
    return _build_groups(cfg, device, local_rank, backend)


def choose_backend(asked: str) -> str:
    """nccl where torch sees a GPU, else gloo; nccl asked for without a usable GPU fails."""
    if torch.cuda.is_available():
        return "nccl" if asked == "auto" else asked
    if asked == "nccl":
        gpus = gpus_torch_cannot_use()
        raise ConfigError(f"parallel.backend=nccl, but torch {torch.__version__} (CUDA "
                          f"{torch.version.cuda}) sees no usable GPU"
                          + (f" although nvidia-smi lists {len(gpus)}: {_WHY_NO_GPU}"
                             if gpus else "; use parallel.backend=gloo to train on the CPU"))
    return "gloo"


_WHY_NO_GPU = ("is the driver older than this torch wheel's CUDA (compare `nvidia-smi`'s "
               "'CUDA Version' with torch.version.cuda), or are the GPUs hidden by "
               "CUDA_VISIBLE_DEVICES?")


def gpus_torch_cannot_use() -> list[str]:
    """The GPUs `nvidia-smi -L` lists while torch.cuda sees none (else [])."""
    smi = shutil.which("nvidia-smi")
    if torch.cuda.is_available() or smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.startswith("GPU ")]


def report_devices(dims: ParallelDims) -> None:
    """Log the device and backend chosen; shout when GPUs exist that torch cannot use (the
    job would otherwise train on the CPU without a word)."""
    log.info("rank %d: device %s, backend %s, world %d", dims.rank, dims.device,
             dims.backend, dims.world_size)
    if dims.device.type != "cpu" or dims.local_rank != 0:
        return
    gpus = gpus_torch_cannot_use()
    if gpus:
        bar = "!" * 78
        log.warning("\n%s\nTRAINING ON THE CPU: nvidia-smi lists %d GPU(s) (%s) but torch %s "
                    "(CUDA %s) cannot use them: %s\n%s", bar, len(gpus), "; ".join(gpus),
                    torch.__version__, torch.version.cuda, _WHY_NO_GPU, bar)


def _build_groups(cfg: ParallelConfig, device: torch.device, local_rank: int,
                  backend: str) -> ParallelDims:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=cfg.tensor,
                                     pipeline_model_parallel_size=cfg.pipeline,
                                     create_gloo_process_groups=False)
    elif (ps.get_tensor_model_parallel_world_size(),
          ps.get_pipeline_model_parallel_world_size()) != (cfg.tensor, cfg.pipeline):
        raise RuntimeError("megatron parallel state already initialised with tensor="
                           f"{ps.get_tensor_model_parallel_world_size()}, pipeline="
                           f"{ps.get_pipeline_model_parallel_world_size()}; asked for "
                           f"{cfg.tensor}, {cfg.pipeline}")
    return ParallelDims(
        world_size=dist.get_world_size(), rank=dist.get_rank(), local_rank=local_rank,
        tp=ps.get_tensor_model_parallel_world_size(), dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(), dp_group=ps.get_data_parallel_group(),
        device=device, backend=backend, pp=ps.get_pipeline_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_group=ps.get_pipeline_model_parallel_group())


def shutdown_parallel() -> None:
    """Leave the job (tests run several jobs in one process)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
