"""`python -m nbp_mega.train CONFIG [key.sub=value ...]`: train an NBP model.

Launch with torchrun, `deepspeed [--hostfile hosts] launch.sh CONFIG ...`, or plain python
(a job of one). Restarting the same command resumes from <run_dir>/checkpoints/latest.
This file only wires the pieces together; the loop is nbp_mega/trainer.py.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import torch

log = logging.getLogger("nbp_mega.train")


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    """CONFIG and overrides; drops the --local_rank the DeepSpeed launcher appends."""
    args = []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--local_rank"):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, "0")
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            args.append(arg)
    if not args or args[0].startswith("-"):
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    return args[0], args[1:]


def quiet_third_party_warnings() -> None:
    """Known, harmless warnings that would otherwise repeat on every rank and step."""
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(all_gather_into_tensor|"
                            r"reduce_scatter_tensor)` is deprecated", category=FutureWarning)


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def check_resume_compatible(state: dict, cfg, dims) -> bool:
    """Refuse, with the reason, to resume a checkpoint this job cannot load.

    Returns whether the checkpoint was written on another data-parallel, tensor-parallel or
    pipeline size (it then loads through DeepSpeed's universal format, resharded).
    """
    from nbp_mega.config import to_dict
    from nbp_mega.config_fields import ConfigError
    from nbp_mega.model.config import ModelConfig
    from nbp_mega.parallel.deepspeed import needs_universal_checkpoint

    layout = state.get("layout", {})
    saved_pp = layout.get("pp", 1)
    for key, then, now in (("tensor", layout.get("tp"), dims.tp), ("pipeline", saved_pp, dims.pp)):
        if layout and then != now and not needs_universal_checkpoint(cfg):
            raise ConfigError(
                f"the checkpoint in {cfg.run_dir} was written with parallel.{key}={then}, this "
                f"job has {now}: changing tensor or pipeline parallelism on resume goes "
                "through DeepSpeed's universal checkpoint, which reads ZeRO 1-3 (or bf16) "
                f"optimizer shards, not fp32 ZeRO-0's whole states; restart with parallel."
                f"{key}={then} (any data-parallel size works)")
    for key, now in (("zero_stage", cfg.parallel.zero_stage), ("precision", cfg.train.precision)):
        if key in layout and layout[key] != now:
            raise ConfigError(f"the checkpoint in {cfg.run_dir} was written with {key}="
                              f"{layout[key]!r}, this job has {now!r}: a resume keeps the "
                              "ZeRO stage and precision (the tensor- and data-parallel sizes "
                              "may change); resume with the checkpoint's setting, or start a "
                              "new run from its weights (train.init_from=<this run_dir>; the "
                              "optimizer state starts afresh)")
    saved, now = state["config"], to_dict(cfg)["model"]
    diff = [k for k in now
            if k not in ModelConfig.MEMORY_FIELDS and saved["model"].get(k) != now[k]]
    if diff:
        details = ", ".join(f"model.{k}: checkpoint {saved['model'].get(k)!r} vs {now[k]!r}"
                            for k in diff)
        raise ConfigError(f"run_dir {cfg.run_dir} holds a checkpoint of a different model "
                          f"({details}); use a new run_dir or the same model settings")
    return bool(layout) and (layout["dp"], layout["tp"], saved_pp) != (dims.dp, dims.tp, dims.pp)


def init_weights(model, cfg, dims) -> None:
    """Load train.init_from's weights into `model` (this rank's TP shard), checking that they
    are of this model config.

    One full tensor at a time, read from the memory-mapped source (any run, checkpoint or
    state-dict file) and cut to this rank's TP shard: the source model is never built, so a
    model built partitioned (ZeRO-3) is never whole on any rank; there each parameter is
    gathered, filled and re-partitioned in turn.
    """
    from nbp_mega.config_fields import ConfigError
    from nbp_mega.export.weights import open_checkpoint
    from nbp_mega.model.config import ModelConfig
    from nbp_mega.parallel.tp_shards import TPPlan

    saved, source = open_checkpoint(cfg.train.init_from)
    diff = [k for k in vars(cfg.model)
            if k not in ModelConfig.NEW_RUN_FIELDS
            and getattr(saved.model, k) != getattr(cfg.model, k)]
    if diff:
        diff = ", ".join(f"model.{k}: {getattr(saved.model, k)!r} vs {getattr(cfg.model, k)!r}"
                         for k in diff)
        raise ConfigError(f"train.init_from={cfg.train.init_from} holds a model of another "
                          f"config ({diff}); expected the same model settings")
    plan = TPPlan.of(model, tp=dims.tp)
    targets = dict(model.named_parameters())
    partitioned = any(hasattr(p, "ds_id") for p in targets.values())
    targets.update((k, v) for k, v in model.state_dict(keep_vars=True).items()
                   if torch.is_tensor(v) and k not in targets)  # persistent buffers
    with torch.no_grad():
        for name, target in targets.items():
            shard = plan.split_tensor(name, source.read(name), dims.tp, dims.tp_rank)
            if partitioned and hasattr(target, "ds_id"):
                import deepspeed

                # modifier_rank: a rank of the parameter's data-parallel group, which
                # broadcasts the filled parameter before it is partitioned again
                with deepspeed.zero.GatheredParameters([target], modifier_rank=0):
                    target.data.copy_(shard)
            else:
                target.data.copy_(shard)
    log.info("initialised the weights from %s", cfg.train.init_from)


def main(argv: list[str] | None = None) -> None:
    import json

    quiet_third_party_warnings()  # before megatron and deepspeed are imported

    from nbp_mega.checkpoint import Checkpointer
    from nbp_mega.cluster.hosts import check_shared_run_dir
    from nbp_mega.config import dump_config, load_config
    from nbp_mega.data.loader import TextSpec, build_loaders
    from nbp_mega.info import training_flops_per_token
    from nbp_mega.metrics import MetricsLogger
    from nbp_mega.model import NBPTransformer
    from nbp_mega.optim import build_optimizer, build_scheduler
    from nbp_mega.parallel.deepspeed import (
        build_engine,
        convert_to_universal,
        declare_tp_layout,
        needs_universal_checkpoint,
        partitioned_build,
    )
    from nbp_mega.parallel.dims import init_parallel, report_devices, shutdown_parallel
    from nbp_mega.parallel.layers import TensorParallel
    from nbp_mega.parallel.pipeline import check_pipeline, stage_of
    from nbp_mega.peak_flops import peak_tflops
    from nbp_mega.plan.shapes import ModelShape
    from nbp_mega.trainer import Trainer

    config_path, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(config_path, overrides)
    dims = init_parallel(cfg.parallel)
    setup_logging(dims.rank)
    check_pipeline(cfg, dims.dp)
    check_shared_run_dir(cfg.run_dir, dims)  # every host sees the same run_dir
    check_evaluation_config(cfg)  # log.eval_config: a bad one fails here, not after the build
    report_devices(dims)
    checkpointer = Checkpointer(cfg.run_dir, keep_last=cfg.train.keep_last, rank=dims.rank)
    resume, saved_streams, universal = checkpointer.latest(), 0, False
    if resume:
        with open(os.path.join(checkpointer.dir, resume, "trainer_state.json")) as f:
            saved = json.load(f)
        universal = check_resume_compatible(saved, cfg, dims) and needs_universal_checkpoint(cfg)
        saved_streams = saved["data"].get("num_streams", 0)
    if dims.is_main:
        dump_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    # Bad shards fail here, before the expensive set-up.
    loader, val_index = build_loaders(cfg.data, seed=cfg.seed, global_batch=cfg.train.global_batch,
                                      dp_rank=dims.dp_rank, dp_size=dims.dp,
                                      grid=tuple(cfg.model.grid),
                                      vocab_size=cfg.model.vocab_size,
                                      saved_streams=saved_streams,
                                      text=TextSpec.from_model(cfg.model))

    torch.manual_seed(cfg.seed)  # same on every rank: TP shards are cut from one full init
    stage = stage_of(cfg.model, cfg.parallel, dims.pp_rank) if dims.pp > 1 else None
    with partitioned_build(cfg, dims):  # ZeRO-3: partitioned over dp as it is built
        model = NBPTransformer(cfg.model, TensorParallel(dims, init_std=cfg.model.init_std),
                               stage)
    if cfg.train.init_from and not resume:
        init_weights(model, cfg, dims)
    model = model.to(dims.device)
    checkpointer.client_state = declare_tp_layout(model, dims)  # resumable on another layout
    shape = ModelShape(cfg.model)  # the whole model's, whichever part this rank holds
    torch.manual_seed(cfg.seed + 1 + dims.dp_rank)  # dropout differs across data-parallel ranks
    optimizer = build_optimizer(model, cfg.optim, cpu_offload=cfg.parallel.offload_optimizer)
    engine = build_engine(model, optimizer, build_scheduler(optimizer, cfg.optim,
                                                            cfg.train.steps), cfg, dims,
                          load_universal=universal)
    peak = peak_tflops(dims.device, cfg.train.precision, cfg.log.peak_tflops)
    trainer = Trainer(cfg, dims=dims, engine=engine, layout=model.layout, loader=loader,
                      val_index=val_index, checkpointer=checkpointer, metrics=None,
                      flops_per_token=training_flops_per_token(cfg.model, shape.matmul_params),
                      peak_tflops=peak)
    if resume:
        if universal:
            checkpointer.make_universal(resume, convert_to_universal)
        trainer.load_state_dict(checkpointer.load(engine, resume, universal=universal))
    log.info("model: %s parameters (%s non-embedding), %d tokens per clip, world %d = pp %d "
             "x dp %d x tp %d%s", f"{shape.total_params:,}", f"{shape.non_embedding_params:,}",
             model.layout.num_targets, dims.world_size, dims.pp, dims.dp, dims.tp,
             f"; stage {dims.pp_rank}: layers {stage.first_layer}-{stage.stop_layer - 1}"
             if stage else "")
    trainer.metrics = MetricsLogger(cfg.run_dir, cfg.log, enabled=dims.is_main,
                                    total_steps=cfg.train.steps, start_step=trainer.step)
    evaluation = maybe_start_evaluation(cfg, dims)
    try:
        trainer.train()
    finally:
        trainer.metrics.close()
    if evaluation is not None and trainer.step >= cfg.train.steps:
        # it ends after the last step's checkpoint; stopped earlier (train.stop_at), it ends
        # after a last pass once this process has
        log.info("waiting for the evaluation of the last checkpoints (%s)",
                 os.path.join(cfg.run_dir, "eval.log"))
        if evaluation.wait():
            log.warning("the evaluation exited with code %d: see %s", evaluation.returncode,
                        os.path.join(cfg.run_dir, "eval.log"))
    if dims.is_main:
        print(f"run directory: {os.path.abspath(cfg.run_dir)}\n"
              f"  metrics:     {trainer.metrics.path}\n"
              f"  tensorboard: tensorboard --logdir {trainer.metrics.tb_dir}\n"
              f"  checkpoints: {checkpointer.dir}", flush=True)
    shutdown_parallel()


# Variables that make a process part of this job: the evaluation is a job of its own.
JOB_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "CROSS_RANK",
                 "CROSS_SIZE", "LOCAL_SIZE")


def evaluation_overrides(cfg) -> list[str]:
    """What the evaluation beside the training sets over log.eval_config: this run, and its
    output folder <run_dir>/eval."""
    run_dir = os.path.abspath(cfg.run_dir)
    return [f"run={run_dir}", f"out={os.path.join(run_dir, 'eval')}"]


def evaluation_command(cfg) -> list[str]:
    """`python -m nbp_mega.eval` watching this run's checkpoints while this process lives."""
    return [sys.executable, "-m", "nbp_mega.eval", os.path.abspath(cfg.log.eval_config),
            *evaluation_overrides(cfg), "--watch", os.path.abspath(cfg.run_dir),
            "--poll", str(cfg.log.eval_poll), "--until-pid", str(os.getpid())]


def check_evaluation_config(cfg) -> None:
    """log.eval_config loads as the evaluation will load it (every rank: all fail alike)."""
    from nbp_mega.eval.config import load_eval_config

    if cfg.log.eval_config:
        load_eval_config(cfg.log.eval_config, evaluation_overrides(cfg))


def maybe_start_evaluation(cfg, dims):
    """log.eval_config: rank 0 starts the evaluation beside the training -> the process, or
    None (other ranks, or no evaluation asked for)."""
    import subprocess

    if not cfg.log.eval_config or not dims.is_main:
        return None
    command = evaluation_command(cfg)
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARIABLES}
    out = open(os.path.join(cfg.run_dir, "eval.log"), "a")  # noqa: SIM115 (the child's)
    log.info("evaluating each checkpoint beside the training: %s (log %s)", " ".join(command),
             out.name)
    return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # a launcher's signals stay with us


if __name__ == "__main__":
    main()
