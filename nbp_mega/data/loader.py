"""Training and validation data: config, wiring, and the fixed-order validation batches.

Legend: N samples in an index; G global batch (clips per optimizer step, all ranks);
b = G / dp local batch of one data-parallel rank; T, H, W latent grid.

Training streams shards (stream.py: a global order independent of dp, resumable on any dp
dividing G);
validation reads a ShardIndex by random access in index order, split over ranks like training.
Both give Batch.text, the fixed-form text ids, when given a TextSpec (a text-conditional model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from nbp_mega.config_fields import ConfigError, option
from nbp_mega.data.shards import (
    ShardError,
    ShardIndex,
    TextSpec,
    check_meta,
    check_tokens,
    expand_shards,
    shard_names,
)
from nbp_mega.data.stream import (
    Batch,
    StreamLoader,
    StreamSpec,
    choose_num_streams,
    stop_workers,
)

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    shards: str = option("", "training shards: a directory (all *.tar), a glob or a brace "
                         "pattern like /d/shard-{000000..000009}.tar; several joined by ','")
    val_shards: str = option("", "validation shards, same syntax ('' = no validation)")
    num_workers: int = option(1, "DataLoader worker processes per rank (0 = read in the "
                              "training process)", min=0)
    shuffle: bool = option(True, "shuffle shards each epoch and samples in a buffer (seeded by "
                           "the run seed)")
    shuffle_buffer: int = option(1024, "samples each stream shuffles together", min=1)
    streams: int = option(0, "virtual data streams V, fixed for a run (a resume keeps the "
                          "checkpoint's): global_batch % V == 0 and V <= shards. Every dp "
                          "dividing global_batch gets the same batches; if dp does not divide "
                          "V, ranks sharing a stream each read all of it (more reading; "
                          "warned). 0 = the largest such V <= 64, whatever dp is", min=0)


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


class _EvalBatches(Sampler):
    """This rank's id lists: slice [r*b, (r+1)*b) of batches [g*G, (g+1)*G), in index order."""

    def __init__(self, *, num_batches: int, global_batch: int, dp_rank: int, dp_size: int):
        self.num_batches, self.global_batch = num_batches, global_batch
        self.local = local_batch_size(global_batch, dp_rank, dp_size,
                                      what="eval batch size (train.global_batch)")
        self.offset = dp_rank * self.local

    def __iter__(self):
        for g in range(self.num_batches):
            start = g * self.global_batch + self.offset
            yield list(range(start, start + self.local))

    def __len__(self) -> int:
        return self.num_batches


# -- reading ---------------------------------------------------------------------------------
class _TokenDataset(Dataset):
    """Map-style: sample id -> (tokens [T, H, W] int64, label, global key, text [S] int64 or
    None), checked."""

    def __init__(self, index: ShardIndex, grid: tuple[int, int, int], vocab_size: int,
                 text: TextSpec | None):
        self.index, self.grid, self.vocab_size, self.text = index, tuple(grid), vocab_size, text

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        sample = self.index.read(i, text=self.text is not None)
        where = self.index.where(i)
        tokens = check_tokens(sample.tokens, grid=self.grid, vocab_size=self.vocab_size,
                              where=where)
        text = None if self.text is None else torch.from_numpy(
            self.text.fixed(sample.text, where=where))
        return torch.from_numpy(tokens), check_meta(sample.meta, where=where), sample.key, text


def _collate(items) -> Batch:
    tokens, labels, keys, text = zip(*items, strict=True)
    return Batch(tokens=torch.stack(tokens), labels=torch.tensor(labels, dtype=torch.long),
                 keys=list(keys), first_position=-1,
                 text=None if text[0] is None else torch.stack(text))


# -- validation and wiring -------------------------------------------------------------------
def eval_batches(index: ShardIndex, *, batch_size: int, dp_rank: int, dp_size: int,
                 max_batches: int, grid: tuple[int, int, int], vocab_size: int,
                 num_workers: int = 0, text: TextSpec | None = None):
    """Batches of the first max_batches*batch_size samples in index order, split like training.

    Only whole batches are used: a validation set smaller than one batch is an error.
    `text`: the model's text prefix (TextSpec.from_model(cfg.model)); None = no Batch.text.
    """
    num = min(max_batches, len(index) // batch_size)
    if num < 1:
        raise ShardError(f"validation shards hold {len(index)} samples, fewer than one batch of "
                         f"{batch_size}; add validation samples or lower train.global_batch")
    if num < max_batches:
        log.warning("validation: only %d of %d batches of %d (the shards hold %d samples)",
                    num, max_batches, batch_size, len(index))
    sampler = _EvalBatches(num_batches=num, global_batch=batch_size, dp_rank=dp_rank,
                           dp_size=dp_size)
    # A private generator: starting workers must not draw from the global torch RNG (the
    # dropout stream), or resuming would not be exact.
    batches = iter(DataLoader(_TokenDataset(index, grid, vocab_size, text), batch_sampler=sampler,
                              num_workers=num_workers, collate_fn=_collate,
                              generator=torch.Generator().manual_seed(0)))
    try:
        yield from batches
    finally:
        stop_workers(batches)


def build_loaders(cfg: DataConfig, *, seed: int, global_batch: int, dp_rank: int, dp_size: int,
                  grid: tuple[int, int, int], vocab_size: int, saved_streams: int = 0,
                  text: TextSpec | None = None):
    """(training StreamLoader, validation ShardIndex or None) from the data config.

    `saved_streams`: V of the checkpoint being resumed (0 = a fresh run: V from the global batch
    and the shard count, never from dp, so every dp dividing the global batch sees the same
    batches, on a fresh run as on a resume).
    `text`: the model's text prefix (TextSpec.from_model(cfg.model); None = a model without
    text): training batches carry Batch.text, and validation shards are checked to hold text
    for every sample (from the index, nothing read); give eval_batches the same spec.
    """
    if not cfg.shards:
        raise ConfigError("data.shards is empty: give a directory, glob or brace pattern of "
                          "token shards (python -m nbp_mega.data.synthetic OUT makes some)")
    paths = expand_shards(cfg.shards)
    if saved_streams and cfg.streams not in (0, saved_streams):
        raise ConfigError(f"data.streams={cfg.streams}, but the checkpoint being resumed used "
                          f"{saved_streams} streams; the sample order needs the same (set 0 or "
                          f"{saved_streams})")
    local_batch_size(global_batch, dp_rank, dp_size)
    streams = choose_num_streams(saved_streams or cfg.streams, num_shards=len(paths),
                                 global_batch=global_batch)
    spec = StreamSpec(paths=tuple(paths), names=tuple(shard_names(paths)), seed=seed,
                      shuffle=cfg.shuffle, num_streams=streams,
                      per_stream=global_batch // streams,
                      buffer=cfg.shuffle_buffer if cfg.shuffle else 1, grid=tuple(grid),
                      vocab_size=vocab_size, text=text)
    loader = StreamLoader(spec, global_batch=global_batch, dp_rank=dp_rank, dp_size=dp_size,
                          num_workers=cfg.num_workers)
    val_index = ShardIndex.build(expand_shards(cfg.val_shards)) if cfg.val_shards else None
    if text is not None and val_index is not None:
        check_index_has_text(val_index, text, what="data.val_shards")
    return loader, val_index


def check_index_has_text(index: ShardIndex, text: TextSpec, *, what: str) -> None:
    """Fail now, not at the first evaluation, if samples of a text model's shards lack text."""
    missing = index.without_text()
    if len(missing):
        raise ShardError(f"{what}: {len(missing)} of {len(index)} samples have no text; the "
                         f"first: {text.missing(index.where(int(missing[0])))}")
