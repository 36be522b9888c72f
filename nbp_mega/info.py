"""`python -m nbp_mega.info CONFIG [key=value ...]`: sizes and costs of a config, as JSON.

The model is built on the meta device (no memory, no weights), so the 3B preset is instant.
"""

from __future__ import annotations

import json
import sys

import torch

from nbp_mega.model.config import ModelConfig
from nbp_mega.model.sequence import SequenceLayout


def full_parameter_counts(model) -> dict[str, int]:
    """Counts of the whole model (TP shards counted once per TP rank)."""
    from nbp_mega.parallel.layers import is_tp_sharded
    from nbp_mega.parallel.tp_shards import param_shape

    counts = {"total": 0, "non_embedding": 0}
    for name, p in model.named_parameters():
        n = param_shape(p).numel() * (model.tp_size if is_tp_sharded(p) else 1)
        counts["total"] += n
        if name.startswith("layers."):
            counts["non_embedding"] += n
    return counts


def training_flops_per_token(cfg: ModelConfig, matmul_params: int) -> float:
    """Model FLOPs per target token of one training step (forward + backward = 3x forward).

    6 * matmul parameters (2 per multiply-add, x3), plus attention scores and values:
    4 * d * (visible keys) per layer forward, x3, averaged over the sequence.
    """
    layout = SequenceLayout(cfg)
    mean_keys = layout.visible_keys().double().mean().item()
    per_input = 6 * matmul_params + 12 * cfg.layers * cfg.hidden * mean_keys
    return per_input * layout.seq_len / layout.num_targets


def model_info(cfg: ModelConfig) -> dict:
    from nbp_mega.model.transformer import NBPTransformer
    from nbp_mega.parallel.dims import ParallelConfig, init_parallel
    from nbp_mega.parallel.layers import TensorParallel

    cfg = cfg.resolved()
    dims = init_parallel(ParallelConfig(tensor=1))
    with torch.device("meta"):
        model = NBPTransformer(cfg, TensorParallel(dims, init_std=cfg.init_std))
    counts = full_parameter_counts(model)
    matmul = counts["non_embedding"] + model.head.linear.weight.numel()
    layout = model.layout
    return {
        "parameters": counts["total"],
        "non_embedding_parameters": counts["non_embedding"],
        "training_flops_per_token": training_flops_per_token(cfg, matmul),
        "sequence_length": layout.seq_len,
        "prefix_length": layout.prefix_len,
        "block_length": layout.block_len,
        "num_blocks": layout.blocks.num_blocks,
        "targets_per_clip": layout.num_targets,
        "generation_steps_per_clip": layout.generation_steps,
    }


def main(argv: list[str] | None = None) -> None:
    from nbp_mega.config import load_config

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    cfg = load_config(argv[0], argv[1:])
    print(json.dumps(model_info(cfg.model), indent=2))


if __name__ == "__main__":
    main()
