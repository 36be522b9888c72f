"""The DeepSpeed engine: its JSON generated from our config, TP groups handed over as an mpu.

ZeRO shards parameters, gradients and optimizer state over the data-parallel group only;
tensor-parallel shards stay whole per TP rank. DeepSpeed learns the groups from `_Mpu`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re

import torch
import torch.distributed as dist
from torch import nn

from nbp_mega.config_fields import ConfigError, deep_merge
from nbp_mega.parallel.dims import ParallelDims

log = logging.getLogger("nbp_mega.parallel")


class _Mpu:
    """The model-parallel-unit interface DeepSpeed expects (Megatron's names)."""

    def __init__(self, dims: ParallelDims):
        self.dims = dims

    def get_model_parallel_rank(self):
        return self.dims.tp_rank

    def get_model_parallel_world_size(self):
        return self.dims.tp

    def get_model_parallel_group(self):
        return self.dims.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self):
        return self.dims.dp_rank

    def get_data_parallel_world_size(self):
        return self.dims.dp

    def get_data_parallel_group(self):
        return self.dims.dp_group

    def get_pipeline_model_parallel_world_size(self):
        return self.dims.pp

    def get_pipeline_model_parallel_rank(self):
        return self.dims.pp_rank


def batch_arithmetic(global_batch: int, micro_batch: int, dp: int) -> tuple[int, int]:
    """(micro batch per rank, gradient-accumulation steps) for a global batch."""
    if global_batch % dp:
        raise ConfigError(f"train.global_batch={global_batch} is not divisible by the "
                          f"data-parallel size {dp}")
    micro = micro_batch or global_batch // dp
    if global_batch % (micro * dp):
        raise ConfigError(f"train.global_batch={global_batch} is not a multiple of "
                          f"train.micro_batch={micro} x data-parallel size {dp}")
    return micro, global_batch // (micro * dp)


def _on_gloo(dims: ParallelDims) -> bool:
    return dist.is_initialized() and dist.get_backend(dims.dp_group) == "gloo"


def deepspeed_config(cfg, dims: ParallelDims) -> dict:
    """The DeepSpeed JSON for root config `cfg`, with `cfg.deepspeed` merged on top."""
    micro, accum = batch_arithmetic(cfg.train.global_batch, cfg.train.micro_batch, dims.dp)
    zero = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.zero_stage == 3 and _on_gloo(dims):
        # DeepSpeed then averages each contiguous gradient bucket by one in-place all-reduce.
        # Its reduce-scatter path concatenates the bucket into a new buffer, and gloo's
        # reduce_scatter_tensor clones it again (tools/bench_gloo.py: 1.25 s vs 0.70 s for
        # 98.7M values on 2 ranks; bench_100m ZeRO-3/plain 0.74x -> 0.82x). NCCL keeps it.
        zero["reduce_scatter"] = False
    if cfg.parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": dims.device.type == "cuda"}
    if cfg.parallel.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": dims.device.type == "cuda"}
    ds = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # our torch AdamW runs on CPU and GPU
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    return deep_merge(ds, cfg.deepspeed)


def needs_universal_checkpoint(cfg) -> bool:
    """Whether a checkpoint must be converted to load on another data-parallel size.

    ZeRO 1-3 (and bf16, whose DeepSpeed optimizer also partitions) save per-rank optimizer
    shards; plain fp32 ZeRO-0 saves whole states that load on any dp.
    """
    return cfg.parallel.zero_stage > 0 or cfg.train.precision == "bf16"


def convert_to_universal(checkpoint_dir: str, out_dir: str) -> None:
    """DeepSpeed's universal checkpoint of `checkpoint_dir` (loadable on any dp) in out_dir.

    Runs DeepSpeed's converter in a fresh process: its worker pool forks, which is unsafe in
    a rank that holds NCCL/gloo threads and a CUDA context, and its memory is returned when it
    ends. Its progress bars go to this rank's stderr.
    """
    import shutil
    import tempfile

    source = tempfile.mkdtemp(prefix=".universal-source-", dir=os.path.dirname(out_dir))
    try:
        _run_converter(_without_module_weights(checkpoint_dir, source), out_dir)
    finally:
        shutil.rmtree(source, ignore_errors=True)
    _wrap_bare_universal_tensors(out_dir)
    _drop_stage_prefixes(out_dir)


def _without_module_weights(checkpoint_dir: str, view: str) -> str:
    """`view` as checkpoint_dir (links to its files), but the model-states files of ZeRO 0-2
    without their module weights, returned.

    Those modules hold megatron's `_extra_state: None` entries, on which ds_to_universal
    fails (it saves every module value as a tensor); it needs the module only for weights
    without optimizer fragments, and ours all have them (the fp32 masters are read from the
    optimizer files, as for pipeline checkpoints, whose modules are None). The checkpoint
    itself is never modified.
    """
    for name in os.listdir(checkpoint_dir):
        src = os.path.join(checkpoint_dir, name)
        if re.fullmatch(r"mp_rank_\d+_model_states\.pt", name):
            state = torch.load(src, map_location="cpu", mmap=True, weights_only=False)
            state["module"] = None
            torch.save(state, os.path.join(view, name))
        elif name != os.path.basename(view) and not name.startswith("universal"):
            os.symlink(src, os.path.join(view, name))
    return view


def _run_converter(checkpoint_dir: str, out_dir: str) -> None:
    import subprocess
    import sys

    extract = max(1, min(8, os.cpu_count() or 1))  # one optimizer shard in memory each
    merge = max(1, extract // 4)  # a whole parameter each: DeepSpeed advises far fewer
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", checkpoint_dir, "--output_folder", out_dir,
           "--num_extract_workers", str(extract), "--num_merge_workers", str(merge),
           "--inject_missing_state"]
    job = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
           "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in job}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU work; no GPU memory taken from the job
    log.info("universal conversion: %s (%d extract, %d merge workers)", " ".join(cmd),
             extract, merge)
    code = subprocess.run(cmd, env=env).returncode
    if code:
        raise RuntimeError(f"DeepSpeed's universal conversion of {checkpoint_dir} failed with "
                           f"exit code {code} (its output is above in rank 0's log)")


_STAGE_PREFIX = re.compile(r"^(\d+)\.(.+)$")


def _drop_stage_prefixes(out_dir: str) -> None:
    """A pipeline checkpoint names each parameter "<stage>.<model-wide name>" (DeepSpeed's
    PipelineModule holds the stage's model as its child "<stage>"); the universal copy keeps
    model-wide names only, so it loads on any number of stages (`_alias_stage_names`)."""
    zero = os.path.join(out_dir, "zero")
    for name in os.listdir(zero):
        found = _STAGE_PREFIX.match(name)
        if found and os.path.isdir(os.path.join(zero, name)):
            os.rename(os.path.join(zero, name), os.path.join(zero, found.group(2)))


def _alias_stage_names(engine, universal_dir: str) -> None:
    """Before a pipeline engine loads a universal checkpoint: the names it looks for
    ("<stage>.<name>") as links to the model-wide ones. Each rank links its own parameters
    (ranks of one stage race harmlessly: same link, same target)."""
    zero = os.path.join(universal_dir, "zero")
    for name, _ in engine.module.named_parameters():
        found = _STAGE_PREFIX.match(name)
        if not found:
            continue
        link = os.path.join(zero, name)
        if not os.path.isdir(os.path.join(zero, found.group(2))):
            raise RuntimeError(f"the universal checkpoint {universal_dir} has no parameter "
                               f"{found.group(2)} (this pipeline stage holds it)")
        with contextlib.suppress(FileExistsError):
            os.symlink(found.group(2), link)


def _wrap_bare_universal_tensors(out_dir: str) -> None:
    """From a TP=1 ZeRO-3 checkpoint ds_to_universal saves each state (zero/NAME/fp32.pt,
    exp_avg.pt, exp_avg_sq.pt) as a bare tensor, and its loader cuts a TP shard only out of
    the {"param": tensor} dicts it writes for TP > 1: a bare tensor would load whole into a
    shard of a TP > 1 job. Wrap them as the TP > 1 path writes them (same values)."""
    from deepspeed.checkpoint.constants import PARAM

    zero = os.path.join(out_dir, "zero")
    for name in os.listdir(zero):
        for state in ("fp32", "exp_avg", "exp_avg_sq"):
            file = os.path.join(zero, name, f"{state}.pt")
            if not os.path.exists(file):
                continue
            value = torch.load(file, weights_only=False)
            if torch.is_tensor(value):
                torch.save({PARAM: value}, file)


def partitioned_build(cfg, dims: ParallelDims):
    """The context to build the model in: with parallel.zero_stage=3, deepspeed.zero.Init
    over the data-parallel group (with our mpu), so each parameter is partitioned as soon as
    its module is built and no rank ever holds the whole model; otherwise (or with
    parallel.zero_init=false: each rank builds it whole, DeepSpeed partitions it later) nothing.

    Values are those of the unpartitioned build: every rank seeds alike and builds each
    parameter whole (megatron's CPU initialisation cuts the TP shard from a full master
    weight) before zero.Init keeps its 1/dp part. Afterwards a parameter's shapes are in
    `ds_shape` / `ds_numel` (`p.shape` is empty); read them through
    nbp_mega.parallel.tp_shards.param_shape.
    """
    if cfg.parallel.zero_stage != 3 or not cfg.parallel.zero_init:
        return contextlib.nullcontext()
    import deepspeed

    config = deepspeed_config(cfg, dims)
    # zero.Init checks the batch arithmetic against another world size than the engine's:
    # it only needs the ZeRO and precision sections, so leave it the per-rank numbers alone
    config.pop("train_batch_size", None)
    return deepspeed.zero.Init(data_parallel_group=dims.dp_group, mpu=_Mpu(dims),
                               config_dict_or_path=config,
                               remote_device="cpu" if cfg.parallel.offload_params else None)


def declare_tp_layout(model: nn.Module, dims: ParallelDims | None = None) -> dict:
    """How our tensors split over tensor parallelism, in DeepSpeed's universal-checkpoint terms.

    Returns the client state that goes into every checkpoint (DeepSpeed's ds_to_universal
    reads it to merge the TP shards): the TP-replicated parameters and those split along
    dim 1 (row-parallel weights); every other parameter is split along dim 0 (column-parallel
    weights and biases, the fused qkv rows - ordered [N, 3, D], so contiguous TP slices hold
    whole heads and a plain concatenation merges them - and the vocab-parallel embedding and
    head, whose padded row count does not depend on tp). The splits come from megatron's own
    partition attributes (nbp_mega.parallel.tp_shards.TPPlan), not from names.

    Also marks each parameter with the restore metadata (DS_AUTOTP_UC_META: partition_dim and
    full shape, or replicated) by which DeepSpeed's universal loaders cut this rank's TP shard
    out of a full tensor, so a universal checkpoint loads at any tensor-parallel size.

    Under pipeline parallelism (`dims.pp > 1`) each stage holds part of the model: the
    patterns of all stages are gathered, so every checkpoint file declares the whole model;
    each pattern also matches the name with DeepSpeed's "<stage>." prefix.
    """
    from deepspeed.checkpoint import constants as c

    from nbp_mega.parallel.collectives import all_gather_objects
    from nbp_mega.parallel.tp_shards import TPPlan

    plan = TPPlan.of(model)
    replicated, rows = [], []
    for name, p in model.named_parameters():
        dim = plan.dims[name]
        pattern = rf"^(?:\d+\.)?{re.escape(name)}$"
        if dim is None:
            replicated.append(pattern)
        elif dim == 1:
            rows.append(pattern)
        meta = ({"replicated": True} if dim is None else
                {"partition_dim": dim, "logical_shape": list(plan.shapes[name])})
        setattr(p, c.DS_AUTOTP_UC_META, {**meta, c.UNIVERSAL_CHECKPOINT_VERSION_KEY:
                                         c.UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    if dims is not None and dims.pp > 1:
        stages = all_gather_objects((replicated, rows), dims.pp_group)
        replicated = [p for r, _ in stages for p in r]
        rows = [p for _, w in stages for p in w]
    return {c.UNIVERSAL_CHECKPOINT_INFO: {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        c.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: rows}}


def load_universal_checkpoint(engine, path: str) -> str | None:
    """Load the universal checkpoint in `path`; returns the loaded path (None = failed).

    Two repairs after DeepSpeed's ZeRO-3 universal loader: it gives every parameter group the
    hyperparameters of group 0 (weight decay would reach biases and norms): put back each
    group's own; and it gives all groups one shared Adam `step` tensor, which torch's Adam
    increments in place once per group per step (wrong bias correction): give each its own.
    """
    _alias_stage_names(engine, path)
    if dist.is_initialized():
        dist.barrier()  # every stage's links are there
    mpu = engine.mpu  # ours, or the pipeline engine's grid (its TP group: the "slice" group)
    tp_group = (mpu.get_tensor_model_parallel_group()
                if hasattr(mpu, "get_tensor_model_parallel_group")
                else mpu.get_slice_parallel_group())
    with _deepspeed_sees_tp_group(tp_group):
        load_path, _ = engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path),
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    state_file = os.path.join(path, "zero", "optimizer_state.pt")
    if load_path is None or not os.path.exists(state_file):
        return load_path
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    saved = torch.load(state_file, weights_only=False)
    saved = saved.get("optimizer_state_dict", saved)["param_groups"]  # ZeRO-3 wraps it
    groups = inner.param_groups
    if len(saved) != len(groups):
        raise RuntimeError(f"{state_file} has {len(saved)} optimizer parameter groups, the "
                           f"optimizer {len(groups)}: cannot restore their hyperparameters")
    for group, kept in zip(groups, saved, strict=True):
        group.update({k: v for k, v in kept.items() if k != "params"})
    return load_path


@contextlib.contextmanager
def _deepspeed_sees_tp_group(group):
    """DeepSpeed's ZeRO-3 universal loader cuts a parameter's TP shard using the TP group of
    its own `deepspeed.utils.groups` module, which only DeepSpeed's AutoTP sets (not the mpu
    we pass): point it at our group for the load, then put back what was there."""
    from deepspeed.utils import groups

    saved = groups._TENSOR_MODEL_PARALLEL_GROUP
    if saved is None:
        groups._TENSOR_MODEL_PARALLEL_GROUP = group
    try:
        yield
    finally:
        groups._TENSOR_MODEL_PARALLEL_GROUP = saved


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg,
                 dims: ParallelDims, *, load_universal: bool = False):
    """Wrap model + optimizer in a DeepSpeed engine (ZeRO over the data-parallel group).

    load_universal: the engine will load a universal checkpoint (resuming on another dp).
    """
    import deepspeed

    ds_config = deepspeed_config(cfg, dims)
    if load_universal:
        ds_config = deep_merge(ds_config, {"checkpoint": {"load_universal": True}})
    mpu = _Mpu(dims)
    if dims.pp > 1:  # DeepSpeed's pipeline engine; its grid is the mpu
        from nbp_mega.parallel.pipeline import mark_optimizer_steps, pipeline_module

        model, mpu = pipeline_module(model, dims), None
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        mpu=mpu, dist_init_required=False)
    if dims.pp > 1:
        mark_optimizer_steps(engine)
    log.info("DeepSpeed engine: ZeRO stage %d, micro batch %d x %d accumulation x dp %d"
             "%s", cfg.parallel.zero_stage, ds_config["train_micro_batch_size_per_gpu"],
             ds_config["gradient_accumulation_steps"], dims.dp,
             f" x {dims.pp} pipeline stages" if dims.pp > 1 else "")
    return engine


def build_plain_engine(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict,
                       dims: ParallelDims, scheduler=None):
    """A DeepSpeed engine from a ready JSON dict (data parallel only, e.g. the tokenizer)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config,
                                           mpu=_Mpu(dims), dist_init_required=False)
    return engine

