"""Full (TP=1) weights of a training checkpoint, one tensor at a time, in export names.

    cfg, source = open_checkpoint("runs/x")                  # checkpoints/latest
    for name, tensor in source.tensors(export=True): ...     # merged, ZeRO-gathered, unpadded
    source = Weights.of_model(model)                         # a live TP=1 model instead

A checkpoint of any ZeRO stage and tensor-parallel size is read by
nbp_mega.parallel.zero_checkpoint (memory-mapped rank files, one tensor gathered at a time);
how TP shards merge comes from the model's own megatron layers, built at TP=1 on the meta
device (no memory). Export names drop megatron's `.linear` wrapper level
(`layers.0.attn.qkv.linear.weight` -> `layers.0.attn.qkv.weight`), and the padded vocabulary
rows (model.vocab_pad_multiple) of the token embedding and the head are cut off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from nbp_mega.parallel.tp_shards import TPPlan


def model_plan(model_cfg) -> tuple[TPPlan, object]:
    """(the TP=1 TPPlan, the SequenceLayout) of a model config, from a meta-device model."""
    from nbp_mega.model import NBPTransformer
    from nbp_mega.parallel.dims import ParallelDims
    from nbp_mega.parallel.layers import TensorParallel

    dims = ParallelDims(world_size=1, rank=0, local_rank=0, tp=1, dp=1, tp_rank=0, dp_rank=0,
                        tp_group=None, dp_group=None, device=torch.device("meta"))
    with torch.device("meta"):
        model = NBPTransformer(model_cfg, TensorParallel(dims, init_std=model_cfg.init_std))
    return TPPlan.of(model, tp=1), model.layout


def export_name(name: str) -> str:
    return name.replace(".linear.", ".")


@dataclass
class Weights:
    """A model's full tensors, read one at a time when iterated (`tensors()`)."""

    path: str  # where they come from (a checkpoint folder, or a description)
    read: Callable[[str], torch.Tensor]  # state-dict name -> full fp32 tensor
    plan: TPPlan
    layout: object  # nbp_mega.model.sequence.SequenceLayout (its cfg: the model config)
    ckpt: object = None  # nbp_mega.parallel.zero_checkpoint.TrainingCheckpoint, if one

    @classmethod
    def of_model(cls, model, path: str = "<in memory>") -> Weights:
        """The weights of a live model built at TP=1."""
        if model.tp_size != 1:
            raise ValueError(f"a model built at tensor-parallel size {model.tp_size}: expected "
                             "one built at TP=1 (or export its checkpoint)")
        state = model.state_dict()
        return cls(path, lambda name: state[name].detach().float(), TPPlan.of(model, tp=1),
                   model.layout)

    @property
    def names(self) -> list[str]:
        return list(self.plan.dims)

    def unpadded_rows(self, name: str) -> int | None:
        """Rows kept of a vocabulary-padded tensor (None: not one)."""
        return {"tok_emb.weight": self.layout.embed_vocab,
                "head.linear.weight": self.layout.cfg.vocab_size}.get(name)

    def tensors(self, export: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full fp32 tensor) in the model's order; export=True: export names, padded
        vocabulary rows dropped."""
        for name in self.plan.dims:
            tensor = self.read(name)
            if export:
                rows = self.unpadded_rows(name)
                yield export_name(name), tensor if rows is None else tensor[:rows].clone()
            else:
                yield name, tensor

    def export_shape(self, name: str) -> tuple[int, ...]:
        """The shape `name` is exported with (padded vocabulary rows dropped)."""
        shape, rows = self.plan.shapes[name], self.unpadded_rows(name)
        return shape if rows is None else (rows, *shape[1:])


def open_checkpoint(run_or_checkpoint: str, checkpoint: str | None = None):
    """(the run's Config, Weights) for a run directory, a checkpoint folder or a state-dict
    file (nbp_mega.export.state_dict); an incomplete checkpoint or one of another model config
    is refused before anything is read."""
    import os

    from nbp_mega.generate.load import resolve_checkpoint
    from nbp_mega.parallel.zero_checkpoint import TrainingCheckpoint

    if os.path.isfile(run_or_checkpoint):
        from nbp_mega.export.state_dict import read_state_dict

        if checkpoint is not None:
            raise ValueError(f"{run_or_checkpoint} is a state-dict file: expected no checkpoint "
                             f"name (got {checkpoint})")
        cfg, state = read_state_dict(run_or_checkpoint)
        plan, layout = model_plan(cfg.model)
        plan.check_keys(state, f"state-dict file {run_or_checkpoint}")
        return cfg, Weights(run_or_checkpoint, state.__getitem__, plan, layout)
    cfg, path = resolve_checkpoint(run_or_checkpoint, checkpoint)
    ckpt = TrainingCheckpoint(path)
    plan, layout = model_plan(cfg.model)
    plan.check_names(ckpt.rank(0).names, f"checkpoint {path}")
    return cfg, Weights(path, lambda name: ckpt.tensor(name, plan), plan, layout, ckpt)
