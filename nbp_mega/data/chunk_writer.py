"""One chunk of the preprocessing plan: decode its videos, tokenize, write its shards.

Legend: B clips in a tokenizer batch; T frames, R resolution; t, h, w latent grid.

A chunk is a fixed group of inputs of one split (see nbp_mega/data/preprocess.py). It is
written into OUT/.partial/<split>-<chunk>/ with webdataset's ShardWriter (size-capped, so a
chunk may fill several shard files), then published:
  1. every file is hashed (sha256) and moved to its final name
       OUT/<split>/shard-<chunk:06d>-<part:03d>.tar       token shards
       OUT/raw/<split>/shard-<chunk:06d>-<part:03d>.tar   raw-frame shards (--raw)
  2. the completion record OUT/.state/<split>-<chunk:06d>.json (files, sizes, hashes, what
     happened to every input) is written atomically: it is the commit point.
So a chunk without a record is redone from scratch (stale files of it are removed first), and
a file under its final name is always a whole shard. Samples are written in plan order with
fixed tar headers (mtime 0), so redoing a chunk gives byte-identical files.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
from dataclasses import dataclass, field

import numpy as np

from nbp_mega.checksums import sha256_file
from nbp_mega.data.inputs import VideoInput
from nbp_mega.data.video import Clip, ClipSpec, VideoError, VideoProbe, iter_clips, probe
from nbp_mega.tokenizer.text import class_name_to_text

STATE_DIR = ".state"
PARTIAL_DIR = ".partial"
RAW_DIR = "raw"


def chunk_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}"


def record_path(out: str, split: str, number: int) -> str:
    return os.path.join(out, STATE_DIR, chunk_name(split, number) + ".json")


def final_dir(out: str, split: str, kind: str) -> str:
    return os.path.join(out, split) if kind == "tokens" else os.path.join(out, RAW_DIR, split)


@dataclass
class Encoders:
    """What turns clips into sample members (None = not written)."""

    video: object | None  # a VideoTokenizer (encode uint8 [B, T, R, R, 3] -> [B, t, h, w])
    text: object | None  # a TextTokenizer
    dtype: np.dtype | None  # token dtype (smallest unsigned holding the codebook)
    raw: bool  # also write raw uint8 frames
    batch_size: int = 8  # clips per tokenizer call


@dataclass
class _Pending:
    key: str
    meta: dict
    frames: np.ndarray  # uint8 [T, R, R, 3]


# -- writing shard files ---------------------------------------------------------------------
class _Writer:
    """ShardWriter into the partial folder, opened at the first sample (so no empty tar)."""

    def __init__(self, pattern: str, max_bytes: int, max_clips: int):
        self.pattern, self.max_bytes, self.max_clips = pattern, max_bytes, max_clips
        self._writer = None
        self.counts: dict[str, int] = {}  # file -> samples

    def write(self, sample: dict) -> None:
        import webdataset as wds

        if self._writer is None:
            self._writer = wds.ShardWriter(self.pattern, maxcount=self.max_clips,
                                           maxsize=self.max_bytes, verbose=0, encoder=False,
                                           mtime=0, post=self._finished)
        self._writer.write(sample)

    def _finished(self, fname: str) -> None:
        self.counts[fname] = self._writer.count

    def close(self) -> dict[str, int]:
        if self._writer is not None:
            self._writer.close()
        return self.counts


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _decoded(video: VideoInput, spec: ClipSpec, note: list):
    """(probe, clip) of every clip of `video`; appends the probe's note (why the file looks
    incomplete) to `note`. Any decoding failure becomes a VideoError, so one odd file is one
    skipped input, never a failed chunk; errors of the caller's own work (tokenizing,
    writing: raised in the loop body, not in here) still fail the chunk."""
    try:
        info = probe(video.path)
        note += [info.note] if info.note else []
        for clip in iter_clips(info, spec, start=video.start, end=video.end):
            yield info, clip
    except VideoError:
        raise
    except Exception as e:  # noqa: BLE001 - PyAV/FFmpeg can raise almost anything on bad data
        raise VideoError(f"{video.path}: unexpected error while decoding "
                         f"({type(e).__name__}: {e})") from None


# -- one chunk -------------------------------------------------------------------------------
@dataclass
class ChunkRun:
    """Writes one chunk; `run()` returns its completion record."""

    out: str
    chunk: dict  # {"split", "number", "inputs": [{"id", VideoInput fields}]}
    spec: ClipSpec
    encoders: Encoders
    label_map: dict
    plan_digest: str
    max_bytes: int
    max_clips: int
    progress: object = None  # callable(videos, clips) or None
    alive: object = None  # callable() -> False when the run that asked for this chunk is gone
    _pending: list = field(default_factory=list)

    def run(self) -> dict:
        split, number = self.chunk["split"], self.chunk["number"]
        self.tmp = os.path.join(self.out, PARTIAL_DIR, chunk_name(split, number))
        shutil.rmtree(self.tmp, ignore_errors=True)  # left by an interrupted attempt
        os.makedirs(self.tmp)
        self.writers = {"tokens": _Writer(os.path.join(self.tmp, "tokens-%03d.tar"),
                                          self.max_bytes, self.max_clips)
                        if self.encoders.video is not None else None,
                        "raw": _Writer(os.path.join(self.tmp, "raw-%03d.tar"), self.max_bytes,
                                       self.max_clips) if self.encoders.raw else None}
        results = [self._one_input(item) for item in self.chunk["inputs"]]
        self._flush()
        return self._publish(results)

    def _check_alive(self) -> None:
        # A worker orphaned by a killed run must not publish behind the back of a rerun.
        if self.alive is not None and not self.alive():
            raise RuntimeError("the preprocessing run that started this chunk has ended")

    def _one_input(self, item: dict) -> dict:
        self._check_alive()
        video = VideoInput(**{k: v for k, v in item.items() if k != "id"})
        clips, error, note = 0, None, []
        try:
            for info, clip in _decoded(video, self.spec, note):
                self._add(item["id"], video, info, clip)
                clips += 1
            if note:  # e.g. truncated: the clips of the part that is there are kept
                error = f"{video.path}: {note[0]}; kept the {clips} clips of the readable part"
        except VideoError as e:
            error = str(e)
        if self.progress is not None:
            self.progress(1, clips)
        return {"id": item["id"], "source": video.source, "split": video.split,
                "label_name": video.label_name, "clips": clips, "error": error}

    def _add(self, input_id: int, video: VideoInput, info: VideoProbe, clip: Clip) -> None:
        key = f"v{input_id:07d}_c{clip.index:04d}"  # unique in the whole output, dot-free
        self._pending.append(_Pending(key, self._meta(video, info, clip), clip.frames))
        if len(self._pending) >= self.encoders.batch_size:
            self._flush()

    def _meta(self, video: VideoInput, info: VideoProbe, clip: Clip) -> dict:
        meta = {"source": video.source, "split": video.split,
                "label": self.label_map.get(video.label_name, -1),
                "clip_start": round(clip.start_time, 6), "clip_index": clip.index,
                "fps": self.spec.fps or round(info.src_fps, 6), "frames": self.spec.frames,
                "resolution": [self.spec.resolution, self.spec.resolution],
                "source_fps": round(info.src_fps, 6), "source_resolution": [info.height,
                                                                             info.width]}
        if video.label_name is not None:
            meta["label_name"] = video.label_name
        if video.caption:
            meta["caption"] = video.caption
        text = video.caption or (class_name_to_text(video.label_name) if video.label_name
                                 else None)
        if text:
            meta["text"] = text
        tok, text_tok = self.encoders.video, self.encoders.text
        if tok is not None:
            meta["tokenizer"], meta["tokenizer_checksum"] = tok.name, tok.checksum()
        if text_tok is not None and text:
            meta["text_tokenizer"] = text_tok.name
            meta["text_tokenizer_checksum"] = text_tok.checksum()
        return meta

    def _flush(self) -> None:
        """Tokenize the pending clips as one batch and write their samples in order."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        tokens = self._tokenize(batch)
        for n, p in enumerate(batch):
            meta = json.dumps(p.meta, sort_keys=True).encode("utf-8")
            if tokens is not None:
                sample = {"__key__": p.key, "tokens.npy": _npy(tokens[n]), "json": meta}
                if self.encoders.text is not None and "text" in p.meta:
                    ids = self.encoders.text.encode([p.meta["text"]])[0]
                    sample["text.npy"] = _npy(np.asarray(ids, dtype=np.int32))
                self.writers["tokens"].write(sample)
            if self.writers["raw"] is not None:
                self.writers["raw"].write({"__key__": p.key, "frames.npy": _npy(p.frames),
                                           "json": meta})

    def _tokenize(self, batch: list[_Pending]) -> np.ndarray | None:
        """[B, t, h, w] token ids in the shard dtype, or None without a video tokenizer."""
        tok = self.encoders.video
        if tok is None:
            return None
        import torch

        video = torch.from_numpy(np.stack([p.frames for p in batch]))  # uint8 [B, T, R, R, 3]
        ids = tok.encode(video).numpy()
        if ids.min() < 0 or ids.max() >= tok.codebook_size:
            raise RuntimeError(f"tokenizer {tok.name} returned ids outside [0, "
                               f"{tok.codebook_size}) for {batch[0].key}...")
        return ids.astype(self.encoders.dtype)

    def _publish(self, results: list[dict]) -> dict:
        self._check_alive()
        split, number = self.chunk["split"], self.chunk["number"]
        files = []
        for kind, writer in self.writers.items():
            if writer is None:
                continue
            target = final_dir(self.out, split, kind)
            os.makedirs(target, exist_ok=True)
            _remove_stale(target, number)
            for part, (tmp, clips) in enumerate(sorted(writer.close().items())):
                name = os.path.join(target, f"shard-{number:06d}-{part:03d}.tar")
                files.append({"kind": kind, "path": os.path.relpath(name, self.out),
                              "bytes": os.path.getsize(tmp), "sha256": sha256_file(tmp),
                              "clips": clips})
                os.replace(tmp, name)
        record = {"split": split, "number": number, "plan_digest": self.plan_digest,
                  "files": files, "inputs": results}
        write_json_atomic(record_path(self.out, split, number), record)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return record


def _remove_stale(folder: str, number: int) -> None:
    """Files of this chunk from an attempt that died before its record was written."""
    for path in glob.glob(os.path.join(folder, f"shard-{number:06d}-*.tar")):
        os.remove(path)


def write_json_atomic(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def completed_record(out: str, split: str, number: int, plan_digest: str) -> dict | None:
    """The chunk's record if the chunk is complete: the record exists, belongs to this plan,
    and every file it lists is there with its size and sha256. Else None (redo it)."""
    try:
        with open(record_path(out, split, number), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("plan_digest") != plan_digest:
        return None
    for item in record.get("files", []):
        path = os.path.join(out, item["path"])
        if not os.path.isfile(path) or os.path.getsize(path) != item["bytes"] \
                or sha256_file(path) != item["sha256"]:
            return None
    return record
