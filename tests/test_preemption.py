"""Leaving early without SLURM: stop signals and train.max_minutes on a 2-rank torchrun job.

One run is interrupted twice and finished by a third launch of the same command, and must
equal an uninterrupted run step for step (losses, batch digests, learning rates, gradient
norms and the final validation loss):
  1. SIGUSR1 to rank 1 only, mid-run: both ranks stop after the same step k (rank 0 never saw
     a signal), write one checkpoint and exit with the requeue code;
  2. train.max_minutes already passed at start: one step (k+1), its checkpoint, the requeue
     code; rank 0 sends itself SIGTERM in the middle of writing that checkpoint (this file
     run as the training entry point, below), and the checkpoint is still whole;
  3. the plain command again: it resumes at k+1 and runs to the end.
The uninterrupted reference run is shared with tests/cluster/test_slurm.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from nbp_mega.cluster.slurm import REQUEUE_EXIT_CODE
from nbp_mega.data.synthetic import write_synthetic_shards
from nbp_mega.metrics import read_metrics
from tests.test_train import JOB_VARS, ROOT, assert_resumed, metrics_lines, run, train_records

pytestmark = pytest.mark.distributed
STEPS = 30  # enough steps (~0.15 s each here) for a signal to land mid-run
LAUNCH = ["bash", f"{ROOT}/launch.sh", f"{ROOT}/configs/tiny.yaml"]
SAVE_SIGNAL = "NBP_TEST_SIGNAL_IN_SAVE"  # "RANK:SIGNAL" for this file's entry point


def preemption_overrides(shards, run_dir, *extra) -> list[str]:
    """The tiniest model; the only checkpoints are the stops' and the last step's."""
    return [f"run_dir={run_dir}", "model.layers=2", "model.hidden=32", "model.heads=4",
            "model.grid=[2,4,8]", "model.block_shape=[1,1,8]", "model.vocab_size=32",
            "model.num_classes=4", "model.vocab_pad_multiple=16", "model.dropout=0.1",
            f"train.steps={STEPS}", "train.global_batch=8", "train.save_every=0",
            "train.eval_every=0", "train.eval_batches=1", f"data.shards={shards}/train",
            f"data.val_shards={shards}/val", "data.num_workers=1", "log.peak_tflops=1",
            "log.progress=false", "log.tensorboard=false", "optim.warmup_steps=2",
            "parallel.timeout_minutes=2", *extra]


def _cached(tmp_path_factory, name: str, make) -> str:
    """A folder made once per test session (both test files use it)."""
    path = tmp_path_factory.getbasetemp() / name
    if not (path / ".done").exists():
        make(path)
        (path / ".done").write_text("")
    return path


def preemption_shards(tmp_path_factory):
    return _cached(tmp_path_factory, "preemption_shards", lambda out: write_synthetic_shards(
        str(out), num_train=96, num_val=16, grid=(2, 4, 8), vocab=32, classes=4,
        shard_size=16, seed=0, noise=0.02))


def reference_run(tmp_path_factory):
    """The uninterrupted 2-rank run (torchrun through launch.sh)."""
    shards = preemption_shards(tmp_path_factory)
    return _cached(tmp_path_factory, "preemption_reference", lambda out: run(
        [*LAUNCH, *preemption_overrides(shards, out)], cwd=out.parent, NPROC_PER_NODE="2"))


def assert_same_run(reference, run_dir) -> None:
    """Every step's loss, lr, gradient norm and batch, and the final validation loss."""
    a, b = train_records(reference), train_records(run_dir)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "lr", "grad_norm", "batch_digest"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    val = [read_metrics(os.path.join(d, "metrics.jsonl"))[1] for d in (reference, run_dir)]
    assert val[0] == val[1] and len(val[0]) == 1


def checkpoints(run_dir) -> list[str]:
    """The checkpoints written (complete or not: a cut-short save leaves a .partial)."""
    return sorted(n for n in os.listdir(run_dir / "checkpoints") if n.startswith("step_"))


def start(cmd, cwd, **env) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if k not in JOB_VARS}
    full_env.update({"OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
                     "PYTHONPATH": ROOT, **env})
    return subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the job did not end in {timeout} s (ranks that disagree on "
                             f"the stop step hang in a collective):\n{err[-6000:]}") from None
    return proc.returncode, out + err


def assert_requeue_exit(returncode: int, output: str) -> None:
    """torchrun fails once a worker exits non-zero, and names that first failure's exit code:
    the requeue code. Workers still leaving then get its SIGTERM (-15) or exit 75 too."""
    assert returncode != 0, output[-3000:]
    _, _, root_cause = output.partition("Root Cause (first observed failure):")
    assert re.search(rf"exitcode\s*:\s*{REQUEUE_EXIT_CODE}\b", root_cause), output[-6000:]
    codes = {int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", output)}
    assert codes <= {REQUEUE_EXIT_CODE, -signal.SIGTERM}, output[-6000:]


def wait_for_steps(run_dir, n: int, proc=None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while not (path.exists() and len(path.read_text().splitlines()) >= n):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended before step {n}:\n{finish(proc)[1][-6000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no step {n} in {path} after {timeout} s")
        time.sleep(0.05)


def worker_pid(torchrun: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker of `rank` (not one of its DataLoader workers)."""
    import psutil

    for child in psutil.Process(torchrun.pid).children():
        if child.environ().get("RANK") == str(rank):
            return child.pid
    raise AssertionError(f"torchrun {torchrun.pid} has no worker of rank {rank}")


def test_stopped_twice_the_run_continues_exactly(tmp_path_factory, tmp_path):
    shards = preemption_shards(tmp_path_factory)
    reference = reference_run(tmp_path_factory)
    run_dir = tmp_path / "run"

    # 1. SIGUSR1 to rank 1 mid-run.
    proc = start([*LAUNCH, *preemption_overrides(shards, run_dir)], tmp_path,
                 NPROC_PER_NODE="2")
    wait_for_steps(run_dir, 3, proc)
    os.kill(worker_pid(proc, 1), signal.SIGUSR1)
    returncode, output = finish(proc)
    assert_requeue_exit(returncode, output)
    k = len(train_records(run_dir))
    assert 3 <= k < STEPS - 2
    assert checkpoints(run_dir) == [f"step_{k:08d}"]  # one checkpoint
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{k:08d}"
    assert output.count(f"stopping after step {k} of {STEPS}: a stop signal (SIGUSR1/SIGTERM) "
                        "reached 1 of 2 ranks") == 2, output[-6000:]

    # 2. train.max_minutes passed before the first step; SIGTERM to rank 0 while it saves.
    before = metrics_lines(run_dir)
    proc = start([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node=2", "-m", "tests.test_preemption",
                  f"{ROOT}/configs/tiny.yaml",
                  *preemption_overrides(shards, run_dir, "train.max_minutes=0.0001")], ROOT,
                 **{SAVE_SIGNAL: "0:SIGTERM"})
    returncode, output = finish(proc)
    assert "rank 0 signalled itself while saving (SIGTERM)" in output, output[-6000:]
    assert_requeue_exit(returncode, output)
    assert_resumed(before, metrics_lines(run_dir), SimpleNamespace(stderr=output), run_dir, k)
    assert output.count(f"stopping after step {k + 1} of {STEPS}: train.max_minutes=0.0001 "
                        "passed") == 2, output[-6000:]
    # the save was not cut short (no .partial, `latest` moved), and nothing followed it
    assert checkpoints(run_dir) == [f"step_{k:08d}", f"step_{k + 1:08d}"]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{k + 1:08d}"
    assert len(train_records(run_dir)) == k + 1

    # 3. The same command again: it loads the checkpoint written under the signal.
    before = metrics_lines(run_dir)
    proc = run([*LAUNCH, *preemption_overrides(shards, run_dir)], cwd=tmp_path,
               NPROC_PER_NODE="2")
    assert_resumed(before, metrics_lines(run_dir), proc, run_dir, k + 1)
    assert_same_run(reference, run_dir)


def _signal_while_saving() -> None:
    """Entry point of stage 2: nbp_mega.train, with the rank named in SAVE_SIGNAL sending itself
    the signal in the middle of its first checkpoint save (after DeepSpeed's files, before the RNG
    state, the trainer state and the rename to the final name)."""
    import nbp_mega.checkpoint as checkpoint
    from nbp_mega.train import main

    rank, name = os.environ[SAVE_SIGNAL].split(":")
    original, sent = checkpoint.rng_state, []

    def rng_state():
        if os.environ["RANK"] == rank and not sent:
            sent.append(name)
            print(f"rank {rank} signalled itself while saving ({name})", file=sys.stderr,
                  flush=True)
            os.kill(os.getpid(), getattr(signal, name))
        return original()

    checkpoint.rng_state = rng_state
    main(sys.argv[1:])


if __name__ == "__main__":
    _signal_while_saving()
