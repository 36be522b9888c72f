"""What a run tells its user: metrics.jsonl, TensorBoard, and a rank-0 progress bar.

metrics.jsonl has one JSON line per optimizer step (step, loss, lr, grad_norm, tokens_per_s,
batch_digest, ...) and one per evaluation ({"step", "val_loss"}). On resume, lines from steps
after the checkpoint are dropped: they are recomputed, so the file reads as one clean history.
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass

import torch

from nbp_mega.config_fields import option


@dataclass
class LogConfig:
    tensorboard: bool = option(True, "write TensorBoard event files to <run_dir>/tensorboard")
    peak_tflops: float = option(0.0, "peak TFLOP/s of one device for MFU (0 = the GPU's "
                                "datasheet figure, nbp_mega/peak_flops.py; on the CPU or an "
                                "unknown GPU a matmul measured at start-up)", min=0.0)
    block_loss_every: int = option(10, "log loss per block position to TensorBoard every N "
                                   "steps", min=1)
    progress: bool = option(True, "rank-0 progress bar with ETA on stderr")
    profile_steps: int = option(0, "profile this many steps with torch.profiler and write the "
                                "time breakdown to <run_dir>/profile/ (0 = off)", min=0)
    profile_start: int = option(3, "first profiled step (after warm-up)", min=1)
    eval_config: str = option("", "evaluation YAML (configs/eval/) run on each checkpoint as "
                              "it is saved, by `python -m nbp_mega.eval --watch` beside the "
                              "training (rank 0 starts it; files in <run_dir>/eval, numbers "
                              "in <run_dir>/tensorboard/eval, its log <run_dir>/eval.log)")
    eval_poll: float = option(30.0, "log.eval_config: seconds between its looks for new "
                              "checkpoints", min=0.1)


def _timed_matmul_tflops(a: torch.Tensor, b: torch.Tensor, seconds: float) -> float:
    """TFLOP/s of a [M, K] @ b [K, N], repeated for about `seconds` (at least once); the caller
    has warmed it up."""
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    sync()
    iters, start = 0, time.perf_counter()
    while iters == 0 or time.perf_counter() - start < seconds:
        a @ b
        iters += 1
    sync()  # CUDA: the loop only queued the products; count them once they have all run
    (m, k), n = a.shape, b.shape[1]
    return 2 * m * k * n * iters / (time.perf_counter() - start) / 1e12


def measure_matmul_tflops(device: torch.device, dtype=torch.float32, n: int = 1024,
                          seconds: float = 0.5) -> float:
    """Achieved TFLOP/s of square n x n matmuls for `seconds`: a quick practical peak of this
    device (matmul_peak below takes the best of several shapes and repeats)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    return _timed_matmul_tflops(a, b, seconds)


SQUARE_GEMMS = ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096))


def matmul_peak(device: torch.device, shapes=SQUARE_GEMMS, *, dtype=torch.float32,
                repeats: int = 3, seconds: float = 0.25) -> dict:
    """The best TFLOP/s over GEMM shapes [(M, K, N), ...], each timed `repeats` times, the
    shapes in turn within each repeat (slow drift of a shared machine hits all alike; other
    load can only slow a measurement down, so the best one is the estimate of the peak).

    -> {"tflops": best, "shape": [M, K, N] of the best, "measurements": [{"m", "k", "n",
        "tflops": [one per repeat]}, ...]}
    """
    operands = {}
    for m, k, n in shapes:
        a, b = (torch.randn(*s, device=device, dtype=dtype) for s in ((m, k), (k, n)))
        a @ b  # warm-up
        operands[m, k, n] = a, b
    rates = {shape: [] for shape in operands}
    for _ in range(repeats):
        for shape, (a, b) in operands.items():
            rates[shape].append(_timed_matmul_tflops(a, b, seconds))
    best = max(rates, key=lambda shape: max(rates[shape]))
    return {"tflops": max(rates[best]), "shape": list(best),
            "measurements": [{"m": m, "k": k, "n": n, "tflops": [float(f"{x:.4g}") for x in r]}
                             for (m, k, n), r in rates.items()]}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def truncate_jsonl(path: str, last_step: int) -> None:
    """Keep only records with step <= last_step (crash-safe: write aside, then replace)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class MetricsLogger:
    """Rank 0 writes; the other ranks get a logger that does nothing."""

    def __init__(self, run_dir: str, cfg: LogConfig, *, enabled: bool, total_steps: int,
                 start_step: int):
        self.enabled = enabled
        self.cfg = cfg
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb_dir = os.path.join(run_dir, "tensorboard")
        self.tb = self.bar = None
        if not enabled:
            return
        truncate_jsonl(self.path, start_step)
        self.file = open(self.path, "a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(self.tb_dir, purge_step=start_step + 1)
        if cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, mininterval=2.0)

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def log_step(self, record: dict, block_loss: torch.Tensor | None = None) -> None:
        if not self.enabled:
            return
        self._write(record)
        step = record["step"]
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"train/{key}", value, step)
            if block_loss is not None:
                for i, value in enumerate(block_loss.tolist()):
                    self.tb.add_scalar(f"loss_by_block/{i:03d}", value, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")

    def log_eval(self, step: int, val_loss: float) -> None:
        if not self.enabled:
            return
        self._write({"step": step, "val_loss": val_loss})
        if self.tb is not None:
            self.tb.add_scalar("val/loss", val_loss, step)
        message = f"step {step}: val_loss {val_loss:.4f}"
        (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(per-step training records, evaluation records) of a metrics.jsonl."""
    train, evals = [], []
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                (evals if "val_loss" in record else train).append(record)
    return train, evals
