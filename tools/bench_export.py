"""Memory and time of tools/convert_to_hf.py on a large checkpoint, against the weights' size.

    python tools/bench_export.py --json [--size 700m] [--zero-stage 3] [--dtype fp32]
        [--work DIR] [--keep]

Makes a checkpoint the way training writes it (random weights, nbp_mega's model at --size on
the CPU, a one-process DeepSpeed engine at --zero-stage, nbp_mega.checkpoint.Checkpointer:
DeepSpeed's files + trainer_state.json) in --work (default: a temporary folder, removed
after), then runs tools/convert_to_hf.py on it in a child process and reads the child's peak
resident memory (getrusage of the waited child: ru_maxrss, which counts every page it touched,
memory-mapped checkpoint pages included), its peak anonymous memory (RssAnon polled from /proc:
what it allocated) and wall time.

--json prints one JSON list: {"shape": "machine", cpu, threads, torch, load, quiet} then
{"shape": "export", size, parameters, zero_stage, dtype, checkpoint_bytes, weight_bytes
(the exported tensors), peak_rss_bytes, peak_rss_over_weights, peak_anon_bytes,
peak_anon_over_weights, seconds, files}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_checkpoint(run_dir: str, size: str, zero_stage: int) -> int:
    """A step-0 checkpoint of a random `size` model in run_dir; returns its parameter count."""
    from nbp_mega.checkpoint import Checkpointer
    from nbp_mega.config import dump_config, load_config, to_dict
    from nbp_mega.model import NBPTransformer
    from nbp_mega.optim import build_optimizer, build_scheduler
    from nbp_mega.parallel.deepspeed import build_engine, declare_tp_layout
    from nbp_mega.parallel.dims import init_parallel, shutdown_parallel
    from nbp_mega.parallel.layers import TensorParallel

    cfg = load_config(os.path.join(ROOT, "configs/nbp_700m.yaml"),
                      [f"model.size={size}", "model.layers=0", "model.hidden=0",
                       "model.heads=0", f"parallel.zero_stage={zero_stage}",
                       f"run_dir={run_dir}", "train.global_batch=1", "train.micro_batch=1"])
    dims = init_parallel(cfg.parallel)
    torch.manual_seed(0)
    model = NBPTransformer(cfg.model, TensorParallel(dims, init_std=cfg.model.init_std))
    params = sum(p.numel() for p in model.parameters())
    client_state = declare_tp_layout(model)  # before ZeRO-3 partitions the parameters
    optimizer = build_optimizer(model, cfg.optim)
    engine = build_engine(model, optimizer, build_scheduler(optimizer, cfg.optim,
                                                            cfg.train.steps), cfg, dims)
    dump_config(cfg, os.path.join(run_dir, "config.yaml"))
    checkpointer = Checkpointer(run_dir, keep_last=1, rank=0)
    checkpointer.client_state = client_state
    layout = {"tp": 1, "dp": 1, "zero_stage": zero_stage, "precision": cfg.train.precision}
    checkpointer.save(engine, 0, {"step": 0, "config": to_dict(cfg), "layout": layout})
    shutdown_parallel()
    return params


class PeakMemory:
    """The peak anonymous resident memory (RssAnon: what the process allocated, not the
    checkpoint's memory-mapped file pages, which the kernel can drop) of a running process,
    polled from /proc every 20 ms in a thread."""

    def __init__(self, pid: int):
        self.pid, self.peak_anon, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            self.peak_anon = max(self.peak_anon, int(line.split()[1]) * 1024)
            except OSError:  # it ended
                return
            self._stop.wait(0.02)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
               for f in files)


def main(argv=None) -> int:
    from nbp_mega.machine_load import LoadWatch

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="700m")
    p.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--work", default=None, help="folder for the checkpoint and the export")
    p.add_argument("--keep", action="store_true", help="keep --work's files")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="bench_export_")
    watch = LoadWatch()
    try:
        run_dir = os.path.join(work, "run")
        # the checkpoint is made in a process of its own: its memory is not the converter's
        code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
                f"import bench_export as b; print(b.make_checkpoint({run_dir!r}, "
                f"{args.size!r}, {args.zero_stage}))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "WORLD_SIZE": "1"})
        if proc.returncode:
            sys.stderr.write(proc.stderr[-4000:])
            return 1
        params = int(proc.stdout.strip().splitlines()[-1])
        watch.sample("checkpoint made")
        out = os.path.join(work, "hf")
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools/convert_to_hf.py"),
                                  run_dir, out, "--dtype", args.dtype, "--no-progress"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with PeakMemory(child.pid) as memory:
            stdout, stderr = child.communicate()
        seconds = time.perf_counter() - start
        if child.returncode:
            sys.stderr.write(stderr[-4000:])
            return 1
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        watch.sample("exported")
        summary = json.loads(stdout)
        weights = summary["hf"]["weight_bytes"]
        ckpt = os.path.join(run_dir, "checkpoints")
        load = watch.summary()
        records = [{"shape": "machine", "cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load": load, "quiet": load["quiet"]},
                   {"shape": "export", "size": args.size, "parameters": params,
                    "zero_stage": args.zero_stage, "dtype": args.dtype,
                    "checkpoint_bytes": folder_bytes(ckpt), "weight_bytes": weights,
                    "peak_rss_bytes": peak, "peak_rss_over_weights": round(peak / weights, 3),
                    "peak_anon_bytes": memory.peak_anon,
                    "peak_anon_over_weights": round(memory.peak_anon / weights, 3),
                    "seconds": round(seconds, 2), "files": summary["hf"]["files"]}]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(records, indent=1) if args.json else
          "\n".join(f"{k}: {v}" for k, v in records[1].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
