"""A trained model for generation, from a training checkpoint of any ZeRO stage and TP size.

    model, cfg = load_trained_model("runs/tiny", dims=dims)                  # checkpoints/latest
    model, cfg = load_trained_model("runs/tiny", "step_00000100", dims=dims)
    model, cfg = load_trained_model("runs/tiny/checkpoints/step_00000100", dims=dims)
    model, cfg = load_trained_model("tiny.pt", dims=dims)    # tools/convert_to_hf.py --state-dict

The model is built at this job's tensor-parallel size (dims.tp), whatever the run trained with:
each rank loads its own shard, cut from the TP-merged, ZeRO-gathered fp32 weights
(nbp_mega.parallel.zero_checkpoint).
"""

from __future__ import annotations

import json
import os

import torch


def resolve_checkpoint(run_dir: str, checkpoint: str | None = None):
    """(the run's config, the checkpoint folder) for a run directory or a checkpoint folder.

    run_dir: a run directory (config.yaml, checkpoints/; `checkpoint` names one of its
    checkpoints, default `latest`) or one checkpoint folder (its trainer_state.json holds the
    resolved config).
    """
    import yaml

    from nbp_mega.checkpoint import Checkpointer
    from nbp_mega.config import config_from_dict

    state_file = os.path.join(run_dir, "trainer_state.json")
    if os.path.exists(state_file):  # a checkpoint folder
        if checkpoint not in (None, os.path.basename(os.path.normpath(run_dir))):
            raise ValueError(f"{run_dir} is checkpoint {os.path.basename(run_dir)}, the "
                             f"checkpoint name given is {checkpoint}: expected one of the two")
        with open(state_file) as f:
            return config_from_dict(json.load(f)["config"]), run_dir
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{run_dir} has neither config.yaml nor trainer_state.json: "
                                "expected a run directory written by nbp_mega.train or one of "
                                "its checkpoint folders (checkpoints/step_*)")
    with open(config_path) as f:
        cfg = config_from_dict(yaml.safe_load(f))
    ckpt = Checkpointer(run_dir, keep_last=1, rank=0)
    name = checkpoint or ckpt.latest()
    if name is None or not os.path.isdir(os.path.join(ckpt.dir, name)):
        found = sorted(n for n in os.listdir(ckpt.dir)) if os.path.isdir(ckpt.dir) else []
        raise FileNotFoundError(f"no checkpoint {name or 'latest'} in {ckpt.dir} (it holds: "
                                f"{', '.join(found) or 'nothing'})")
    return cfg, os.path.join(ckpt.dir, name)


def load_trained_model(run_dir: str, checkpoint: str | None = None, *, dims,
                       device: torch.device | None = None):
    """(NBPTransformer at TP size dims.tp in eval mode with the checkpoint's weights, config).

    A missing or partial checkpoint (absent rank files, truncated files) raises an error
    naming the files and what a complete checkpoint of its layout holds.
    """
    from nbp_mega.model import NBPTransformer
    from nbp_mega.parallel.layers import TensorParallel
    from nbp_mega.parallel.tp_shards import TPPlan
    from nbp_mega.parallel.zero_checkpoint import TrainingCheckpoint

    if os.path.isfile(run_dir):  # a plain state-dict file (nbp_mega.export.state_dict)
        from nbp_mega.export.state_dict import read_state_dict

        if checkpoint is not None:
            raise ValueError(f"{run_dir} is a state-dict file, not a run: expected no "
                             f"checkpoint name (got {checkpoint})")
        cfg, full = read_state_dict(run_dir)
        model = NBPTransformer(cfg.model, TensorParallel(dims, init_std=cfg.model.init_std))
        extras = {k: v for k, v in model.state_dict().items() if not torch.is_tensor(v)}
        state = {**extras, **TPPlan.of(model).split(full, tp=dims.tp, rank=dims.tp_rank)}
    else:
        cfg, path = resolve_checkpoint(run_dir, checkpoint)
        ckpt = TrainingCheckpoint(path)  # refuses an incomplete checkpoint before model work
        model = NBPTransformer(cfg.model, TensorParallel(dims, init_std=cfg.model.init_std))
        state = ckpt.shard_state_dict(TPPlan.of(model), tp=dims.tp, rank=dims.tp_rank)
    model.load_state_dict(state, strict=True)
    return model.to(device or dims.device).eval(), cfg
