"""What the planner knows of a model: its parameters (name, full shape, TP split) in the order
a forward pass uses them, and the sequence sizes.

Legend: d width; F MLP width; N heads; Vp padded head rows; Ve padded embedding rows;
S input length; Nt targets per clip; t tensor-parallel size.

Written from the config alone (no process group, no meta model) so planning a 14B model is
instant; tests/test_plan.py checks every name, shape and split against a real NBPTransformer
and the module order against the order its forward pass calls them in.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from functools import cached_property

from nbp_mega.model.config import ModelConfig
from nbp_mega.model.sequence import SequenceLayout


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]  # full (TP=1) shape
    split: int | None  # dimension split over tensor parallelism (None = replicated)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local_numel(self, tp: int) -> int:
        """Elements on one TP rank."""
        return self.numel if self.split is None else self.numel // tp

    @property
    def no_decay(self) -> bool:
        """In AdamW's no-decay group (nbp_mega.optim.build_optimizer): vectors and tables."""
        return len(self.shape) < 2 or "emb" in self.name.split(".")[0]


def _pad(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple


def _linear(name: str, out: int, inp: int, bias: bool, column: bool) -> list[Param]:
    """A megatron linear: column-parallel splits weight rows and bias, row-parallel splits
    weight columns and keeps the bias whole."""
    params = [Param(f"{name}.linear.weight", (out, inp), 0 if column else 1)]
    if bias:
        params.append(Param(f"{name}.linear.bias", (out,), 0 if column else None))
    return params


def _norm(name: str, d: int, family: str) -> list[Param]:
    params = [Param(f"{name}.weight", (d,), None)]
    return params + ([Param(f"{name}.bias", (d,), None)] if family == "gpt" else [])


class ModelShape:
    """Parameters and sizes of one (resolved) model config."""

    has_embedding = has_head = True  # a StageShape may hold neither
    first_layer = 0  # a StageShape's first layer
    in_flight = 1  # micro-batches whose activations are held at once (StageShape: 1F1B)

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg = cfg.resolved()
        self.layout = SequenceLayout(cfg)
        self.layers, self.hidden, self.heads = cfg.layers, cfg.hidden, cfg.heads
        self.ffn = cfg.ffn_hidden
        self.gated = cfg.family == "llama"
        self.head_rows = _pad(cfg.vocab_size, cfg.vocab_pad_multiple)  # Vp
        self.embed_rows = _pad(self.layout.embed_vocab, cfg.vocab_pad_multiple)  # Ve
        self.seq_len, self.targets = self.layout.seq_len, self.layout.num_targets

    @cached_property
    def modules(self) -> list[tuple[str, list[Param]]]:
        """(module, its own parameters) in the order one forward pass calls them."""
        cfg, d, F = self.cfg, self.hidden, self.ffn
        bias = cfg.family == "gpt"
        out = [("tok_emb", [Param("tok_emb.weight", (self.embed_rows, d), 0)])]
        if cfg.position == "learned_1d":
            out.append(("pos_emb", [Param("pos_emb.table", (cfg.max_positions, d), None)]))
        elif cfg.position == "learned_3d":
            T, H, W = cfg.grid
            rows = {"slots": max(self.layout.num_slots, 1), "t": T, "h": H, "w": W}
            out.append(("pos_emb", [Param(f"pos_emb.{k}", (n, d), None)
                                    for k, n in rows.items()]))
        for i in range(self.layers):
            p = f"layers.{i}"
            out += [(f"{p}.norm1", _norm(f"{p}.norm1", d, cfg.family)),
                    (f"{p}.attn.qkv", _linear(f"{p}.attn.qkv", 3 * d, d, bias, True)),
                    (f"{p}.attn.proj", _linear(f"{p}.attn.proj", d, d, bias, False)),
                    (f"{p}.norm2", _norm(f"{p}.norm2", d, cfg.family))]
            if self.gated:  # silu(gate(x)) * fc(x): gate runs first
                out.append((f"{p}.mlp.gate", _linear(f"{p}.mlp.gate", F, d, False, True)))
            out += [(f"{p}.mlp.fc", _linear(f"{p}.mlp.fc", F, d, bias, True)),
                    (f"{p}.mlp.proj", _linear(f"{p}.mlp.proj", d, F, bias, False))]
        out += [("norm", _norm("norm", d, cfg.family)),
                ("head", [Param("head.linear.weight", (self.head_rows, d), 0)])]
        return out

    @cached_property
    def params(self) -> list[Param]:
        return [p for _, params in self.modules for p in params]

    def numel(self, tp: int = 1) -> int:
        """Parameters on one TP rank."""
        return sum(p.local_numel(tp) for p in self.params)

    @property
    def total_params(self) -> int:
        return self.numel(1)

    @property
    def non_embedding_params(self) -> int:
        return sum(p.numel for p in self.params if p.name.startswith("layers."))

    @property
    def matmul_params(self) -> int:
        """The parameters that multiply activations: the layers' and the head's."""
        return self.non_embedding_params + self.head_rows * self.hidden

    def tp_errors(self, tp: int) -> list[str]:
        """Why tensor parallelism `tp` does not split this model (empty if it does): it must
        divide the heads, the MLP width and model.vocab_pad_multiple (NBPTransformer's own
        check)."""
        return [f"{key}={value} is not divisible by {tp}"
                for key, value in (("model.heads", self.heads), ("model.ffn_hidden", self.ffn),
                                   ("model.vocab_pad_multiple", self.cfg.vocab_pad_multiple))
                if value % tp]

    @functools.lru_cache(maxsize=32)  # noqa: B019 (shapes live as long as a plan)
    def stages(self, pipeline: int) -> list[StageShape]:
        """The pipeline stages nbp_mega trains with (nbp_mega.parallel.pipeline.stage_layers,
        balanced by parameters); [self as one stage] for pipeline=1."""
        if pipeline == 1:
            return [StageShape(self, 0, 1, 0, self.layers)]
        from nbp_mega.parallel.dims import ParallelConfig
        from nbp_mega.parallel.pipeline import stage_layers

        counts = stage_layers(self.cfg, ParallelConfig(pipeline=pipeline, zero_stage=1))
        starts = [sum(counts[:i]) for i in range(pipeline)]
        return [StageShape(self, i, pipeline, starts[i], starts[i] + n)
                for i, n in enumerate(counts)]


class StageShape(ModelShape):
    """One pipeline stage of a model: layers [first_layer, stop_layer), the embedding on
    stage 0, the final norm and head on the last. `in_flight`: micro-batches whose
    activations it holds at once under DeepSpeed's 1F1B schedule (pipeline - index, at most
    the accumulation steps; set by the memory model)."""

    def __init__(self, whole: ModelShape, index: int, count: int, first_layer: int,
                 stop_layer: int):
        super().__init__(whole.cfg)
        self.whole, self.index, self.count = whole, index, count
        self.first_layer, self.stop_layer = first_layer, stop_layer
        self.layers = stop_layer - first_layer
        self.has_embedding, self.has_head = index == 0, index == count - 1

    @cached_property
    def modules(self) -> list[tuple[str, list[Param]]]:
        own = {f"layers.{i}." for i in range(self.first_layer, self.stop_layer)}
        return [(name, params) for name, params in self.whole.modules
                if any(name.startswith(p) for p in own)
                or (self.has_embedding and name in ("tok_emb", "pos_emb"))
                or (self.has_head and name in ("norm", "head"))]

