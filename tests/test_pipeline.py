"""Pipeline-parallel training (DeepSpeed's pipeline engine, gloo): the losses of one stage,
exact resume after kill -9, and resume on another number of stages.

The reference is one process with ZeRO-1 and 4 accumulation micro-batches of 2 clips (the
same micro-batches a 2-stage pipeline runs). Every run here logs the reference's batch
digests, and its losses and gradient norms to fp32 rounding.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from nbp_mega.export.weights import open_checkpoint
from nbp_mega.metrics import read_metrics
from tests.test_train import (
    JOB_VARS,
    LAUNCH,
    ROOT,
    assert_resumed,
    metrics_lines,
    overrides,
    run,
    shards,  # noqa: F401 (fixture)
    train_records,
)

pytestmark = pytest.mark.distributed
STEPS = 16
COMMON = [f"train.steps={STEPS}", "train.eval_every=8", "parallel.zero_stage=1",
          "train.micro_batch=2", "train.save_every=4", "log.block_loss_every=4"]


def pipeline_overrides(shards, run_dir, *extra):  # noqa: F811
    return overrides(shards, run_dir, *COMMON, *extra)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):  # noqa: F811
    """PP=1, one process: the run every pipeline run must reproduce."""
    out = tmp_path_factory.mktemp("pp_reference") / "run"
    run([sys.executable, "-m", "nbp_mega.train", f"{ROOT}/configs/tiny.yaml",
         *pipeline_overrides(shards, out)], cwd=out.parent)
    return out


@pytest.fixture(scope="module")
def pp2_full(shards, tmp_path_factory):  # noqa: F811
    """PP=2 on 2 ranks, uninterrupted."""
    out = tmp_path_factory.mktemp("pp2_full") / "run"
    run([*LAUNCH, *pipeline_overrides(shards, out, "parallel.pipeline=2")], cwd=out.parent,
        NPROC_PER_NODE="2")
    return out


def assert_same_run(reference, other, *, rel=1e-5, since=0):
    a, b = train_records(reference), train_records(other)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [r["batch_digest"] for r in a] == [r["batch_digest"] for r in b]
    for ra, rb in zip(a[since:], b[since:], strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=rel), ra["step"]
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=10 * rel), ra["step"]
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-9)
    va, vb = (read_metrics(os.path.join(r, "metrics.jsonl"))[1] for r in (reference, other))
    assert [e["step"] for e in vb] == [8, 16]
    for ea, eb in zip(va, vb, strict=True):
        assert ea["val_loss"] == pytest.approx(eb["val_loss"], rel=rel)


def test_tp2_x_pp2_on_four_ranks_gives_the_losses_of_one_stage(shards, reference, tmp_path):  # noqa: F811
    """TP=2 x PP=2 (4 ranks, dp 1): megatron's TP layers inside each of the two stages, each
    stage recomputing its layers in backward (activation checkpointing; the reference does
    not, so recompute must not change a loss or gradient); the profiler's breakdown shows the
    stages' sends and receives (the bubble). Its checkpoint keeps DeepSpeed's pipeline layout
    and reads back (nbp_mega.export.weights, as the exporter, sampler and init_from do) as the
    reference's weights; the per-block loss comes from the last stage to rank 0's log."""
    out = tmp_path / "tp2pp2"
    run([*LAUNCH, *pipeline_overrides(shards, out, "parallel.tensor=2", "parallel.pipeline=2",
                                      "model.activation_checkpointing=true",
                                      "log.profile_start=2", "log.profile_steps=2")],
        cwd=tmp_path, NPROC_PER_NODE="4")
    assert_same_run(reference, out)
    for rank in range(4):  # every rank's breakdown has the time spent on the other stage
        profile = json.loads((out / "profile" / f"profile_rank{rank}.json").read_text())
        assert sum(profile["fraction"].values()) == pytest.approx(1)
        assert profile["seconds"]["pipeline"] > 0 and profile["seconds"]["matmul"] > 0
        assert profile["seconds"]["optimizer"] > 0  # DeepSpeed's step inside train_batch
    step = out / "checkpoints" / f"step_{STEPS:08d}"
    assert {f"layer_{s:02d}-model_{t:02d}-model_states.pt" for s in (0, 1) for t in (0, 1)} \
        <= set(os.listdir(step))
    state = json.loads((step / "trainer_state.json").read_text())
    assert (state["layout"]["pp"], state["layout"]["tp"], state["layout"]["dp"]) == (2, 2, 1)
    _, mine = open_checkpoint(str(out))
    _, theirs = open_checkpoint(str(reference))
    assert sorted(mine.names) == sorted(theirs.names)
    for name in theirs.names:
        a, b = theirs.read(name), mine.read(name)
        assert a.shape == b.shape and (a - b).abs().max() < 1e-4, name
    blocks, ref_blocks = block_losses(out), block_losses(reference)
    assert sorted(blocks) == sorted(ref_blocks) == list(range(4, STEPS + 1, 4))
    for step, values in ref_blocks.items():
        assert len(values) == 8  # 2 latent frames x 4 rows
        assert blocks[step] == pytest.approx(values, rel=1e-5), step


def block_losses(run_dir) -> dict[int, list[float]]:
    """step -> the loss of each target block position, from the run's TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    out: dict[int, list[float]] = {}
    for tag in sorted(t for t in events.Tags()["scalars"] if t.startswith("loss_by_block/")):
        for event in events.Scalars(tag):
            out.setdefault(event.step, []).append(event.value)
    return out


def test_kill_9_under_pp2_resumes_exactly(shards, reference, pp2_full, tmp_path):  # noqa: F811
    """PP=2 on 2 ranks gives the reference's losses; killed with SIGKILL (the launcher and
    both ranks at once) once a checkpoint exists and started again, it resumes from that
    checkpoint and the whole run is the uninterrupted PP=2 run's, bit for bit."""
    assert_same_run(reference, pp2_full)
    out = tmp_path / "pp2"
    cmd = [*LAUNCH, *pipeline_overrides(shards, out, "parallel.pipeline=2")]
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable, NPROC_PER_NODE="2")
    job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # torchrun starts each rank in a session of its own: kill the whole tree at once
    job_processes = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
    for process in job_processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    job.wait(timeout=60)
    assert job.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    alive = psutil.wait_procs(job_processes, timeout=30)[1]
    assert not alive, f"{alive} outlived the kill"
    killed_at = int(latest.read_text().strip().split("_")[1])
    assert killed_at < STEPS
    before = [line for line in metrics_lines(out) if json.loads(line)["step"] <= killed_at]
    proc = run(cmd, cwd=tmp_path, NPROC_PER_NODE="2")
    assert f"resumed from {out / 'checkpoints' / f'step_{killed_at:08d}'}" in proc.stderr
    assert metrics_lines(out)[: len(before)] == before
    for ra, rb in zip(train_records(pp2_full), train_records(out), strict=True):
        for key in ("loss", "lr", "grad_norm", "batch_digest"):
            assert ra[key] == rb[key], (ra["step"], key)
    val = [read_metrics(os.path.join(r, "metrics.jsonl"))[1] for r in (pp2_full, out)]
    assert [e["val_loss"] for e in val[0]] == [e["val_loss"] for e in val[1]]


def test_resume_on_another_number_of_stages(shards, reference, pp2_full, tmp_path):  # noqa: F811
    """The PP=2 run's checkpoint of step 8 (its later ones removed, as if it had been killed
    then) resumed at PP=1 and stopped after step 12, then resumed at PP=2 again: each change
    goes through DeepSpeed's universal checkpoint, with model-wide names, the Adam moments
    along. The whole run is still the reference's."""
    out = tmp_path / "run"
    shutil.copytree(pp2_full, out)
    for later in (12, 16):
        shutil.rmtree(out / "checkpoints" / f"step_{later:08d}")
    (out / "checkpoints" / "latest").write_text("step_00000008")

    def launch(pp, *extra):
        extra = ("train.keep_last=5", *extra)  # the changed-at checkpoints stay to be seen
        if pp == 1:
            return run([sys.executable, "-m", "nbp_mega.train", f"{ROOT}/configs/tiny.yaml",
                        *pipeline_overrides(shards, out, *extra)], cwd=tmp_path)
        return run([*LAUNCH, *pipeline_overrides(shards, out, "parallel.pipeline=2", *extra)],
                   cwd=tmp_path, NPROC_PER_NODE="2")

    for pp, resumed_at, stop in ((1, 8, "train.stop_at=12"), (2, 12, "train.stop_at=0")):
        lines = [line for line in metrics_lines(out) if json.loads(line)["step"] <= resumed_at]
        proc = launch(pp, stop)
        assert_resumed(lines, metrics_lines(out), proc, out, resumed_at)
        assert (out / "checkpoints" / f"step_{resumed_at:08d}" / "universal").is_dir()
        state = json.loads((out / "checkpoints" / f"step_{resumed_at + 4:08d}" /
                            "trainer_state.json").read_text())
        assert state["layout"]["pp"] == pp
    assert_same_run(reference, out)
