"""DeepSpeed training checkpoints read by us: fp32 weights of any ZeRO stage and any TP size.

Legend: tp tensor-parallel size, t a TP rank; dp data-parallel size, d a DP rank.

    ckpt = TrainingCheckpoint("runs/x/checkpoints/step_00000100")
    full = ckpt.full_state_dict(TPPlan.of(model))           # TP-merged, ZeRO-gathered, fp32
    mine = ckpt.shard_state_dict(TPPlan.of(model), tp=2, rank=1)   # for TP rank 1 of 2

What DeepSpeed (0.19) writes in a checkpoint folder, for each TP rank t (`mp_rank_{t:02d}`):
  ZeRO-3    zero_pp_rank_{d}_mp_rank_{t}_model_states.pt    per d: metadata, `param_shapes`
                and the module with empty (size 0) parameters
            [bf16_]zero_pp_rank_{d}_mp_rank_{t}_optim_states.pt   per d: `fp32_flat_groups`,
                d's part of every parameter, ceil(numel / dp) values each, back to back in
                `param_shapes` order across the (sub)groups; the last rank's part zero-padded
  ZeRO-1/2  mp_rank_{t}_model_states.pt   metadata, `param_shapes`, the module (whole)
            [bf16_]zero_pp_rank_{d}_mp_rank_{t}_optim_states.pt   per d:
                `single_partition_of_fp32_groups`, d's contiguous 1/dp of each group's flat
                vector: the group's parameters back to back (+ `param_alignment_paddings`)
  ZeRO-0    mp_rank_{t}_model_states.pt   the module whole: the weights, when fp32;
                (bf16: fp32 master weights in bf16_zero_pp_rank_{d}_... as in ZeRO-1)
With pipeline parallelism (pp stages, ZeRO 0-1) every (stage s, TP rank t) pair is one
"model-parallel" rank m = s * tp + t in the file names above, its model-states file has no
module and names parameters "<s>.<model-wide name>", and the weights are in
layer_{s:02d}-model_{t:02d}-model_states.pt (model-wide names). A TP rank's view is the union
of its stages'.
The bf16_ prefix marks bf16 runs. `param_shapes` are the TP rank's own shard shapes: nothing in
the files says how a shard relates to the full tensor, so a TPPlan (from the model's layers)
merges them.

DeepSpeed's zero_to_fp32 reads TP=1 checkpoints only: it globs every `*_optim_states.pt` in
the folder and expects dp of them, so tp=2 x dp=2 fails with "Expected 2 of
'*_optim_states.pt' ... but found 4 files". Here each TP rank's files are read on their own,
one tensor at a time from memory-mapped files (peak memory: about one copy of the weights).
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass

import torch

from nbp_mega.parallel.tp_shards import TPPlan


class CheckpointError(RuntimeError):
    """A checkpoint folder that is incomplete, unreadable, or not the layout it claims."""


@dataclass(frozen=True)
class CheckpointLayout:
    """How a checkpoint was written: parallel sizes, ZeRO stage, precision."""

    tp: int
    dp: int
    zero_stage: int
    bf16: bool
    pp: int = 1

    def model_files(self, t: int, s: int = 0) -> list[str]:
        m = s * self.tp + t  # DeepSpeed's model-parallel rank of stage s, TP rank t
        if self.zero_stage == 3:
            return [f"zero_pp_rank_{d}_mp_rank_{m:02d}_model_states.pt" for d in range(self.dp)]
        return [f"mp_rank_{m:02d}_model_states.pt"]

    def layer_file(self, t: int, s: int) -> str | None:
        """The file of stage s's weights for TP rank t (None without pipelining)."""
        return f"layer_{s:02d}-model_{t:02d}-model_states.pt" if self.pp > 1 else None

    def optim_files(self, t: int, s: int = 0) -> list[str]:
        """Files holding the fp32 master weights of TP rank t, by DP rank ([]: the module's)."""
        if self.zero_stage == 0:  # in the model-states file (bf16: `optimizer.fp32_groups`)
            return []
        prefix, m = "bf16_" if self.bf16 else "", s * self.tp + t
        return [f"{prefix}zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt"
                for d in range(self.dp)]

    def files(self) -> list[str]:
        return [f for t in range(self.tp) for s in range(self.pp)
                for f in [*self.model_files(t, s), *self.optim_files(t, s),
                          *filter(None, [self.layer_file(t, s)])]]

    def describe(self) -> str:
        precision = "bf16" if self.bf16 else "fp32"
        stages = f" x pp={self.pp}" if self.pp > 1 else ""
        return f"ZeRO-{self.zero_stage} {precision}, tp={self.tp} x dp={self.dp}{stages}"


def read_layout(path: str) -> CheckpointLayout:
    """The layout recorded in `path`: trainer_state.json's (nbp_mega runs), else DeepSpeed's
    metadata in the first model-states file found."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint folder {path}")
    state_file = os.path.join(path, "trainer_state.json")
    if os.path.exists(state_file):
        with open(state_file) as f:
            layout = json.load(f).get("layout")
        if layout:
            return CheckpointLayout(tp=int(layout["tp"]), dp=int(layout["dp"]),
                                    zero_stage=int(layout["zero_stage"]),
                                    bf16=layout["precision"] == "bf16",
                                    pp=int(layout.get("pp", 1)))
    found = sorted(glob.glob(os.path.join(path, "*model_states.pt")))
    if not found:
        raise CheckpointError(f"{path} has no trainer_state.json and no *_model_states.pt: "
                              "not a DeepSpeed checkpoint folder")
    return _layout_of(_load(found[0]))


def _layout_of(meta: dict) -> CheckpointLayout:
    ds = meta.get("ds_config", {})
    pp = int((meta.get("checkpoint_parallel_dimensions") or {}).get("pp_degree", 1))
    return CheckpointLayout(tp=int(meta["mp_world_size"]) // pp, dp=int(meta["dp_world_size"]),
                            zero_stage=int(ds.get("zero_optimization", {}).get("stage", 0)),
                            bf16=bool(ds.get("bf16", {}).get("enabled", False)), pp=pp)


def _load(file: str) -> dict:
    """torch.load, memory-mapped; an unreadable file is named in the error."""
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as err:  # truncated zip, not a torch file, wrong pickle ...
        size = os.path.getsize(file)
        raise CheckpointError(f"{file} ({size:,} bytes) cannot be read: {err}. Truncated or "
                              "not written by torch.save; the checkpoint is incomplete") from err


class TrainingCheckpoint:
    """One checkpoint folder (e.g. runs/x/checkpoints/step_00000100), complete or refused."""

    def __init__(self, path: str):
        self.path = path
        self.layout = read_layout(path)
        missing = [f for f in self.layout.files() if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise CheckpointError(
                f"checkpoint {path} is incomplete: missing {', '.join(missing[:8])}"
                + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
                + f". A complete {self.layout.describe()} checkpoint has "
                f"{len(self.layout.files())} files: {', '.join(self.layout.files()[:8])}"
                + (" ..." if len(self.layout.files()) > 8 else ""))
        self._ranks: dict[int, _RankReader] = {}

    def rank(self, t: int) -> _RankReader:
        """TP rank t's tensors (files opened on first use)."""
        if not 0 <= t < self.layout.tp:
            raise ValueError(f"TP rank {t} outside the checkpoint's tp={self.layout.tp}")
        if t not in self._ranks:
            stages = [_RankReader(self.path, self.layout, t, s) for s in range(self.layout.pp)]
            self._ranks[t] = stages[0] if len(stages) == 1 else _StagesReader(stages)
        return self._ranks[t]

    def rank_state_dict(self, t: int) -> dict[str, object]:
        """TP rank t's state dict as that rank held it: fp32, gathered over ZeRO's dp ranks."""
        reader = self.rank(t)
        return {**reader.extras, **{n: reader.tensor(n) for n in reader.names}}

    def tensor(self, name: str, plan: TPPlan) -> torch.Tensor:
        """The full (TP-merged) fp32 tensor `name`."""
        return plan.merge_tensor(name, [self.rank(t).tensor(name)
                                        for t in range(self.layout.tp)])

    def full_state_dict(self, plan: TPPlan | None = None) -> dict[str, object]:
        """The whole model's fp32 state dict (TP=1 layout, padded vocabulary rows kept).

        `plan` (TPPlan.of(model)) says how TP shards merge and checks keys and shapes; a tp=1
        checkpoint reads without one, unchecked.
        """
        if plan is None:
            if self.layout.tp > 1:
                raise ValueError(f"{self.path} is a tp={self.layout.tp} checkpoint: merging its "
                                 "shards needs the model's TPPlan (TPPlan.of(model))")
            return self.rank_state_dict(0)
        self._check_keys(plan)
        return {**self.rank(0).extras, **{n: self.tensor(n, plan) for n in plan.dims}}

    def shard_state_dict(self, plan: TPPlan, tp: int, rank: int) -> dict[str, object]:
        """What TP rank `rank` of a model built at TP size `tp` loads (any checkpoint tp)."""
        self._check_keys(plan)
        if tp == self.layout.tp:  # the rank's own file already holds its shard
            state = self.rank_state_dict(rank)
            for name in plan.dims:
                if tuple(state[name].shape) != plan.shard_shape(name, tp):
                    raise CheckpointError(
                        f"{name} of TP rank {rank} in {self.path} has shape "
                        f"{tuple(state[name].shape)}; the model expects "
                        f"{plan.shard_shape(name, tp)} (a checkpoint of another model config?)")
            return state
        out = dict(self.rank(0).extras)
        for name in plan.dims:
            out[name] = plan.split_tensor(name, self.tensor(name, plan), tp, rank)
        return out

    def _check_keys(self, plan: TPPlan) -> None:
        plan.check_names(self.rank(0).names, f"checkpoint {self.path}")


class _RankReader:
    """One TP rank's files: each fp32 tensor gathered over the dp ranks when asked for."""

    def __init__(self, path: str, layout: CheckpointLayout, t: int, s: int = 0):
        model_files = [os.path.join(path, f) for f in layout.model_files(t, s)]
        model_file, meta = model_files[0], _load(model_files[0])
        self._check_meta(meta, model_file, layout)
        if layout.pp > 1:
            meta = _stage_meta(meta, os.path.join(path, layout.layer_file(t, s)), s)
        for other in model_files[1:]:  # ZeRO-3: small (metadata); all must read and agree
            if _load(other).get("param_shapes") != meta["param_shapes"]:
                raise CheckpointError(f"{other} lists other parameters than {model_file}: "
                                      "files of different checkpoints mixed in one folder?")
        self.module = meta["module"]
        buffers = meta.get("buffer_names") or []
        self._buffers = {k: self.module[k] for k in buffers}
        groups = meta["param_shapes"] or [  # None for ZeRO-0: the module holds them whole
            {k: v.shape for k, v in self.module.items()
             if torch.is_tensor(v) and k not in self._buffers}]
        self.shapes = {n: tuple(s) for group in groups for n, s in group.items()}
        self.optim = [self._optim_state(os.path.join(path, f), layout)
                      for f in layout.optim_files(t, s)]
        self.extras = {k: v for k, v in self.module.items() if not torch.is_tensor(v)}
        self._aliases = dict(meta.get("shared_params") or {})  # tied: alias -> source
        self.names = [*self.shapes, *self._aliases, *self._buffers]
        self._where = {}  # name -> (group, offset) in the fp32 partitions
        self._masters = {}  # name -> fp32 master copy (ZeRO-0 bf16)
        if layout.zero_stage == 3:
            self._index_zero3(model_file)
        elif self.optim:
            self._index_zero12(meta["param_shapes"], model_file)
        elif layout.bf16:
            self._masters = _name_fp32_masters(self.module, self.shapes, meta, model_file)

    @staticmethod
    def _check_meta(meta: dict, file: str, layout: CheckpointLayout) -> None:
        module = meta.get("module")  # None in a pipeline checkpoint: the layer files hold it
        if "param_shapes" not in meta or not (isinstance(module, dict) or
                                               (module is None and layout.pp > 1)):
            raise CheckpointError(f"{file} is not a DeepSpeed model-states file (no "
                                  "param_shapes / module)")
        found = _layout_of(meta)
        if (found.tp, found.dp, found.zero_stage, found.pp) != (layout.tp, layout.dp,
                                                                 layout.zero_stage, layout.pp):
            raise CheckpointError(f"{file} was written at {found.describe()}, but the "
                                  f"checkpoint's layout is {layout.describe()}: files of "
                                  "different runs mixed in one folder?")
        if meta.get("frozen_param_shapes"):
            raise CheckpointError(f"{file} has frozen parameters "
                                  f"({', '.join(meta['frozen_param_shapes'])}): not supported")

    @staticmethod
    def _optim_state(file: str, layout: CheckpointLayout) -> dict:
        state = _load(file).get("optimizer_state_dict", {})
        count = state.get("partition_count")
        count = max(count) if isinstance(count, list) else count
        if count is not None and count != layout.dp:
            raise CheckpointError(f"{file} is partitioned {count} ways, the checkpoint says "
                                  f"dp={layout.dp}")
        if not ("fp32_flat_groups" in state or "single_partition_of_fp32_groups" in state):
            raise CheckpointError(f"{file} holds no fp32 partitions (fp32_flat_groups or "
                                  "single_partition_of_fp32_groups): not a ZeRO optimizer file")
        return state

    def _index_zero3(self, file: str) -> None:
        """Every dp rank holds ceil(numel/dp) values of each parameter, back to back."""
        dp = len(self.optim)
        self._segments = [list(o["fp32_flat_groups"]) for o in self.optim]  # [d][group]
        offset = 0
        for name, shape in self.shapes.items():
            self._where[name] = (None, offset)
            offset += math.ceil(math.prod(shape) / dp)
        held = sum(s.numel() for s in self._segments[0])
        if offset != held:
            raise CheckpointError(f"the ZeRO-3 partitions of {file}'s TP rank hold {held} "
                                  f"values per dp rank, its parameters need {offset}")

    def _index_zero12(self, param_shapes: list[dict], file: str) -> None:
        """Each group's flat vector is cut into dp contiguous partitions, in dp-rank order."""
        paddings = self.optim[0].get("param_alignment_paddings")
        self._segments = [[o["single_partition_of_fp32_groups"][g] for o in self.optim]
                          for g in range(len(param_shapes))]  # [group][d]
        for g, shapes in enumerate(param_shapes):
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                self._where[name] = (g, offset)
                offset += math.prod(shape) + (paddings[g][i] if paddings else 0)
            held = sum(s.numel() for s in self._segments[g])
            if offset > held:
                raise CheckpointError(f"group {g} of the ZeRO partitions for {file} holds "
                                      f"{held} values, its parameters need {offset}")

    def tensor(self, name: str) -> torch.Tensor:
        if name in self._aliases:
            return self.tensor(self._aliases[name])
        if name in self._buffers:
            value = self._buffers[name]
            return value.float() if value.is_floating_point() else value.clone()
        shape = self.shapes[name]
        if name in self._masters:
            return self._masters[name].float().clone()
        if not self._where:  # plain fp32 ZeRO-0: the module holds the weights
            return self.module[name].float().clone()
        group, offset = self._where[name]
        numel = math.prod(shape)
        if group is not None:  # ZeRO-1/2
            return _span(self._segments[group], offset, numel).view(shape)
        part = math.ceil(numel / len(self._segments))  # ZeRO-3: a part per dp rank
        parts = [_span(segments, offset, part) for segments in self._segments]
        return torch.cat(parts)[:numel].view(shape)


class _StagesReader:
    """A TP rank of a pipeline checkpoint: its stages' readers as one (disjoint names)."""

    def __init__(self, stages: list[_RankReader]):
        self._owner = {}
        for reader in stages:
            for name in reader.names:
                self._owner.setdefault(name, reader)  # shared buffers: the first stage's
        self.names = list(self._owner)
        self.extras = {k: v for reader in stages for k, v in reader.extras.items()}

    def tensor(self, name: str) -> torch.Tensor:
        return self._owner[name].tensor(name)


def _stage_meta(meta: dict, layer_file: str, s: int) -> dict:
    """Stage s's model-states metadata with model-wide names and its weights (the layer
    file) as the module, as a checkpoint without pipelining has them."""
    if not os.path.exists(layer_file):
        raise CheckpointError(f"{layer_file} is missing: the weights of pipeline stage {s}")
    prefix = f"{s}."

    def strip(name: str) -> str:
        if not name.startswith(prefix):
            raise CheckpointError(f"{layer_file}: parameter {name!r} of stage {s} lacks the "
                                  f"stage's {prefix!r} prefix")
        return name[len(prefix):]

    meta = dict(meta)
    meta["module"] = _load(layer_file)
    meta["param_shapes"] = [{strip(n): v for n, v in group.items()}
                            for group in meta["param_shapes"] or []] or None
    meta["buffer_names"] = [strip(n) for n in meta.get("buffer_names") or []]
    meta["shared_params"] = {strip(k): strip(v)
                             for k, v in (meta.get("shared_params") or {}).items()}
    return meta


def _name_fp32_masters(module: dict, shapes: dict, meta: dict, file: str) -> dict:
    """Name the fp32 master weights of a ZeRO-0 bf16 run: DeepSpeed keeps them as unnamed
    per-group lists (`optimizer.fp32_groups`). Each group lists its parameters in module
    order (the optimizer's groups were built walking named_parameters), and each master
    rounds to its module weight exactly: the first unclaimed later parameter of that shape
    whose bf16 weight equals the rounded master is it."""
    groups = (meta.get("optimizer") or {}).get("fp32_groups")
    if not groups:
        raise CheckpointError(f"{file} is a ZeRO-0 bf16 checkpoint without the optimizer's "
                              "fp32 master weights (optimizer.fp32_groups)")
    order = list(shapes)
    masters: dict[str, torch.Tensor] = {}
    for g, tensors in enumerate(groups):
        last = -1
        for i, master in enumerate(tensors):
            found = next((j for j in range(last + 1, len(order)) if order[j] not in masters
                          and tuple(master.shape) == shapes[order[j]]
                          and torch.equal(master.to(module[order[j]].dtype),
                                          module[order[j]])), None)
            if found is None:
                raise CheckpointError(f"{file}: fp32 master {i} of group {g} "
                                      f"{tuple(master.shape)} matches no module weight")
            masters[order[found]], last = master, found
    if len(masters) != len(order):
        raise CheckpointError(f"{file}: no fp32 master weight for "
                              f"{', '.join(n for n in order if n not in masters)}")
    return masters


def _span(segments: list[torch.Tensor], start: int, length: int) -> torch.Tensor:
    """Values [start, start + length) of the concatenation of `segments` (fp32, a copy)."""
    pieces = []
    for seg in segments:
        n = seg.numel()
        if start >= n:
            start -= n
            continue
        take = min(n - start, length)
        pieces.append(seg[start:start + take])
        length, start = length - take, 0
        if not length:
            break
    if length:
        raise CheckpointError(f"fp32 partitions end {length} values short of a parameter")
    return torch.cat(pieces).float() if len(pieces) > 1 else pieces[0].float().clone()
