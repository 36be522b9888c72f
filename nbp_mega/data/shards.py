"""Token shards: the on-disk format, shard lists, and a random-access sample index.

Legend: T, H, W latent grid (frames, rows, columns of tokens); N samples in an index.

Shard format
------------
A shard is an uncompressed POSIX tar file in webdataset layout, one sample per video clip.
A member's sample key is its name up to the first dot of its last path component; the rest
(after that dot) is its extension. A sample is made of two members, and optionally a third:

    <key>.tokens.npy  `np.save` of an integer array [T, H, W]: the latent token grid of the
                      clip. Writers use the smallest unsigned dtype that holds the codebook
                      (uint8 for vocab <= 256, uint16 for <= 65536, else uint32); readers
                      accept any integer dtype. Never pickled (read with allow_pickle=False).
    <key>.json        UTF-8 JSON object with at least
                          "label":  int, the class id (-1 = no label)
                          "source": str, where the clip came from (file, frame range, ...)
                      and optionally "label_name": str, "text": str.
    <key>.text.npy    optional (written with --text-tokenizer): `np.save` of an integer array
                      [n], the raw sentencepiece ids of the sample's text (caption or class
                      name), no special tokens; a text-conditional model needs it in every
                      sample and turns it into its fixed form (`TextSpec`: bos + ids,
                      truncated, eos-padded). A model without text ignores it.

Rules: keys contain no dots and are unique within a shard; the members of one sample are
stored next to each other (as webdataset expects); other members (e.g. <key>.mp4) are allowed
and ignored. Shards must not be compressed: samples are read by seek + read at byte offsets
found once from the tar headers, so any sample can be fetched without scanning the shard.

A sample's global key is "<shard>/<key>", where <shard> is the shard's path relative to the
common directory of all shards in the index (just the file name when they share a directory),
e.g. "shard-000003.tar/clip00000012". Global keys name samples in logs and batch digests.

Shard specs (config `data.shards`): a directory (all *.tar in it, sorted), a glob (sorted
matches), a brace pattern ("/d/shard-{000000..000009}.tar", kept in order; every file must
exist), or a plain file; several specs joined with commas (commas inside braces belong to the
brace pattern).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from braceexpand import braceexpand

from nbp_mega.tokenizer.text import fixed_text_ids

TOKENS_EXT = "tokens.npy"
META_EXT = "json"
TEXT_EXT = "text.npy"  # optional member
_EXTS = (TOKENS_EXT, META_EXT, TEXT_EXT)
_NO_TEXT = (-1, 0)  # (offset, size) in the index of a sample without a text member
_MAX_GAP = 1 << 16  # bytes between a sample's members still read in one go (tar headers)
_MAX_OPEN_FILES = 8  # per process: an index may span thousands of shards


class ShardError(ValueError):
    """A shard or sample is missing, unreadable, or not in the expected format."""


@dataclass
class Sample:
    key: str  # global key "<shard>/<key>"
    tokens: np.ndarray  # [T, H, W] integer token ids, dtype as stored
    meta: dict  # the sample's JSON object
    text: np.ndarray | None = None  # [n] raw text ids as stored (read only when asked)


# -- shard specs -----------------------------------------------------------------------------
def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard paths named by `spec` (see the module docstring for the syntax), in order."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    parts = [part for s in specs for part in _split_specs(s)]
    if not parts:
        raise ShardError(f"shard spec {spec!r} names no shards; expected a directory, glob or "
                         f"brace pattern of .tar files (comma-separated for several)")
    return [path for part in parts for path in _expand_one(part)]


def _split_specs(spec: str) -> list[str]:
    """'a/{0..3}.tar, b/' -> ['a/{0..3}.tar', 'b/']: split on commas outside braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            raise ShardError(f"shard spec {spec!r}: unbalanced '}}' at position {i}")
        if ch == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    if depth:
        raise ShardError(f"shard spec {spec!r}: unbalanced '{{' (a brace pattern is not closed)")
    parts.append(spec[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_one(part: str) -> list[str]:
    path = os.path.expanduser(part)
    if "{" in path:
        return _expand_braces(part, path)
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.tar")))
        if not found:
            raise ShardError(f"shard directory '{part}' holds no *.tar files")
        return found
    if any(ch in path for ch in "*?["):
        found = sorted(p for p in glob.glob(path) if os.path.isfile(p))
        if not found:
            raise ShardError(f"shard glob '{part}' matches no files")
        return found
    if not os.path.isfile(path):
        raise ShardError(f"shard file '{part}' does not exist (expected a .tar file, a "
                         f"directory of them, a glob or a brace pattern)")
    return [path]


def _expand_braces(part: str, path: str) -> list[str]:
    names = list(braceexpand(path))
    missing = [p for p in names if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ShardError(f"shard pattern '{part}': {len(missing)} of {len(names)} files do not "
                         f"exist: {shown}")
    return names


# -- reading one shard's headers -------------------------------------------------------------
def _split_member(name: str) -> tuple[str, str]:
    """'dir/clip7.tokens.npy' -> ('dir/clip7', 'tokens.npy'); no dot -> (name, '')."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def _scan_shard(path: str) -> list[tuple[str, int, int, int, int, int, int]]:
    """[(key, tokens offset, size, json offset, size, text offset, size)] of a shard, in tar
    order; a sample without a text member has text (offset, size) = (-1, 0)."""
    try:
        file_size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as tar:
            members = _sample_members(tar, path, file_size)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"shard {path}: cannot read it as an uncompressed tar ({e}); expected "
                         f"a webdataset tar of <key>.tokens.npy + <key>.json samples") from None
    if not members:
        raise ShardError(f"shard {path}: holds no samples (no <key>.tokens.npy or <key>.json "
                         f"members)")
    rows = []
    for key, found in members.items():
        for ext in (TOKENS_EXT, META_EXT):
            if ext not in found:
                raise ShardError(f"shard {path} sample '{key}': has no '{key}.{ext}' member; "
                                 f"expected both {key}.{TOKENS_EXT} and {key}.{META_EXT}")
        rows.append((key, *found[TOKENS_EXT], *found[META_EXT], *found.get(TEXT_EXT, _NO_TEXT)))
    return rows


def _sample_members(tar: tarfile.TarFile, path: str, file_size: int) -> dict:
    """{key: {ext: (data offset, size)}} for the members we read, checking the layout rules."""
    members: dict[str, dict[str, tuple[int, int]]] = {}
    current = None
    for m in tar:
        if not m.isfile():
            continue
        key, ext = _split_member(m.name)
        if ext not in _EXTS:
            if m.name.endswith(tuple(f".{e}" for e in _EXTS)):
                raise ShardError(f"shard {path} member '{m.name}': sample keys must not contain "
                                 f"dots (expected <key>.{TOKENS_EXT} / <key>.{META_EXT})")
            continue
        if m.offset_data + m.size > file_size:
            raise ShardError(f"shard {path} sample '{key}': member '{m.name}' runs past the end "
                             f"of the file (truncated shard?)")
        if key != current and key in members:
            raise ShardError(f"shard {path} sample '{key}': key appears twice (keys must be "
                             f"unique in a shard and a sample's members adjacent)")
        current = key
        found = members.setdefault(key, {})
        if ext in found:
            raise ShardError(f"shard {path} sample '{key}': duplicate member '{m.name}'")
        found[ext] = (m.offset_data, m.size)
    return members


def shard_names(paths: list[str]) -> list[str]:
    """Display names unique across shards: paths relative to their common directory."""
    full = [os.path.abspath(p) for p in paths]
    seen = {}
    for p, f in zip(paths, full, strict=True):
        if f in seen:
            raise ShardError(f"shard {p} is listed twice (also as {seen[f]}); each shard may "
                             f"appear once in a shard list")
        seen[f] = p
    common = os.path.commonpath([os.path.dirname(f) for f in full])
    return [os.path.relpath(f, common) for f in full]


# -- the index -------------------------------------------------------------------------------
class ShardIndex:
    """Every sample of a list of shards, readable by number 0..N-1 (shard order, tar order).

    Holds only offsets; file handles are opened lazily, per process (DataLoader workers
    fork from the training process and must not share a file position with it).
    """

    def __init__(self, paths: list[str], names: list[str], shard: np.ndarray, keys: list[str],
                 spans: np.ndarray):
        self.paths = list(paths)  # [num shards] as given
        self.names = list(names)  # [num shards] unique display names
        self._shard = shard  # [N] int32: shard number of each sample
        self._keys = keys  # [N] key inside its shard
        self._spans = spans  # [N, 6] int64: tokens, json, text (offset, size); no text: -1, 0
        self._files: OrderedDict = OrderedDict()
        self._pid = os.getpid()
        self._digest: str | None = None

    @classmethod
    def build(cls, paths: list[str]) -> ShardIndex:
        """Read the tar headers of `paths` (not the data) and index their samples."""
        if not paths:
            raise ShardError("no shard files given to index")
        names = shard_names(paths)
        shard, keys, spans = [], [], []
        for s, path in enumerate(paths):
            for key, *span in _scan_shard(path):
                shard.append(s)
                keys.append(key)
                spans.append(span)
        return cls(paths, names, np.asarray(shard, dtype=np.int32), keys,
                   np.asarray(spans, dtype=np.int64).reshape(-1, 6))

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"ShardIndex({len(self)} samples in {len(self.paths)} shards)"

    def key(self, i: int) -> str:
        """Global key of sample i: '<shard name>/<key>', unique across the index."""
        return f"{self.names[self._shard[i]]}/{self._keys[i]}"

    def keys(self, ids) -> list[str]:
        return [self.key(int(i)) for i in ids]

    def where(self, i: int) -> str:
        """How error messages name sample i: "shard /path/a.tar sample 'clip7'"."""
        return f"shard {self.paths[self._shard[i]]} sample '{self._keys[i]}'"

    def digest(self) -> str:
        """16 hex chars identifying the ordered list of global keys (the shard list)."""
        if self._digest is None:
            h = hashlib.sha256()
            for i in range(len(self)):
                h.update(self.key(i).encode() + b"\n")
            self._digest = h.hexdigest()[:16]
        return self._digest

    def has_text(self, i: int) -> bool:
        """Whether sample i has a text member (known from the index, nothing is read)."""
        return bool(self._spans[i, 4] >= 0)

    def without_text(self) -> np.ndarray:
        """[n] ids of the samples that have no text member."""
        return np.flatnonzero(self._spans[:, 4] < 0)

    def read(self, i: int, *, text: bool = False) -> Sample:
        """Sample i (its text ids too if `text` and it has them); decoding errors name the
        shard and key. A sample's members are adjacent in the tar: one seek and read."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for an index of {len(self)} samples")
        spans = self._spans[i].reshape(3, 2).tolist()  # tokens, json, text: [offset, size]
        if not (text and self.has_text(i)):
            spans = spans[:2]
        raw = self._read_spans(i, spans)
        where = self.where(i)
        return Sample(key=self.key(i), tokens=_decode_tokens(raw[0], where),
                      meta=_decode_meta(raw[1], where),
                      text=_decode_text(raw[2], where) if len(raw) > 2 else None)

    def _read_spans(self, i: int, spans: list[list[int]]) -> list[bytes]:
        """The bytes of each (offset, size) of sample i: one read when they lie close."""
        start = min(off for off, _ in spans)
        end = max(off + size for off, size in spans)
        if end - start <= sum(size for _, size in spans) + _MAX_GAP:
            block = self._read_bytes(i, start, end - start)
            return [block[off - start:off - start + size] for off, size in spans]
        return [self._read_bytes(i, off, size) for off, size in spans]

    def _read_bytes(self, i: int, offset: int, size: int) -> bytes:
        f = self._file(int(self._shard[i]))
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise ShardError(f"{self.where(i)}: file is shorter than when it was indexed "
                             f"(changed or truncated since?)")
        return data

    def _file(self, shard: int):
        """An open handle of shard `shard` in this process (a small LRU of open files)."""
        if self._pid != os.getpid():  # forked: the parent's handles share its file positions
            self._files, self._pid = OrderedDict(), os.getpid()
        f = self._files.get(shard)
        if f is None:
            try:
                f = open(self.paths[shard], "rb")  # kept open in the LRU
            except OSError as e:
                raise ShardError(f"shard {self.paths[shard]}: cannot open it ({e})") from None
            self._files[shard] = f
            if len(self._files) > _MAX_OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        self._files.move_to_end(shard)
        return f

    def close(self) -> None:
        """Close this process's file handles (reading again reopens them)."""
        if self._pid == os.getpid():
            for f in self._files.values():
                f.close()
        self._files = OrderedDict()

    def __getstate__(self) -> dict:
        # Pickled into spawned workers: without handles, which are reopened there.
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = OrderedDict(), -1
        return state


def _decode_npy(raw: bytes, where: str, ext: str, expected: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ShardError(f"{where}: {ext} is not a valid .npy array ({e}); expected "
                         f"np.save of {expected}") from None


def _decode_tokens(raw: bytes, where: str) -> np.ndarray:
    return _decode_npy(raw, where, TOKENS_EXT, "an integer array [T, H, W]")


def _decode_text(raw: bytes, where: str) -> np.ndarray:
    return _decode_npy(raw, where, TEXT_EXT, "a 1-D integer array of text ids")


def _decode_meta(raw: bytes, where: str) -> dict:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{where}: {META_EXT} member is not UTF-8 JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ShardError(f"{where}: {META_EXT} member holds a {type(meta).__name__}, expected "
                         f"a JSON object with 'label' and 'source'")
    return meta


# -- checks against the model ----------------------------------------------------------------
def check_tokens(tokens: np.ndarray, *, grid: tuple[int, int, int], vocab_size: int,
                 where: str) -> np.ndarray:
    """`tokens` as int64 [T, H, W] if it fits the model (integer ids, shape, vocabulary)."""
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ShardError(f"{where}: tokens have dtype {tokens.dtype}, expected an integer dtype "
                         f"(uint8/uint16/uint32 token ids)")
    grid = tuple(int(g) for g in grid)
    if tokens.shape != grid:
        raise ShardError(f"{where}: tokens have shape {tuple(tokens.shape)}, expected {grid} "
                         f"= model.grid")
    if tokens.size:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            pos = tuple(int(x) for x in np.argwhere(tokens == bad)[0])
            raise ShardError(f"{where}: token id {bad} at (t, h, w) = {pos} is outside "
                             f"[0, {vocab_size}) = model.vocab_size")
    return tokens.astype(np.int64, copy=False)


def check_meta(meta: dict, *, where: str) -> int:
    """The class label of a sample's JSON (-1 = none), after checking the required fields."""
    label = meta.get("label")
    if isinstance(label, bool) or not isinstance(label, int) or label < -1:
        raise ShardError(f"{where}: json 'label' is {label!r}, expected an int class id "
                         f"(-1 for none)")
    if not isinstance(meta.get("source"), str):
        raise ShardError(f"{where}: json 'source' is {meta.get('source')!r}, expected a string "
                         f"saying where the clip came from")
    return label


@dataclass(frozen=True)
class TextSpec:
    """The text prefix a text-conditional model takes (model.text_*): how a sample's stored
    text ids become its fixed-length row, and which ids are valid."""

    length: int  # S = model.text_len: ids per sample (bos + text, truncated, eos-padded)
    vocab: int  # model.text_vocab: stored ids must lie in [0, vocab)
    bos_id: int = 1  # model.text_bos_id
    eos_id: int = 2  # model.text_eos_id, also the padding

    def __post_init__(self):
        specials_fit = all(0 <= i < self.vocab for i in (self.bos_id, self.eos_id))
        if self.length < 2 or not specials_fit:
            raise ValueError(f"{self}: expected length >= 2 (bos and some text) and bos/eos "
                             f"ids in [0, vocab)")

    @classmethod
    def from_model(cls, model) -> TextSpec | None:
        """The spec of a model config (nbp_mega.model.config), None for a model without text."""
        if not model.text_len:
            return None
        return cls(length=model.text_len, vocab=model.text_vocab, bos_id=model.text_bos_id,
                   eos_id=model.text_eos_id)

    def fixed(self, ids: np.ndarray | None, *, where: str) -> np.ndarray:
        """int64 [S]: a sample's stored text ids (None = it has no text member), checked, in
        the paper's fixed form (`fixed_text_ids`)."""
        if ids is None:
            raise self.missing(where)
        ids = check_text(ids, vocab=self.vocab, where=where)
        return fixed_text_ids(ids, self.length, bos_id=self.bos_id,
                              eos_id=self.eos_id).astype(np.int64)

    def missing(self, where: str) -> ShardError:
        """The error for a sample without a text member."""
        return ShardError(
            f"{where}: has no .{TEXT_EXT} member, but the model takes text (model.text_len="
            f"{self.length}) and needs the text ids of every sample. These shards were made "
            f"without --text-tokenizer (or the clip had no caption and no class name): remake "
            f"them with tools/preprocess_video_shards.py --text-tokenizer MODEL.model, or train "
            f"without text (model.text_len=0)")


def check_text(ids: np.ndarray, *, vocab: int, where: str) -> np.ndarray:
    """`ids` as int64 [n] if they are stored text ids the model can embed."""
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ShardError(f"{where}: {TEXT_EXT} holds an array of dtype {ids.dtype} and shape "
                         f"{tuple(ids.shape)}, expected a 1-D integer array of text ids "
                         f"(int32, as tools/preprocess_video_shards.py writes)")
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ShardError(f"{where}: text id {bad} at position "
                             f"{int(np.flatnonzero(ids == bad)[0])} is outside [0, {vocab}) = "
                             f"model.text_vocab (shards made with another text tokenizer?)")
    return ids.astype(np.int64, copy=False)
