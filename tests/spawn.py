"""A small helper to run a function on several local ranks (gloo on CPU) in tests.

    results = run_distributed(worker, world_size=2, args=(path,))

`worker` must be importable (module level). Each rank gets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT like torchrun would set, one intra-op thread, and returns a
picklable value; results come back ordered by rank. A rank that raises, dies or hangs past
`timeout` fails the test with that rank's traceback, and the other ranks are killed.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import time
import traceback

from nbp_mega.parallel.dims import free_port


def _entry(fn, rank, world_size, port, args, results, env):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), **(env or {})})
    try:
        import torch

        torch.set_num_threads(1)
        # Sent as bytes: tensors pickled directly travel through shared memory that vanishes
        # when this process exits before the parent has read them.
        buffer = io.BytesIO()
        torch.save(fn(*args), buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # report everything, including SystemExit from a CLI
        results.put((rank, False, traceback.format_exc()))


def _load(data: bytes):
    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def run_distributed(fn, world_size: int, args: tuple = (), *, timeout: float = 300,
                    env: dict | None = None) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, results, env))
             for r in range(world_size)]
    for p in procs:
        p.start()
    out, deadline = {}, time.monotonic() + timeout
    try:
        while len(out) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a rank died with exit code {dead[0].exitcode}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(out))} "
                                       f"did not finish in {timeout} s") from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = _load(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world_size)]
