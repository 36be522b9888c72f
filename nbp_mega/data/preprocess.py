"""Videos -> token shards: plan, parallel workers, resume, manifest.

    run_preprocess(PreprocessConfig(input=..., output=..., tokenizer="tiny")) -> (manifest, code)

The plan (OUT/plan.json) is made before anything is decoded: the inputs of each split (in
listing order, then shuffled by `shuffle_seed` so a shard mixes classes) are cut into fixed
chunks of `videos_per_chunk`; chunk c of split s becomes OUT/s/shard-<c:06d>-<part:03d>.tar.
Everything a sample's bytes depend on (clip options, tokenizer checksum, label map, inputs) is
in the plan. Re-running with the same arguments finds the plan, skips every chunk whose
completion record checks out (sizes and sha256 of its files) and redoes the others, so an
interrupted run finished by a rerun gives the same files as one uninterrupted run. A rerun
with other arguments or another input list is refused (the plan would change under finished
shards): use a new output folder.

Chunks run in `workers` spawned processes, each with its own tokenizer (torch with
cores/workers threads): on a CPU the tokenizer costs far more than decoding, so both happen in
the worker and the main process only tracks progress. workers=0 runs chunks in-process.

Exit codes (`exit_code`): 0 every input gave all its clips; 2 some inputs were skipped or
only partly read (all listed in the manifest); 3 some chunks failed (a worker error or crash;
their shards are missing, rerun to retry). Fatal usage errors raise PreprocessError (the CLI
exits 1).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from nbp_mega.data.chunk_writer import (
    PARTIAL_DIR,
    ChunkRun,
    Encoders,
    completed_record,
    write_json_atomic,
)
from nbp_mega.data.inputs import InputError, build_label_map, list_inputs
from nbp_mega.data.synthetic import token_dtype
from nbp_mega.data.video import ClipSpec, VideoError

PLAN_FORMAT = "nbp_mega preprocess plan"
PLAN_VERSION = 1
EXIT_OK, EXIT_FATAL, EXIT_SKIPPED, EXIT_FAILED = 0, 1, 2, 3


class PreprocessError(ValueError):
    """Arguments or an output folder that cannot be used (the message says what to do)."""


@dataclass
class PreprocessConfig:
    input: str  # folder tree, .csv/.tsv table or list of paths (nbp_mega/data/inputs.py)
    output: str  # output folder (created)
    tokenizer: str | None = None  # video tokenizer file or preset; None = raw shards only
    raw: bool = False  # also write raw uint8 frame shards (OUT/raw/<split>/)
    text_tokenizer: str | None = None  # sentencepiece .model: store <key>.text.npy ids
    clips: ClipSpec = field(default_factory=ClipSpec)
    root: str | None = None  # folder relative list/table paths start from
    split: str = "train"  # split of inputs that do not name one
    layout: str = "auto"  # folder tree layout (auto, classes, split-classes, flat)
    label_map: str | None = None  # fixed class ids (manifest.json, JSON or names file)
    shuffle_seed: int | None = 0  # permute each split's inputs before chunking (None: keep)
    videos_per_chunk: int = 64  # inputs per chunk (the unit of work and of resuming)
    max_shard_bytes: int = 1 << 30  # ShardWriter size cap
    max_shard_clips: int = 100_000  # ShardWriter sample cap
    batch_size: int = 8  # clips per tokenizer call
    workers: int = 2  # worker processes (0 = in this process)
    threads: int = 0  # torch threads per worker (0 = cores / workers)
    device: str = "cpu"  # where the tokenizer runs

    def check(self) -> None:
        try:
            self.clips.check()
        except VideoError as e:
            raise PreprocessError(str(e)) from None
        if self.tokenizer is None and not self.raw:
            raise PreprocessError("nothing to write: give a tokenizer (token shards) and/or "
                                  "raw=True (raw-frame shards)")
        if (self.clips.frames - 1) % 4:
            # The tokenizers' causal time axis: frame 0 alone, then groups of 4 (also what
            # tokenizer training reads from raw shards).
            raise PreprocessError(f"frames={self.clips.frames}: a clip needs 1 + 4n frames "
                                  f"(e.g. 9, 17, 33)")
        for name in ("videos_per_chunk", "max_shard_bytes", "max_shard_clips", "batch_size"):
            if getattr(self, name) < 1:
                raise PreprocessError(f"{name}={getattr(self, name)}: expected >= 1")
        if self.workers < 0 or self.threads < 0:
            raise PreprocessError(f"workers={self.workers}, threads={self.threads}: expected "
                                  f">= 0")


# -- tokenizers ------------------------------------------------------------------------------
def load_encoders(cfg: PreprocessConfig) -> Encoders:
    """The tokenizers of a run (loaded in the main process and again in every worker)."""
    video = text = None
    if cfg.tokenizer is not None:
        from nbp_mega.tokenizer import load_video_tokenizer

        # fp32 on every device: shards must hold the codes the tokenizer defines (bf16, the
        # GPU default for interactive use, changes ~7% of them) and reruns must match.
        video = load_video_tokenizer(cfg.tokenizer, device=cfg.device,
                                     batch_size=cfg.batch_size, dtype="fp32")
    if cfg.text_tokenizer is not None:
        from nbp_mega.tokenizer.text import TextTokenizer

        text = TextTokenizer(cfg.text_tokenizer)
    dtype = token_dtype(video.codebook_size) if video is not None else None
    return Encoders(video=video, text=text, dtype=dtype, raw=cfg.raw, batch_size=cfg.batch_size)


def _tokenizer_info(enc: Encoders, spec: ClipSpec) -> dict:
    info: dict = {"tokenizer": None, "text_tokenizer": None}
    if enc.video is not None:
        tok = enc.video
        grid = tok.latent_shape(spec.frames, spec.resolution, spec.resolution)
        info["tokenizer"] = {"name": tok.name, "checksum": tok.checksum(),
                             "codebook_size": tok.codebook_size, "grid": list(grid),
                             "dtype": enc.dtype.name}
    if enc.text is not None:
        t = enc.text
        info["text_tokenizer"] = {"name": t.name, "checksum": t.checksum(),
                                  "vocab_size": t.vocab_size, "bos_id": t.bos_id,
                                  "eos_id": t.eos_id, "pad_id": t.pad_id}
    return info


# -- the plan --------------------------------------------------------------------------------
def build_plan(cfg: PreprocessConfig, enc: Encoders) -> dict:
    """Inputs, label map, options and the chunk of every input (see the module docstring)."""
    try:
        inputs, rejected = list_inputs(cfg.input, root=cfg.root, split=cfg.split,
                                       layout=cfg.layout)
        labels, inputs, unknown = build_label_map(inputs, cfg.label_map)
    except InputError as e:
        raise PreprocessError(str(e)) from None
    try:
        tokenizers = _tokenizer_info(enc, cfg.clips)
    except ValueError as e:  # frames / resolution the tokenizer cannot take
        raise PreprocessError(f"clip shape does not fit the tokenizer: {e}") from None
    options = {**asdict(cfg.clips), **tokenizers, "raw": cfg.raw,
               "shuffle_seed": cfg.shuffle_seed, "videos_per_chunk": cfg.videos_per_chunk,
               "max_shard_bytes": cfg.max_shard_bytes, "max_shard_clips": cfg.max_shard_clips,
               "batch_size": cfg.batch_size}
    chunks, next_id = [], 0
    for split in sorted({i.split for i in inputs}):
        items = [i for i in inputs if i.split == split]
        if cfg.shuffle_seed is not None:
            order = np.random.default_rng(cfg.shuffle_seed).permutation(len(items))
            items = [items[k] for k in order]
        for number, lo in enumerate(range(0, len(items), cfg.videos_per_chunk)):
            group = items[lo:lo + cfg.videos_per_chunk]
            chunks.append({"split": split, "number": number, "inputs": [
                {"id": next_id + k, **item.to_dict()} for k, item in enumerate(group)]})
            next_id += len(group)
    return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "options": options,
            "label_map": labels, "chunks": chunks,
            "rejected": [asdict(r) for r in rejected + unknown]}


def plan_digest(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def write_or_check_plan(out: str, plan: dict) -> None:
    """Write OUT/plan.json, or check that the one there is this plan (resuming)."""
    path = os.path.join(out, "plan.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if plan_digest(old) != plan_digest(plan):
            raise PreprocessError(
                f"{out} was started with other arguments or inputs ({_plan_change(old, plan)}); "
                f"re-running resumes only the same job: use a new output folder (or delete "
                f"{out})")
        return
    if os.path.isdir(out) and any(n not in (PARTIAL_DIR, ".lock") for n in os.listdir(out)):
        raise PreprocessError(f"output folder {out} is not empty and holds no plan.json: "
                              f"expected a new folder or one this tool started")
    os.makedirs(out, exist_ok=True)
    write_json_atomic(path, plan)


def _plan_change(old: dict, new: dict) -> str:
    changed = sorted(k for k in set(old.get("options", {})) | set(new["options"])
                     if old.get("options", {}).get(k) != new["options"].get(k))
    if changed:
        return "options differ: " + ", ".join(
            f"{k} {old.get('options', {}).get(k)!r} -> {new['options'].get(k)!r}"
            for k in changed)
    before = {i["path"] for c in old.get("chunks", []) for i in c["inputs"]}
    after = {i["path"] for c in new["chunks"] for i in c["inputs"]}
    if before != after:
        return f"inputs differ: {len(after - before)} new, {len(before - after)} gone"
    return "the label map or the order of the inputs differ"


# -- running chunks --------------------------------------------------------------------------
_WORKER: dict = {}  # per worker process: its ChunkRun arguments and progress queue


def _job(plan: dict) -> dict:
    """What running a chunk needs of the plan (not its input list: a worker gets chunks one
    by one, and hashing the whole plan per chunk would cost O(inputs) each time)."""
    return {"labels": plan["label_map"], "digest": plan_digest(plan),
            "expect": plan["options"]["tokenizer"]}


def _init_worker(cfg: PreprocessConfig, job: dict, queue, threads: int) -> None:
    import torch

    _die_with_parent()
    torch.set_num_threads(threads)
    enc = load_encoders(cfg)
    _WORKER.update(cfg=cfg, enc=enc, queue=queue, parent=os.getppid(), **job)


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the run that spawned it dies (even by
    SIGKILL), so no orphan keeps writing beside a rerun. Elsewhere the `alive` check between
    inputs does the same, later."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_chunk(chunk: dict) -> dict:
    w = _WORKER
    if w["expect"] and w["enc"].video.checksum() != w["expect"]["checksum"]:
        raise RuntimeError(f"the worker's tokenizer {w['enc'].video.name} has checksum "
                           f"{w['enc'].video.checksum()[:12]}, the plan's "
                           f"{w['expect']['checksum'][:12]} (file changed during the run?)")
    run = _chunk_run(w["cfg"], chunk, w["enc"], w["labels"], w["digest"],
                     lambda v, c: w["queue"].put((v, c)))
    run.alive = lambda: os.getppid() == w["parent"]
    return run.run()


def _chunk_run(cfg, chunk, enc, labels, digest, progress) -> ChunkRun:
    return ChunkRun(out=cfg.output, chunk=chunk, spec=cfg.clips, encoders=enc,
                    label_map=labels, plan_digest=digest, max_bytes=cfg.max_shard_bytes,
                    max_clips=cfg.max_shard_clips, progress=progress)


@contextlib.contextmanager
def _exclusive(out: str):
    """Hold OUT/.lock for the run: two runs on one folder would write the same chunks. The
    lock dies with the process, so a killed run never leaves the folder locked."""
    import fcntl

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, ".lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PreprocessError(f"another preprocessing run is using {out}; wait for it to "
                                  f"end (or stop it) and re-run") from None
        yield


class _Progress:
    """tqdm over videos, with clips and clips/s; silent when disabled."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="video", disable=not enabled, smoothing=0.1,
                        dynamic_ncols=True)
        self.clips, self.start = 0, time.perf_counter()

    def __call__(self, videos: int, clips: int) -> None:
        self.clips += clips
        rate = self.clips / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(clips=self.clips, clips_per_s=f"{rate:.2f}", refresh=False)
        self.bar.update(videos)

    def close(self) -> float:
        self.bar.close()
        return time.perf_counter() - self.start


def _run_inline(cfg, job, todo, enc, progress) -> dict:
    """{chunk name: failure reason} after running `todo` chunks in this process."""
    failures = {}
    for chunk in todo:
        try:
            _chunk_run(cfg, chunk, enc, job["labels"], job["digest"], progress).run()
        except Exception as e:  # noqa: BLE001 - reported in the manifest, the run goes on
            failures[_name(chunk)] = f"{type(e).__name__}: {e}"
    return failures


def _name(chunk: dict) -> str:
    return f"{chunk['split']}/{chunk['number']:06d}"


def _run_pool(cfg, job, todo, progress) -> dict:
    """Like _run_inline in `cfg.workers` spawned processes. A chunk whose worker dies is
    retried once in a fresh pool (the crash may have been a neighbour's)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fork after torch threads exist can deadlock
    queue = ctx.Queue()
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.workers)
    failures, attempts, remaining = {}, {}, list(todo)
    while remaining:
        crashed = _pool_pass(ctx, queue, cfg, job, remaining, threads, progress, failures)
        for chunk in crashed:
            attempts[_name(chunk)] = attempts.get(_name(chunk), 0) + 1
        remaining = [c for c in crashed if attempts[_name(c)] < 2]
        for chunk in crashed:
            if attempts[_name(chunk)] >= 2:
                failures[_name(chunk)] = "its worker process died twice (crash or killed)"
    return failures


def _pool_pass(ctx, queue, cfg, job, chunks, threads, progress, failures) -> list[dict]:
    """Run `chunks` in one pool; record errors in `failures`; return the chunks whose worker
    died (a broken pool fails every chunk it still held)."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(max_workers=min(cfg.workers, len(chunks)), mp_context=ctx,
                               initializer=_init_worker, initargs=(cfg, job, queue, threads))
    crashed = []
    try:
        pending = {pool.submit(_worker_chunk, c): c for c in chunks}
        while pending:
            done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(queue, progress)
            for future in done:
                chunk = pending.pop(future)
                try:
                    future.result()
                except BrokenProcessPool:
                    crashed.append(chunk)
                except Exception as e:  # noqa: BLE001 - reported, the run goes on
                    failures[_name(chunk)] = f"{type(e).__name__}: {e}"
        _drain(queue, progress)
    finally:
        _stop(pool)
    return crashed


def _drain(queue, progress) -> None:
    import queue as queue_module

    while True:
        try:
            progress(*queue.get_nowait())
        except queue_module.Empty:
            return


def _stop(pool) -> None:
    """Shut the pool down; on an interruption (Ctrl-C) also end workers still writing, so no
    process keeps working on chunks after this run has returned."""
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=10)


# -- manifest --------------------------------------------------------------------------------
def build_manifest(plan: dict, records: dict, failures: dict) -> dict:
    """Counts per split and class, label map, shards, and every skipped input with why."""
    names = {v: k for k, v in plan["label_map"].items()}
    splits: dict = {}
    per_class: dict = {}
    skipped = [{"source": r["source"], "split": r["split"], "reason": r["reason"],
                "clips_kept": 0} for r in plan["rejected"]]
    shards: dict = {"tokens": {}, "raw": {}}
    for chunk in plan["chunks"]:
        split, record = chunk["split"], records.get(_name(chunk))
        counts = splits.setdefault(split, {"videos": 0, "videos_with_clips": 0, "clips": 0,
                                           "shards": 0, "raw_shards": 0, "failed_chunks": 0})
        counts["videos"] += len(chunk["inputs"])
        if record is None:
            counts["failed_chunks"] += 1
            continue
        for item in record["files"]:
            shards[item["kind"]].setdefault(split, []).append(item["path"])
            counts["shards" if item["kind"] == "tokens" else "raw_shards"] += 1
        for r in record["inputs"]:
            counts["clips"] += r["clips"]
            counts["videos_with_clips"] += r["clips"] > 0
            if r["label_name"] is not None:
                by_class = per_class.setdefault(split, {})
                by_class[r["label_name"]] = by_class.get(r["label_name"], 0) + r["clips"]
            if r["error"]:
                skipped.append({"source": r["source"], "split": r["split"],
                                "reason": r["error"], "clips_kept": r["clips"]})
    return {"format": "nbp_mega token shards: <key>.tokens.npy [t, h, w] + <key>.json "
                      "(+ <key>.text.npy int32 text ids)",
            "complete": not failures, "options": plan["options"],
            "label_map": plan["label_map"], "classes": [names[k] for k in sorted(names)],
            "counts": splits, "clips_per_class": per_class,
            "shards": {k: v for k, v in shards.items() if v},
            "skipped": skipped, "failed_chunks": dict(sorted(failures.items()))}


def exit_code(manifest: dict) -> int:
    if manifest["failed_chunks"]:
        return EXIT_FAILED
    return EXIT_SKIPPED if manifest["skipped"] else EXIT_OK


# -- the whole run ---------------------------------------------------------------------------
def run_preprocess(cfg: PreprocessConfig, *, progress: bool = False) -> tuple[dict, int]:
    """Plan (or resume), run the unfinished chunks, write OUT/manifest.json.
    Returns (manifest, exit code); see the module docstring."""
    cfg.check()
    try:
        enc = load_encoders(cfg)
    except (ValueError, OSError) as e:  # TokenizerError / TextTokenizerError are ValueErrors
        raise PreprocessError(f"cannot load a tokenizer: {e}") from None
    plan = build_plan(cfg, enc)
    if not plan["chunks"]:
        raise PreprocessError(f"no usable input in {cfg.input} ({len(plan['rejected'])} "
                              f"rejected, e.g. {plan['rejected'][:1]})")
    with _exclusive(cfg.output):
        write_or_check_plan(cfg.output, plan)
        return _run_plan(cfg, plan, enc, progress)


def _run_plan(cfg: PreprocessConfig, plan: dict, enc: Encoders, progress: bool):
    # Work folders of an interrupted run: its chunks are redone (or were published) anyway.
    shutil.rmtree(os.path.join(cfg.output, PARTIAL_DIR), ignore_errors=True)
    digest = plan_digest(plan)
    records = {_name(c): completed_record(cfg.output, c["split"], c["number"], digest)
               for c in plan["chunks"]}
    todo = [c for c in plan["chunks"] if records[_name(c)] is None]
    bar = _Progress(sum(len(c["inputs"]) for c in todo), progress)
    try:
        if cfg.workers == 0:
            failures = _run_inline(cfg, _job(plan), todo, enc, bar)
        else:
            failures = _run_pool(cfg, _job(plan), todo, bar)
    finally:
        seconds = bar.close()
    for chunk in todo:
        records[_name(chunk)] = completed_record(cfg.output, chunk["split"], chunk["number"],
                                                 digest)
    with contextlib.suppress(OSError):  # left only if a chunk failed midway
        os.rmdir(os.path.join(cfg.output, PARTIAL_DIR))
    manifest = build_manifest(plan, records, failures)
    write_json_atomic(os.path.join(cfg.output, "manifest.json"), manifest)
    manifest["run"] = {"chunks_done_now": len(todo) - len(failures),
                       "chunks_resumed": len(plan["chunks"]) - len(todo),
                       "seconds": round(seconds, 3), "clips_now": bar.clips,
                       "clips_per_s": round(bar.clips / max(seconds, 1e-9), 3)}
    return manifest, exit_code(manifest)
