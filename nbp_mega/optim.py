"""AdamW with linear warmup and cosine decay."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from nbp_mega.config_fields import option
from nbp_mega.parallel.tp_shards import param_shape


@dataclass
class OptimConfig:
    lr: float = option(6e-4, "peak learning rate (paper: 6e-4 UCF, 1e-3 K600)", min=0.0)
    min_lr_ratio: float = option(0.1, "cosine decays to lr * min_lr_ratio", min=0.0, max=1.0)
    warmup_steps: int = option(100, "linear warmup steps from 0 to lr", min=0)
    weight_decay: float = option(0.01, "AdamW decay on matrices (not biases, norms, "
                                 "embeddings)", min=0.0)
    beta1: float = option(0.9, "AdamW beta1", min=0.0, max=1.0)
    beta2: float = option(0.95, "AdamW beta2 (paper code: 0.95)", min=0.0, max=1.0)
    eps: float = option(1e-8, "AdamW epsilon", min=0.0)
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)", min=0.0)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, cpu_offload: bool = False
                    ) -> torch.optim.Optimizer:
    """AdamW; matrices decay, vectors (biases, norms) and embedding tables do not.

    With ZeRO-Offload the step runs on the CPU, where DeepSpeed's vectorised CPU Adam (built
    on first use) is several times faster than torch's.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_table = "emb" in name.split(".")[0]
        ndim = len(param_shape(p))  # p itself is empty when built ZeRO-3 partitioned
        (no_decay if ndim < 2 or is_table else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, total_steps))
