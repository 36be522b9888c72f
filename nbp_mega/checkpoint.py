"""Crash-safe checkpoints: DeepSpeed engine state + ours, a `latest` pointer, keep-last-N.

Layout of <run_dir>/checkpoints:
    step_00000100/          DeepSpeed files (model, ZeRO optimizer shards, LR scheduler)
        trainer_state.json  step, consumed samples, data position, resolved config
        rng/rank_00000.pt   RNG states of every rank (python, numpy, torch, cuda)
    latest                  name of the newest complete checkpoint
A checkpoint is written under `<name>.partial` and renamed only once every rank has finished,
then `latest` is replaced atomically: a crash mid-save leaves the last good one untouched.
Assumes <run_dir> is on a file system all ranks share (as usual on clusters).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist

from nbp_mega.parallel.deepspeed import load_universal_checkpoint

log = logging.getLogger("nbp_mega.checkpoint")
_NAME = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


UNIVERSAL = "universal"  # sub-folder of a checkpoint: DeepSpeed's layout-free copy


class Checkpointer:
    def __init__(self, run_dir: str, *, keep_last: int, rank: int):
        self.dir = os.path.join(run_dir, "checkpoints")
        self.keep_last, self.rank = keep_last, rank
        # saved with DeepSpeed's files (parallel.deepspeed.declare_tp_layout: how to reshard)
        self.client_state: dict = {}

    def latest(self) -> str | None:
        """Name of the newest complete checkpoint, or None for a fresh run."""
        path = os.path.join(self.dir, "latest")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            name = f.read().strip()
        if not _NAME.match(name) or not os.path.isdir(os.path.join(self.dir, name)):
            raise RuntimeError(f"{path} names {name!r}, which is not a complete checkpoint "
                               f"in {self.dir}; fix or remove the 'latest' file")
        return name

    def save(self, engine, step: int, state: dict) -> str:
        """Save engine + `state` (JSON-able) + this rank's RNG as checkpoint `step`."""
        name = f"step_{step:08d}"
        partial = f"{name}.partial"
        if self.rank == 0 and os.path.exists(os.path.join(self.dir, partial)):
            shutil.rmtree(os.path.join(self.dir, partial))  # left by a crashed save
        dist.barrier()
        engine.save_checkpoint(self.dir, tag=partial, save_latest=False,
                               client_state=self.client_state)
        rng_dir = os.path.join(self.dir, partial, "rng")
        os.makedirs(rng_dir, exist_ok=True)
        torch.save(rng_state(), os.path.join(rng_dir, f"rank_{self.rank:05d}.pt"))
        if self.rank == 0:
            _write_atomic(os.path.join(self.dir, partial, "trainer_state.json"),
                          json.dumps(state, indent=1))
        dist.barrier()  # every rank's files are on disk
        if self.rank == 0:
            final = os.path.join(self.dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(os.path.join(self.dir, partial), final)
            _write_atomic(os.path.join(self.dir, "latest"), name)
            self._prune()
        dist.barrier()
        log.info("saved checkpoint %s", os.path.join(self.dir, name))
        return name

    def make_universal(self, name: str, convert, *, poll_seconds: float = 5.0,
                       report_every: float = 60.0) -> None:
        """Give checkpoint `name` a universal copy (name/universal) that loads on any dp and
        any tensor-parallel size.

        Rank 0 converts once (`convert(src, dst)`, into a partial folder renamed when done).
        The others wait on the file system, not in a collective: a 3B ZeRO-3 checkpoint takes
        longer than the collective timeout. They log progress and fail with rank 0's error.
        """
        final = os.path.join(self.dir, name, UNIVERSAL)
        partial, failed = f"{final}.partial", f"{final}.failed"
        todo = not os.path.isdir(final)
        if self.rank == 0 and todo:  # leftovers of an attempt that crashed, before anyone looks
            shutil.rmtree(partial, ignore_errors=True)
            if os.path.exists(failed):
                os.remove(failed)
        dist.barrier()
        if self.rank == 0:
            if todo:
                self._convert(os.path.join(self.dir, name), partial, final, failed, convert)
        else:
            _wait_for_conversion(final, partial, failed, poll_seconds, report_every)
        dist.barrier()  # all ranks are past the wait: quick

    def _convert(self, src: str, partial: str, final: str, failed: str, convert) -> None:
        log.info("converting %s to a universal checkpoint for another parallel layout", src)
        start = time.monotonic()
        try:
            convert(src, partial)
        except BaseException:
            _write_atomic(failed, traceback.format_exc())  # the waiting ranks stop with it
            raise
        os.rename(partial, final)
        log.info("universal checkpoint %s written in %.0f s", final, time.monotonic() - start)

    def load(self, engine, name: str, *, universal: bool = False) -> dict:
        """Restore engine and RNG from checkpoint `name`; return the trainer state."""
        path = os.path.join(self.dir, name)
        if universal:
            load_path = load_universal_checkpoint(engine, os.path.join(path, UNIVERSAL))
        else:
            load_path, _ = engine.load_checkpoint(self.dir, tag=name, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        rng_file = os.path.join(path, "rng", f"rank_{self.rank:05d}.pt")
        if os.path.exists(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning("no RNG state for rank %d in %s (different world size?); dropout "
                        "streams restart from the seed", self.rank, path)
        log.info("resumed from %s (step %d)", path, state["step"])
        return state

    def _prune(self) -> None:
        names = sorted(n for n in os.listdir(self.dir) if _NAME.match(n))
        for old in names[: max(len(names) - self.keep_last, 0)]:
            shutil.rmtree(os.path.join(self.dir, old))


def _folder_size(path: str) -> tuple[int, int]:
    """(files, bytes) below `path` so far."""
    files = size = 0
    for root, _, names in os.walk(path):
        for n in names:
            files += 1
            with contextlib.suppress(FileNotFoundError):  # moved by the converter meanwhile
                size += os.path.getsize(os.path.join(root, n))
    return files, size


def _wait_for_conversion(final: str, partial: str, failed: str, poll_seconds: float,
                         report_every: float) -> None:
    """Poll until rank 0 has renamed `partial` to `final`, or raise its recorded failure."""
    start = last_report = time.monotonic()
    while not os.path.isdir(final):
        if os.path.exists(failed):
            with open(failed) as f:
                raise RuntimeError(f"rank 0 failed to convert the checkpoint to {final}:\n"
                                   f"{f.read()}")
        if time.monotonic() - last_report >= report_every:
            files, size = _folder_size(partial)
            log.warning("waiting for rank 0's universal conversion (%.0f min so far: %d files, "
                        "%.2f GB written in %s)", (time.monotonic() - start) / 60, files,
                        size / 1e9, partial)
            last_report = time.monotonic()
        time.sleep(poll_seconds)
