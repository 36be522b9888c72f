"""Streaming training data: webdataset shards -> V virtual streams -> global batches.

Legend: G global batch; V virtual streams; dp data-parallel size; b = G / dp local batch;
k = G / V samples each stream gives to every global batch; W DataLoader workers of a rank.

Why virtual streams: the order of the global batches must depend only on the seed, the shard
list and V (chosen from G and the shard count alone, fixed when a run starts), never on dp or
W, and a checkpoint must resume exactly on another dp. So the data is cut into V streams that
do not know about ranks:
  - epoch e of stream s reads, in order, the shards at positions s, s+V, s+2V, ... of the
    epoch's seeded shard permutation (each shard streamed sequentially by webdataset);
  - a stream fills a buffer with its next `buffer` samples, permutes it with a generator seeded
    by (seed, s, fill number) and emits it: a seeded shuffle buffer whose state is 4 numbers;
  - global batch g holds k samples of every stream, stream-major: stream s fills positions
    [s*k, (s+1)*k). Rank r of dp owns the positions [r*b, (r+1)*b): it reads every stream
    that overlaps them and keeps the overlapping samples; its workers split those streams.
Any dp dividing G gives the same batches. When dp divides V each stream lies inside one rank;
otherwise a stream crossing a rank boundary is read by every rank it overlaps, in step (each
takes all k of its samples per batch), which multiplies the job's reading (a warning says by
how much and how to avoid it). The rank holding a stream's first position s*k owns it: it
counts and logs the stream's broken shards, and its position wins in `merge_states`.
A stream's position (epoch, shard, samples into the shard where its buffer began, fill number,
samples emitted from the buffer) is enough to rebuild it: a checkpoint stores all V positions.

With spec.text (a text-conditional model) every sample's .text.npy becomes a fixed-form row
of Batch.text; a sample without one is an error. The text changes neither order nor position.

A shard that is missing or corrupt is skipped from where it broke (earlier samples are kept),
counted and logged; only the ranks reading its stream read it, so no other rank waits.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nbp_mega.config_fields import ConfigError
from nbp_mega.data.shards import (
    META_EXT,
    TEXT_EXT,
    TOKENS_EXT,
    ShardError,
    TextSpec,
    _decode_meta,
    _decode_text,
    _decode_tokens,
    check_meta,
    check_tokens,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamSpec:
    """Everything that defines the global sample order (the same on every rank)."""

    paths: tuple[str, ...]  # shard files, in shard-list order
    names: tuple[str, ...]  # their names in global keys
    seed: int
    shuffle: bool
    num_streams: int  # V
    per_stream: int  # k = G / V
    buffer: int  # shuffle-buffer samples per stream (1 = no shuffling inside shards)
    grid: tuple[int, int, int]
    vocab_size: int
    text: TextSpec | None = None  # the model's text prefix; None = no text (.text.npy ignored)

    def digest(self) -> str:
        """Names the shard list: a saved position only means something for the same shards."""
        return hashlib.sha256("\n".join(self.names).encode()).hexdigest()[:16]

    def stream_shards(self, stream: int, epoch: int) -> list[int]:
        """Shard ids stream `stream` reads in epoch `epoch`, in order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))
        else:
            order = np.arange(len(self.paths))
        return order[stream::self.num_streams].tolist()


def initial_position() -> dict:
    return {"epoch": 0, "shard": 0, "skip": 0, "fill": 0, "emitted": 0, "skipped_shards": 0}


@dataclass
class Item:
    tokens: np.ndarray  # [T, H, W] int64, checked against the model
    label: int
    key: str  # global key "<shard name>/<sample key>"
    text: np.ndarray | None = None  # [S] int64 fixed-form text ids; None without spec.text


class Stream:
    """One virtual stream: an endless, restorable sequence of checked samples.

    `report`: log broken shards as warnings (the stream's owner does; a rank sharing the
    stream meets the same shards and logs them only at debug level).
    """

    def __init__(self, spec: StreamSpec, stream: int, position: dict, report: bool = True):
        self.spec, self.stream, self.report = spec, stream, report
        self.pos = dict(position)
        # Shards found broken while filling the saved buffer are met (and counted) again.
        self.pos["skipped_shards"] = self.pos.pop("skipped_before_fill", 0)
        self._cursor = {"epoch": self.pos["epoch"], "shard": self.pos["shard"],
                        "skip": self.pos["skip"]}
        self._raw = self._read_from(self.pos["epoch"], self.pos["shard"], self.pos["skip"])
        self._buffer = self._fill()[self.pos["emitted"]:]

    def take(self, n: int) -> list[Item]:
        out = []
        while len(out) < n:
            if not self._buffer:
                self.pos["fill"] += 1
                self.pos["emitted"] = 0
                self._buffer = self._fill()
            out.append(self._buffer.pop(0))
            self.pos["emitted"] += 1
        return out

    def position(self) -> dict:
        return {**self.pos, "skipped_before_fill": self._skipped_before_fill}

    # -- internals ---------------------------------------------------------------------------
    def _fill(self) -> list[Item]:
        """The next buffer, permuted; records where it began so it can be re-read."""
        self.pos.update(self._cursor)
        skipped_before = self.pos["skipped_shards"]
        items = []
        while len(items) < self.spec.buffer:
            item = next(self._raw)
            if item is None:  # the epoch ended: a buffer never mixes two epochs
                if items:
                    break
                self.pos.update(self._cursor)
                continue
            items.append(item)
        if self.spec.shuffle and len(items) > 1:
            rng = np.random.default_rng([self.spec.seed, self.stream, self.pos["fill"], 1])
            items = [items[i] for i in rng.permutation(len(items))]
        self._skipped_before_fill = skipped_before
        return items

    def _read_from(self, epoch: int, shard: int, skip: int):
        """Samples from (epoch, shard index in the epoch's list, samples to skip), endless;
        None at the end of each epoch.

        Keeps self._cursor = where the next sample comes from, in the same terms.
        """
        self._cursor = {"epoch": epoch, "shard": shard, "skip": skip}
        while True:
            shards = self.spec.stream_shards(self.stream, epoch)
            if not shards:
                raise ConfigError(f"stream {self.stream} has no shard: {len(self.spec.paths)} "
                                  f"shards for {self.spec.num_streams} data.streams")
            found = 0
            for i in range(shard, len(shards)):
                for n, item in enumerate(self._read_shard(shards[i], skip)):
                    self._cursor = {"epoch": epoch, "shard": i, "skip": skip + n + 1}
                    found += 1
                    yield item
                skip = 0
                self._cursor = {"epoch": epoch, "shard": i + 1, "skip": 0}
            if not found and shard == 0:
                raise ShardError(f"stream {self.stream} read no sample in epoch {epoch} from "
                                 f"its {len(shards)} shards (all missing, empty or corrupt?)")
            epoch, shard = epoch + 1, 0
            self._cursor = {"epoch": epoch, "shard": 0, "skip": 0}
            yield None

    def _read_shard(self, shard_id: int, skip: int):
        """Checked samples of one shard after the first `skip`; stops early if it breaks."""
        path, name = self.spec.paths[shard_id], self.spec.names[shard_id]
        # Just the shard's samples: no node/worker splitting (streams are split already).
        samples = wds.DataPipeline(wds.SimpleShardList([path]),
                                   wds.tarfile_to_samples(handler=wds.reraise_exception))
        n = 0
        try:
            for sample in samples:
                n += 1
                if n > skip:
                    yield self._item(sample, name)
        except ShardError:
            raise  # a sample that does not fit the model: the config or the data is wrong
        except Exception as e:  # unreadable/truncated tar, missing file, bad member
            self.pos["skipped_shards"] += 1
            log.log(logging.WARNING if self.report else logging.DEBUG,
                    "data: skipping shard %s after %d samples (%s: %s)", path, n,
                    type(e).__name__, e)

    def _item(self, sample: dict, shard_name: str) -> Item:
        key = f"{shard_name}/{sample['__key__']}"
        where = f"{sample.get('__url__', shard_name)}: sample {sample['__key__']}"
        for ext in (TOKENS_EXT, META_EXT):
            if ext not in sample:
                raise ShardError(f"{where}: sample has no .{ext} member (has "
                                 f"{sorted(k for k in sample if not k.startswith('__'))})")
        tokens = check_tokens(_decode_tokens(sample[TOKENS_EXT], where), grid=self.spec.grid,
                              vocab_size=self.spec.vocab_size, where=where)
        label = check_meta(_decode_meta(sample[META_EXT], where), where=where)
        text = None
        if self.spec.text is not None:
            raw = sample.get(TEXT_EXT)
            text = self.spec.text.fixed(None if raw is None else _decode_text(raw, where),
                                        where=where)
        return Item(tokens, label, key, text)


def rank_slices(num_streams: int, per_stream: int, dp_rank: int,
                dp_size: int) -> dict[int, tuple[int, int]]:
    """{stream: (first, end)}: the streams overlapping rank r's positions [r*b, (r+1)*b) of
    every global batch, each with the offsets [first, end) of its k samples that fall there."""
    k, b = per_stream, num_streams * per_stream // dp_size
    start, end = dp_rank * b, (dp_rank + 1) * b
    return {s: (max(start - s * k, 0), min(end - s * k, k))
            for s in range(start // k, -(-end // k))}


def stream_owner(stream: int, per_stream: int, local_batch: int) -> int:
    """The rank holding the stream's first position s*k: it counts the stream's broken shards."""
    return stream * per_stream // local_batch


def read_amplification(num_streams: int, per_stream: int, dp_size: int) -> float:
    """Samples the job reads per sample it trains on: 1 when dp divides V, more when ranks
    share streams (each rank reading a stream reads all of it)."""
    reads = sum(len(rank_slices(num_streams, per_stream, r, dp_size)) for r in range(dp_size))
    return reads / num_streams


class _RankChunks(IterableDataset):
    """Per global batch, one chunk per worker: {stream: (this rank's items, position after)}."""

    def __init__(self, spec: StreamSpec, slices: dict[int, tuple[int, int]],
                 positions: dict[int, dict], owned: set[int]):
        self.spec, self.slices, self.positions, self.owned = spec, slices, positions, owned

    def __iter__(self):
        info = get_worker_info()
        streams = list(self.slices)
        mine = streams[info.id::info.num_workers] if info else streams
        streams = [Stream(self.spec, s, self.positions[s], report=s in self.owned) for s in mine]
        while True:  # every reader of a stream takes all k of its samples: they stay in step
            yield {s.stream: (s.take(self.spec.per_stream)[slice(*self.slices[s.stream])],
                              s.position()) for s in streams}


def _identity(chunk):
    return chunk


def stop_workers(batches) -> None:
    """Stop a DataLoader iterator's worker processes now.

    Its __del__ would, but an iterator held by a reference cycle (a worker's re-raised error
    makes one) is collected late, with its queues already torn down: the join then waits
    5 s per worker.
    """
    stop = getattr(batches, "_shutdown_workers", None)  # absent with num_workers=0
    if stop is not None:
        stop()


# The default V is capped: a rank holds a shuffle buffer (data.shuffle_buffer samples) and an
# open shard per stream it reads, and fills every buffer before its first batch, so at dp=1
# memory and start-up grow with V. 64 x 1024 samples of a [5, 16, 16] grid is ~0.7 GB.
MAX_DEFAULT_STREAMS = 64


def choose_num_streams(requested: int, *, num_shards: int, global_batch: int) -> int:
    """V: as asked (checked), or for 0 the largest divisor of G that is at most the number of
    shards and MAX_DEFAULT_STREAMS. Never depends on dp: the batches must not either.

    V is fixed for a run (it is saved with the data position); any dp dividing G can run it.
    """
    if not requested:
        cap = min(num_shards, MAX_DEFAULT_STREAMS)
        return max(v for v in range(1, cap + 1) if global_batch % v == 0)
    bad = []
    if global_batch % requested:
        bad.append(f"train.global_batch={global_batch} is not a multiple of it")
    if requested > num_shards:
        bad.append(f"there are only {num_shards} shards (each stream needs one per epoch)")
    if bad:
        fits = [v for v in range(1, min(num_shards, global_batch) + 1) if global_batch % v == 0]
        raise ConfigError(f"data.streams={requested} does not work: {'; '.join(bad)}. Use a "
                          f"divisor of the global batch that is at most the shard count "
                          f"({', '.join(map(str, fits))}), or 0 for the default, or write more "
                          f"(smaller) shards")
    return requested


def sample_hash(position: int, key: str) -> int:
    """48 bits naming (position in the global batch, key); summed into a batch digest."""
    return int(hashlib.sha256(f"{position}:{key}".encode()).hexdigest()[:12], 16)


def format_digest(total: int) -> str:
    """The digest of a global batch from the sum of its samples' hashes (summed over ranks)."""
    return hashlib.sha256(str(total % 2**64).encode()).hexdigest()[:16]


@dataclass
class Batch:
    tokens: torch.Tensor  # [b, T, H, W] int64 token ids of this rank's clips
    labels: torch.Tensor  # [b] int64 class ids (-1 = none)
    keys: list[str]  # [b] global keys of this rank's clips
    first_position: int  # position of keys[0] in the global batch (r * b)
    # [b, S] int64 text ids in the paper's fixed form (bos + ids, truncated, eos-padded;
    # S = model.text_len), None for a model without text
    text: torch.Tensor | None = None

    def digest_part(self) -> int:
        """This rank's share of the global batch digest (sum over ranks = the digest)."""
        return sum(sample_hash(self.first_position + i, k) for i, k in enumerate(self.keys))


class StreamLoader:
    """This rank's share of the global batches, with a position restorable on any dp.

        loader = StreamLoader(spec, global_batch=32, dp_rank=r, dp_size=4, num_workers=2)
        batch = loader.next_batch()   # batch.tokens [8, T, H, W]
    """

    def __init__(self, spec: StreamSpec, *, global_batch: int, dp_rank: int, dp_size: int,
                 num_workers: int = 0):
        if (spec.num_streams * spec.per_stream != global_batch or global_batch % dp_size
                or not 0 <= dp_rank < dp_size):
            raise ConfigError(f"{spec.num_streams} streams x {spec.per_stream} samples do not "
                              f"make global batches of {global_batch} split over {dp_size} ranks "
                              f"(for rank {dp_rank})")
        self.spec, self.global_batch = spec, global_batch
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        self.slices = rank_slices(spec.num_streams, spec.per_stream, dp_rank, dp_size)
        self.streams = list(self.slices)  # read by this rank (some maybe shared)
        self.owned = {s for s in self.streams  # counted by this rank
                      if stream_owner(s, spec.per_stream, self.local_batch) == dp_rank}
        self.positions = {s: initial_position() for s in self.streams}
        self.batches = 0  # global batches handed out
        self._chunks = None
        if spec.num_streams % dp_size and dp_rank == 0:
            self._warn_shared_streams()

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.dp_size

    @property
    def skipped_shards(self) -> int:
        """Broken shards met so far (also across restarts) by the streams this rank owns: the
        sum over ranks counts each stream once."""
        return sum(self.positions[s]["skipped_shards"] for s in self.owned)

    def next_batch(self) -> Batch:
        if self._chunks is None:
            self._chunks = iter(self._data_loader())
        try:
            chunk = {}
            for _ in range(self._workers()):
                chunk.update(next(self._chunks))
        except BaseException:
            self.close()
            raise
        items = []
        for s in self.streams:  # stream-major: the global order
            stream_items, self.positions[s] = chunk[s]
            items += stream_items
        self.batches += 1
        text = None
        if self.spec.text is not None:
            text = torch.from_numpy(np.stack([it.text for it in items]))
        return Batch(tokens=torch.from_numpy(np.stack([it.tokens for it in items])),
                     labels=torch.tensor([it.label for it in items], dtype=torch.long),
                     keys=[it.key for it in items],
                     first_position=self.dp_rank * self.local_batch, text=text)

    def close(self) -> None:
        """Stop the worker processes (the next `next_batch` starts new ones)."""
        stop_workers(self._chunks)
        self._chunks = None

    def _workers(self) -> int:
        return min(self.num_workers, len(self.streams)) or 1

    def _data_loader(self) -> DataLoader:
        dataset = _RankChunks(self.spec, self.slices, self.positions, self.owned)
        workers = min(self.num_workers, len(self.streams))
        # A private generator: starting workers must not draw from the global torch RNG (the
        # dropout stream), or resuming would not be exact.
        return DataLoader(dataset, batch_size=None, num_workers=workers,
                          collate_fn=_identity, prefetch_factor=2 if workers else None,
                          generator=torch.Generator().manual_seed(0))

    def _warn_shared_streams(self) -> None:
        v, k, dp, g = self.spec.num_streams, self.spec.per_stream, self.dp_size, self.global_batch
        better = min(m for m in range(dp, g + 1, dp) if m >= v and g % m == 0)
        log.warning("data: %d data streams do not split over %d data-parallel ranks: streams "
                    "crossing a rank boundary are read by every rank they overlap, so the job "
                    "reads %.2fx the samples it trains on (the batches are unchanged). To "
                    "avoid it, start runs with data.streams a multiple of the data-parallel "
                    "size that divides train.global_batch=%d, e.g. %d (needs as many shards; "
                    "there are %d); a resumed run keeps its checkpoint's streams", v, dp,
                    read_amplification(v, k, dp), g, better, len(self.spec.paths))

    # -- position ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's streams; `merge_states` of all ranks' dicts is the whole position."""
        return {"num_streams": self.spec.num_streams, "seed": self.spec.seed,
                "shuffle": self.spec.shuffle, "buffer": self.spec.buffer,
                "shards": self.spec.digest(), "batches": self.batches,
                "streams": {str(s): p for s, p in self.positions.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` (all streams) was taken, on this dp and workers."""
        check_same_stream_spec(state, self.spec)
        saved = state["streams"]
        missing = [s for s in self.streams if str(s) not in saved]
        if missing:
            raise ValueError(f"data position lacks streams {missing}: expected a merge of "
                             f"every rank's StreamLoader.state_dict()")
        self.close()
        self.positions = {s: dict(saved[str(s)]) for s in self.streams}
        self.batches = state["batches"]


def merge_states(states: list[dict]) -> dict:
    """One position for all streams from every data-parallel rank's state_dict(), in rank order.

    Ranks sharing a stream read it in step, so their positions agree. If they do not (the
    ranks read different bytes of a shard: a copy that differs between nodes?), the first
    rank's, the stream's owner, is kept and the difference logged.
    """
    merged = dict(states[0])
    merged["streams"] = {}
    for rank, state in enumerate(states):
        for s, pos in state["streams"].items():
            kept = merged["streams"].setdefault(s, pos)
            if kept != pos:
                log.warning("data: stream %s is at %s on data-parallel rank %d but at %s on "
                            "an earlier rank sharing it (did they read different copies of a "
                            "shard?); saving the earlier rank's position", s, pos, rank, kept)
    return merged


def check_same_stream_spec(state: dict, spec: StreamSpec) -> None:
    """A saved position only means something for the same shards, seed, V and buffer."""
    expected = {"num_streams": spec.num_streams, "seed": spec.seed, "shuffle": spec.shuffle,
                "buffer": spec.buffer, "shards": spec.digest()}
    why = {"num_streams": "data.streams", "seed": "seed", "shuffle": "data.shuffle",
           "buffer": "data.shuffle_buffer", "shards": "the shard list (data.shards)"}
    for key, value in expected.items():
        if key not in state:
            raise ValueError(f"data position lacks {key!r}; expected a dict from "
                             f"StreamLoader.state_dict(), got keys {sorted(state)}")
        if state[key] != value:
            raise ShardError(f"the data position in the checkpoint was taken with {why[key]} "
                             f"= {state[key]!r}, this run has {value!r}: the sample order would "
                             f"differ. Resume with the checkpoint's setting (or a new run_dir)")
