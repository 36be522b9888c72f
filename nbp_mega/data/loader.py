"""The training data stream: a global sample order independent of the parallel layout.

Legend: N samples in the index; G global batch (clips per optimizer step, all ranks);
b = G / dp local batch of one data-parallel rank; T, H, W latent grid.

The order depends only on the seed and the shard list:
  - epoch e is a permutation of the sample ids 0..N-1, drawn by np.random.default_rng([seed, e])
    (or the identity when shuffle is off); the epochs concatenated form one endless stream;
  - global batch g is stream items [g*G, (g+1)*G); rank r of dp takes the contiguous slice
    [r*b, (r+1)*b) of it.
So the union over ranks of a global batch is the same for any number of ranks or workers, no
sample is repeated or lost within an epoch, and the position is one number (samples consumed)
that can be restored with another data-parallel size.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from nbp_mega.config_fields import ConfigError, option
from nbp_mega.data.shards import ShardError, ShardIndex, check_meta, check_tokens, expand_shards

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    shards: str = option("", "training shards: a directory (all *.tar), a glob or a brace "
                         "pattern like /d/shard-{000000..000009}.tar; several joined by ','")
    val_shards: str = option("", "validation shards, same syntax ('' = no validation)")
    num_workers: int = option(1, "DataLoader worker processes per rank (0 = read in the "
                              "training process)", min=0)
    shuffle: bool = option(True, "shuffle the sample order each epoch (seeded by the run seed)")


@dataclass
class Batch:
    tokens: torch.Tensor  # [b, T, H, W] int64 token ids of this rank's clips
    labels: torch.Tensor  # [b] int64 class ids (-1 = none)
    keys: list[str]  # [b] global keys of this rank's clips
    global_keys: list[str] = field(default_factory=list)  # [G] the whole global batch's keys


def batch_digest(keys: list[str]) -> str:
    """16 hex chars naming a list of sample keys (logged per step: same data, same digest)."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


# -- the global order ------------------------------------------------------------------------
class SampleOrder:
    """The endless stream of sample ids: epochs of seeded permutations, concatenated."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool):
        if num_samples < 1:
            raise ShardError("the shard index holds no samples")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self._epochs: OrderedDict[int, np.ndarray] = OrderedDict()  # the 2 latest, [N] each

    def epoch(self, e: int) -> np.ndarray:
        """[N] sample ids of epoch e, in stream order."""
        if e not in self._epochs:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, e]).permutation(self.num_samples)
            else:
                perm = np.arange(self.num_samples)
            self._epochs[e] = perm
            if len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[e]

    def ids(self, start: int, stop: int) -> np.ndarray:
        """[stop - start] sample ids at stream positions [start, stop), across epochs."""
        out, pos = [], start
        while pos < stop:
            e, offset = divmod(pos, self.num_samples)
            take = min(stop - pos, self.num_samples - offset)
            out.append(self.epoch(e)[offset:offset + take])
            pos += take
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def local_batch_size(global_batch: int, dp_rank: int, dp_size: int,
                     what: str = "train.global_batch") -> int:
    """b = G / dp, with errors naming the setting that does not divide."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"data-parallel rank {dp_rank} of {dp_size}: expected 0 <= rank < size")
    if global_batch < 1 or global_batch % dp_size:
        raise ConfigError(f"{what}={global_batch} is not a positive multiple of the data-"
                          f"parallel size {dp_size}: each rank takes an equal slice of every "
                          f"global batch")
    return global_batch // dp_size


class _RankBatches(Sampler):
    """This rank's id lists of global batches starting at stream position `start`."""

    def __init__(self, order: SampleOrder, *, start: int, global_batch: int, dp_rank: int,
                 dp_size: int, num_batches: int | None = None):
        self.order, self.start, self.global_batch = order, start, global_batch
        self.local = local_batch_size(global_batch, dp_rank, dp_size)
        self.offset = dp_rank * self.local  # where this rank's slice starts in a global batch
        self.num_batches = num_batches  # None = endless

    def __iter__(self):
        g = 0
        while self.num_batches is None or g < self.num_batches:
            pos = self.start + g * self.global_batch + self.offset
            yield self.order.ids(pos, pos + self.local).tolist()
            g += 1

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("the training stream is endless: it has no length")
        return self.num_batches


# -- reading ---------------------------------------------------------------------------------
class _TokenDataset(Dataset):
    """Map-style: sample id -> (tokens [T, H, W] int64, label, global key), checked."""

    def __init__(self, index: ShardIndex, grid: tuple[int, int, int], vocab_size: int):
        self.index, self.grid, self.vocab_size = index, tuple(grid), vocab_size

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        sample = self.index.read(i)
        where = self.index.where(i)
        tokens = check_tokens(sample.tokens, grid=self.grid, vocab_size=self.vocab_size,
                              where=where)
        return torch.from_numpy(tokens), check_meta(sample.meta, where=where), sample.key


def _collate(items) -> Batch:
    tokens, labels, keys = zip(*items, strict=True)
    return Batch(tokens=torch.stack(tokens), labels=torch.tensor(labels, dtype=torch.long),
                 keys=list(keys))


def _data_loader(dataset: _TokenDataset, sampler: _RankBatches, num_workers: int) -> DataLoader:
    # A private generator: starting an iterator would otherwise draw worker seeds from the
    # global torch RNG and shift the dropout stream, breaking exact resume.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      collate_fn=_collate, prefetch_factor=2 if num_workers else None,
                      generator=torch.Generator().manual_seed(0))


def _stop_workers(batches) -> None:
    """Stop a DataLoader iterator's worker processes now.

    Its __del__ would, but an iterator held by a reference cycle (a worker's re-raised error
    makes one) is collected late, with its queues already torn down: the join then waits
    5 s per worker.
    """
    stop = getattr(batches, "_shutdown_workers", None)  # absent with num_workers=0
    if stop is not None:
        stop()


class TokenLoader:
    """This rank's share of the global batches, with a restorable position.

        loader = TokenLoader(index, global_batch=32, dp_rank=r, dp_size=4, seed=0,
                             grid=(5, 16, 16), vocab_size=64000, num_workers=2)
        batch = loader.next_batch()   # batch.tokens [8, 5, 16, 16]
    """

    def __init__(self, index: ShardIndex, *, global_batch: int, dp_rank: int, dp_size: int,
                 seed: int, grid: tuple[int, int, int], vocab_size: int, shuffle: bool = True,
                 num_workers: int = 0):
        self.local_batch = local_batch_size(global_batch, dp_rank, dp_size)
        if num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers}: expected >= 0")
        self.index, self.global_batch = index, global_batch
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        self.order = SampleOrder(len(index), seed, shuffle)
        self.dataset = _TokenDataset(index, grid, vocab_size)
        self.consumed_samples = 0  # stream position: samples of batches handed out, all ranks
        self._batches = None  # the DataLoader iterator, started lazily at the position

    def next_batch(self) -> Batch:
        """The next global batch's slice for this rank; advances the position by G."""
        if self._batches is None:
            sampler = _RankBatches(self.order, start=self.consumed_samples,
                                   global_batch=self.global_batch, dp_rank=self.dp_rank,
                                   dp_size=self.dp_size)
            self._batches = iter(_data_loader(self.dataset, sampler, self.num_workers))
        try:
            batch = next(self._batches)
        except BaseException:
            self.close()
            raise
        start = self.consumed_samples
        batch.global_keys = self.index.keys(self.order.ids(start, start + self.global_batch))
        mine = batch.global_keys[self.dp_rank * self.local_batch:][:self.local_batch]
        if batch.keys != mine:  # the DataLoader must deliver batches in sampler order
            raise RuntimeError(f"data loader out of step at sample {start}: got {batch.keys[:2]}"
                               f"..., expected {mine[:2]}...")
        self.consumed_samples += self.global_batch
        return batch

    def close(self) -> None:
        """Stop the worker processes (the next `next_batch` starts new ones)."""
        if self._batches is not None:
            _stop_workers(self._batches)
        self._batches = None

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.order.seed,
                "num_samples": self.order.num_samples, "shuffle": self.order.shuffle,
                "index_digest": self.index.digest()}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken, with this loader's dp size and workers."""
        missing = {"consumed_samples", "seed", "num_samples", "shuffle"} - set(state)
        if missing:
            raise ValueError(f"data loader state lacks {sorted(missing)}; expected a dict from "
                             f"TokenLoader.state_dict(), got keys {sorted(state)}")
        _check_same_data(state, self)
        consumed = state["consumed_samples"]
        if not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"data loader state: consumed_samples={consumed!r}, expected an "
                             f"int >= 0")
        self.close()
        self.consumed_samples = consumed


def _check_same_data(state: dict, loader: TokenLoader) -> None:
    """A saved position only means something for the same shards, seed and shuffle."""
    order = loader.order
    if state["num_samples"] != order.num_samples:
        raise ShardError(f"the training shards changed: the saved data position was taken over "
                         f"{state['num_samples']} samples, data.shards now holds "
                         f"{order.num_samples}; resume with the shard list of the checkpoint "
                         f"(or start a new run_dir)")
    digest = state.get("index_digest")
    if digest is not None and digest != loader.index.digest():
        raise ShardError(f"the training shards changed: same sample count ({order.num_samples}) "
                         f"but different shard/sample names or order (key digest "
                         f"{loader.index.digest()}, checkpoint {digest}); resume with the shard "
                         f"list of the checkpoint (or start a new run_dir)")
    if state["seed"] != order.seed:
        raise ValueError(f"the saved data position belongs to seed {state['seed']}, this run has "
                         f"seed {order.seed}: the sample order would differ; resume with "
                         f"seed={state['seed']}")
    if state["shuffle"] != order.shuffle:
        raise ValueError(f"the saved data position was taken with data.shuffle="
                         f"{state['shuffle']}, this run has {order.shuffle}; resume with the "
                         f"checkpoint's setting")


# -- validation and wiring -------------------------------------------------------------------
def eval_batches(index: ShardIndex, *, batch_size: int, dp_rank: int, dp_size: int,
                 max_batches: int, grid: tuple[int, int, int], vocab_size: int,
                 num_workers: int = 0):
    """Batches of the first max_batches*batch_size samples in index order, split like training.

    Only whole batches are used: a validation set smaller than one batch is an error.
    """
    local_batch_size(batch_size, dp_rank, dp_size, what="eval batch size (train.global_batch)")
    num = min(max_batches, len(index) // batch_size)
    if num < 1:
        raise ShardError(f"validation shards hold {len(index)} samples, fewer than one batch of "
                         f"{batch_size}; add validation samples or lower train.global_batch")
    if num < max_batches:
        log.warning("validation: only %d of %d batches of %d (the shards hold %d samples)",
                    num, max_batches, batch_size, len(index))
    order = SampleOrder(len(index), seed=0, shuffle=False)
    sampler = _RankBatches(order, start=0, global_batch=batch_size, dp_rank=dp_rank,
                           dp_size=dp_size, num_batches=num)
    batches = iter(_data_loader(_TokenDataset(index, grid, vocab_size), sampler, num_workers))
    try:
        for g, batch in enumerate(batches):
            batch.global_keys = index.keys(order.ids(g * batch_size, (g + 1) * batch_size))
            yield batch
    finally:
        _stop_workers(batches)


def build_loaders(cfg: DataConfig, *, seed: int, global_batch: int, dp_rank: int, dp_size: int,
                  grid: tuple[int, int, int], vocab_size: int):
    """(training TokenLoader, validation ShardIndex or None) from the data config."""
    if not cfg.shards:
        raise ConfigError("data.shards is empty: give a directory, glob or brace pattern of "
                          "token shards (python -m nbp_mega.data.synthetic OUT makes some)")
    index = ShardIndex.build(expand_shards(cfg.shards))
    val_index = ShardIndex.build(expand_shards(cfg.val_shards)) if cfg.val_shards else None
    loader = TokenLoader(index, global_batch=global_batch, dp_rank=dp_rank, dp_size=dp_size,
                         seed=seed, grid=grid, vocab_size=vocab_size, shuffle=cfg.shuffle,
                         num_workers=cfg.num_workers)
    return loader, val_index
