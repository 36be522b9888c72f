"""A trained model for generation, from a run directory's checkpoint (TP=1 runs for now).

    model, cfg = load_trained_model("runs/tiny")            # checkpoints/latest
    model, cfg = load_trained_model("runs/tiny", "step_00000100")
"""

from __future__ import annotations

import os

import torch

from nbp_mega.config_fields import ConfigError


def load_trained_model(run_dir: str, checkpoint: str | None = None, *, dims,
                       device: torch.device | None = None):
    """(NBPTransformer in eval mode with the checkpoint's weights, the run's config)."""
    import yaml

    from nbp_mega.checkpoint import Checkpointer
    from nbp_mega.config import config_from_dict
    from nbp_mega.model import NBPTransformer
    from nbp_mega.parallel.deepspeed import full_state_dict
    from nbp_mega.parallel.layers import TensorParallel

    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{run_dir} has no config.yaml: expected a run directory "
                                "written by nbp_mega.train")
    with open(config_path) as f:
        cfg = config_from_dict(yaml.safe_load(f))
    if cfg.parallel.tensor != 1:
        raise ConfigError(f"{run_dir} was trained at parallel.tensor={cfg.parallel.tensor}: "
                          "loading tensor-parallel checkpoints for sampling is not built yet")
    ckpt = Checkpointer(run_dir, keep_last=1, rank=0)
    name = checkpoint or ckpt.latest()
    if name is None or not os.path.isdir(os.path.join(ckpt.dir, name)):
        raise FileNotFoundError(f"no checkpoint {name or 'latest'} in {ckpt.dir}")
    state = full_state_dict(ckpt.dir, name, zero_stage=cfg.parallel.zero_stage,
                            precision=cfg.train.precision)
    model = NBPTransformer(cfg.model, TensorParallel(dims, init_std=cfg.model.init_std))
    # torch.is_tensor: megatron layers keep a `_extra_state` entry (None) in the module state
    model.load_state_dict({k: v.float() if torch.is_tensor(v) else v for k, v in state.items()},
                          strict=True)
    return model.to(device or dims.device).eval(), cfg
