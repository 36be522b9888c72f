"""Pipeline parallelism: the NBP model cut into stages, run by DeepSpeed's pipeline engine.

Legend: L transformer layers; pp stages; m micro batch; A micro-batches per step (gradient
accumulation); nb target blocks; Nt targets per clip; d width.

Stage s holds transformer layers [first_layer, stop_layer) (`stage_layers`: balanced by
parameters or by matmul work, or given), stage 0 also the embedding and positions, the last
stage also the final norm, the head and the loss. Each stage is an `NBPTransformer` built
with its `Stage`: it holds only its own parts, under their model-wide names, initialised
exactly as in the whole model. Inside a stage the tensor-parallel layers work as without
pipelining.

DeepSpeed's `PipelineModule` gets one "layer" per stage (this rank's model; the others are
stand-ins, never built here) and its engine runs the 1F1B schedule over A micro-batches:
activations [m, S, d] flow forward, their gradients back, over the pipeline group;
gradients are all-reduced over the data-parallel group and the optimizer (ZeRO 0 or 1)
steps once per batch. Its checkpoints keep DeepSpeed's pipeline layout:
layer_<stage>-model_<tp rank>-model_states.pt holds each stage's weights.

Why DeepSpeed's engine and not megatron-core's schedules: megatron-core 0.16's pipelined
schedules allocate on `device="cuda"` and synchronise CUDA (schedules.py, p2p_communication.py)
and cannot run on a CPU, where nbp_mega is built and tested; DeepSpeed's run on gloo, and it
already owns our ZeRO optimizer and checkpoints.
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch
from torch import nn

from nbp_mega.config_fields import ConfigError
from nbp_mega.model.config import ModelConfig
from nbp_mega.model.transformer import Stage
from nbp_mega.parallel.dims import ParallelConfig, ParallelDims

log = logging.getLogger("nbp_mega.parallel")


def part_weights(model: ModelConfig, balance: str) -> tuple[int, int, int]:
    """(embedding, one layer, head) weights: parameters, or matmul work per token (the
    layers' and the head's parameters; the embedding is a lookup)."""
    from nbp_mega.plan.shapes import ModelShape

    shape = ModelShape(model)
    sizes = {"embed": 0, "layer": 0, "head": 0}
    for name, params in shape.modules:
        part = ("layer" if name.startswith("layers.0.") else
                "head" if name in ("norm", "head") else
                "embed" if name in ("tok_emb", "pos_emb") else None)
        if part:
            sizes[part] += sum(p.numel for p in params)
    if balance == "compute":
        sizes["embed"] = 0
    return sizes["embed"], sizes["layer"], sizes["head"]


def stage_layers(model: ModelConfig, parallel: ParallelConfig) -> list[int]:
    """Transformer layers per stage: parallel.pipeline_layers, or the contiguous split that
    minimises the heaviest stage's weight (`part_weights`), every stage >= 1 layer."""
    model, pp = model.resolved(), parallel.pipeline
    if parallel.pipeline_layers:
        if sum(parallel.pipeline_layers) != model.layers:
            raise ConfigError(f"parallel.pipeline_layers={parallel.pipeline_layers} sums to "
                              f"{sum(parallel.pipeline_layers)} layers, the model has "
                              f"model.layers={model.layers}")
        return list(parallel.pipeline_layers)
    if model.layers < pp:
        raise ConfigError(f"model.layers={model.layers} cannot be split into parallel.pipeline="
                          f"{pp} stages (each needs at least one layer): use at most "
                          f"{model.layers} stages, or tensor parallelism (parallel.tensor) "
                          "with ZeRO-3 instead")
    embed, layer, head = part_weights(model, parallel.pipeline_balance)

    def load(stage: int, first: int, stop: int) -> int:
        return ((stop - first) * layer + (embed if stage == 0 else 0)
                + (head if stage == pp - 1 else 0))

    # best[s][n]: (heaviest stage, sum of squared stage loads, counts) placing the first n
    # layers on stages 0..s; ties on the heaviest go to the more even split
    L = model.layers
    best = [{n: (load(0, 0, n), load(0, 0, n) ** 2, [n]) for n in range(1, L - pp + 2)}]
    for s in range(1, pp):
        row = {}
        for n in range(s + 1, L - pp + s + 2):
            row[n] = min((max(worst, load(s, k, n)), squares + load(s, k, n) ** 2,
                          counts + [n - k])
                         for k, (worst, squares, counts) in best[-1].items() if k < n)
        best.append(row)
    return best[-1][L][2]


def stage_of(model: ModelConfig, parallel: ParallelConfig, index: int) -> Stage:
    counts = stage_layers(model, parallel)
    first = sum(counts[:index])
    return Stage(index, len(counts), first, first + counts[index])


def check_pipeline(cfg, dp: int) -> None:
    """Refuse, naming the alternatives, a pipeline job that cannot run."""
    from nbp_mega.parallel.deepspeed import batch_arithmetic

    pp = cfg.parallel.pipeline
    if pp == 1:
        return
    stage_layers(cfg.model, cfg.parallel)
    micro, accum = batch_arithmetic(cfg.train.global_batch, cfg.train.micro_batch, dp)
    if accum < pp:
        raise ConfigError(
            f"parallel.pipeline={pp} stages with {accum} micro-batch(es) per step (train."
            f"global_batch={cfg.train.global_batch} / (train.micro_batch={micro} x "
            f"data-parallel {dp})): the pipeline needs at least {pp} micro-batches to keep "
            f"every stage busy; lower train.micro_batch to <= "
            f"{max(1, cfg.train.global_batch // (dp * pp))}, raise train.global_batch to >= "
            f"{micro * dp * pp}, or use fewer stages")


class _OtherStage:
    """The PipelineModule entry of a stage this rank does not hold (never called here)."""

    def __init__(self, index: int):
        self.__name__ = f"NBPTransformer stage {index}"

    def __call__(self, *args):
        raise RuntimeError(f"{self.__name__} runs on another rank")


class StageLoss:
    """The pipeline's loss function, run on the last stage for each micro-batch: the mean of
    `model.loss` (chunked over positions, as without pipelining) for the engine to back
    propagate, and the per-block mean loss summed over the step's micro-batches, which
    DeepSpeed does not keep (it averages one scalar)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.block_sum, self.micro_batches = None, 0
        self.__name__ = "NBPTransformer.loss"

    def __call__(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        token_loss = self.model.loss(states, targets)  # [m, Nt]
        per_block = self.model.layout.loss_per_block(token_loss)  # [nb]
        self.block_sum = per_block if self.block_sum is None else self.block_sum + per_block
        self.micro_batches += 1
        return token_loss.mean()

    def take(self, num_blocks: int, device) -> tuple[torch.Tensor, int]:
        """(per-block loss [nb] summed over the micro-batches since the last take, their
        count)."""
        if self.block_sum is None:
            return self.nothing(num_blocks, device)
        out, count = self.block_sum, self.micro_batches
        self.block_sum, self.micro_batches = None, 0
        return out, count

    @staticmethod
    def nothing(num_blocks: int, device) -> tuple[torch.Tensor, int]:
        """What the stages without the loss contribute."""
        return torch.zeros(num_blocks, dtype=torch.float64, device=device), 0


def topology(dims: ParallelDims):
    """DeepSpeed's view of our ranks: pipe slowest, then data, then model (= tensor): the
    same order as megatron-core's groups (nbp_mega.parallel.dims)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)


def pipeline_module(model: nn.Module, dims: ParallelDims):
    """This rank's stage wrapped for DeepSpeed's pipeline engine (one entry per stage)."""
    import deepspeed
    from deepspeed.runtime.pipe.module import PipelineModule

    # PipelineModule builds its groups through deepspeed.comm before deepspeed.initialize:
    # let it adopt our process group
    deepspeed.init_distributed(dist_backend=dims.backend, auto_mpi_discovery=False)
    stage = model.stage
    layers = [model if s == stage.index else _OtherStage(s) for s in range(stage.count)]
    printed = io.StringIO()  # rank 0 prints the partition and seeds: to our log instead
    with contextlib.redirect_stdout(printed):
        module = PipelineModule(layers, topology=topology(dims), partition_method="uniform",
                                loss_fn=StageLoss(model) if stage.is_last else None,
                                activation_checkpoint_interval=0)  # the model checkpoints
    log.debug("DeepSpeed's PipelineModule: %s", printed.getvalue().strip())
    grid = module._grid
    if (grid.get_stage_id(), grid.get_data_parallel_rank()) != (dims.pp_rank, dims.dp_rank):
        raise RuntimeError(f"rank {dims.rank}: DeepSpeed's pipeline grid puts it at stage "
                           f"{grid.get_stage_id()}, data-parallel rank "
                           f"{grid.get_data_parallel_rank()}; megatron's groups at "
                           f"{dims.pp_rank}, {dims.dp_rank}")
    return module


def mark_optimizer_steps(engine) -> None:
    """Run the optimizer step of a pipeline engine inside an `nbp.optimizer` range, as the
    trainer runs `engine.step()` without pipelining: DeepSpeed steps inside `train_batch`,
    so the profiler's breakdown (nbp_mega.profiling) would otherwise count the update as
    matmul and other time. Wraps the step of this engine's optimizer only."""
    from torch.profiler import record_function

    optimizer = engine.optimizer
    step = optimizer.step

    def step_in_range(*args, **kwargs):
        with record_function("nbp.optimizer"):
            return step(*args, **kwargs)

    optimizer.step = step_in_range

