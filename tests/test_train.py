"""Training end to end: the launchers as users type them, ZeRO-3 = ZeRO-0, exact resume.

Each run is a real job in its own processes (the DeepSpeed launcher, torchrun, plain python)
on a tiny model and synthetic shards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from nbp_mega.data.synthetic import write_synthetic_shards
from nbp_mega.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_shards(str(out), num_train=96, num_val=16, grid=(2, 4, 8), vocab=32,
                           classes=4, shard_size=16, seed=0, noise=0.02)
    return out


@pytest.fixture(scope="module")
def tp1_runs(shards, tmp_path_factory):
    """(full, stopped): the default layout (ZeRO-3, TP=1 on 2 ranks) run 6 steps
    uninterrupted, and run again stopped after step 3 (checkpoint and validation loss of step
    3). Shared: tests that resume `stopped` resume a copy of it."""
    tmp = tmp_path_factory.mktemp("tp1_runs")
    full, stopped = tmp / "full", tmp / "stopped"
    run([*LAUNCH, *overrides(shards, full)], cwd=tmp, NPROC_PER_NODE="2")
    run([*LAUNCH, *overrides(shards, stopped, "train.stop_at=3")], cwd=tmp, NPROC_PER_NODE="2")
    return full, stopped


TP2 = ["parallel.tensor=2", "parallel.zero_stage=3", "model.loss_chunk=24",
       "log.profile_start=2", "log.profile_steps=2"]


@pytest.fixture(scope="module")
def tp2_runs(shards, tmp_path_factory):
    """(full, stopped) as tp1_runs, at tensor parallelism 2 (dp 1) with the loss in chunks
    of 24 positions (recomputed in backward) and steps 2-3 profiled."""
    tmp = tmp_path_factory.mktemp("tp2_runs")
    full, stopped = tmp / "full", tmp / "stopped"
    run([*LAUNCH, *overrides(shards, full, *TP2)], cwd=tmp, NPROC_PER_NODE="2")
    run([*LAUNCH, *overrides(shards, stopped, *TP2, "train.stop_at=3")], cwd=tmp,
        NPROC_PER_NODE="2")
    return full, stopped


def resumable_copy(stopped, run_dir):
    shutil.copytree(stopped, run_dir)
    return run_dir


def overrides(shards, run_dir, *extra) -> list[str]:
    return [f"run_dir={run_dir}", "model.layers=2", "model.hidden=32", "model.heads=4",
            "model.grid=[2,4,8]", "model.block_shape=[1,1,8]", "model.vocab_size=32",
            "model.num_classes=4", "model.vocab_pad_multiple=16", "train.steps=6",
            "train.global_batch=8", "train.save_every=0", "train.eval_every=3",
            "train.eval_batches=1", f"data.shards={shards}/train",
            f"data.val_shards={shards}/val", "data.num_workers=1", "log.peak_tflops=1",
            "log.progress=false", "optim.warmup_steps=2", *extra]


# What a job of ours leaves in os.environ when tests run one in this process.
JOB_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCH = ["bash", f"{ROOT}/launch.sh", f"{ROOT}/configs/tiny.yaml"]  # torchrun, NPROC_PER_NODE


def run(cmd: list[str], cwd, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in JOB_VARS}
    full_env.update({"OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **env})
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def train_records(run_dir) -> list[dict]:
    return read_metrics(os.path.join(run_dir, "metrics.jsonl"))[0]


def metrics_lines(run_dir) -> list[str]:
    return (run_dir / "metrics.jsonl").read_text().splitlines()


def assert_resumed(before: list[str], after: list[str], proc, run_dir, step: int) -> None:
    """The restart loaded checkpoint `step` rather than starting over: the rows up to it are
    untouched, timings included (a rerun from scratch recomputes the same losses but never
    the same step_seconds), and the log names the checkpoint."""
    assert after[:len(before)] == before
    assert json.loads(after[len(before)])["step"] == step + 1
    checkpoint = run_dir / "checkpoints" / f"step_{step:08d}"
    assert f"resumed from {checkpoint} (step {step})" in proc.stderr


def test_zero3_on_two_ranks_matches_zero0_in_one_process(shards, tp1_runs, tp2_runs, tmp_path):
    """Same global batch of 8 everywhere: ZeRO-3 over 2 ranks (micro batch 4), ZeRO-0 in one
    process with 2 accumulation steps, ZeRO-3 with the optimizer offloaded to the CPU, bf16,
    and tensor parallelism 2 with ZeRO-3 (torchrun through `bash launch.sh`; the DeepSpeed
    launcher with a hostfile: tests/cluster/test_multihost.py, over real ssh). The offload
    and TP=2 runs compute the loss in chunks of positions (model.loss_chunk, recomputed in
    backward; the others in one piece).
    """
    runs = {name: tmp_path / name for name in ("z0", "offload", "bf16")}
    runs["z3"], runs["tp2"] = tp1_runs[0], tp2_runs[0]
    single = {"z0": ["parallel.zero_stage=0", "train.micro_batch=4"],
              "offload": ["parallel.zero_stage=3", "parallel.offload_optimizer=true",
                          "model.loss_chunk=40"],
              "bf16": ["parallel.zero_stage=3", "train.precision=bf16"]}
    for name, extra in single.items():
        run([sys.executable, "-m", "nbp_mega.train", f"{ROOT}/configs/tiny.yaml",
             *overrides(shards, runs[name], *extra)], cwd=tmp_path)
    records = {name: train_records(path) for name, path in runs.items()}
    a = records["z3"]
    assert [r["step"] for r in a] == list(range(1, 7))
    for name, rel in (("z0", 1e-5), ("offload", 1e-5), ("tp2", 1e-5), ("bf16", 1e-2)):
        b = records[name]
        assert [r["step"] for r in b] == list(range(1, 7)), name
        for ra, rb in zip(a, b, strict=True):
            assert ra["batch_digest"] == rb["batch_digest"]  # same data whatever the dp size
            assert ra["loss"] == pytest.approx(rb["loss"], rel=rel), (name, ra["step"])
            assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-9)
    assert a[-1]["loss"] < a[0]["loss"]
    for key in ("grad_norm", "tokens_per_s", "mfu", "memory_gb"):
        assert a[0][key] > 0
    assert (runs["z3"] / "checkpoints" / "latest").read_text() == "step_00000006"
    assert os.listdir(runs["z3"] / "tensorboard")
    for rank in (0, 1):  # profiled steps 2-3: the time breakdown of each rank
        with open(runs["tp2"] / "profile" / f"profile_rank{rank}.json") as f:
            profile = json.load(f)
        assert profile["steps"] == 2 and sum(profile["fraction"].values()) == pytest.approx(1)
        seconds = profile["seconds"]
        assert seconds["matmul"] > 0 and seconds["attention"] > 0
        assert seconds["communication"] > 0 and seconds["optimizer"] > 0
        assert (runs["tp2"] / "profile" / f"trace_rank{rank}.json").stat().st_size > 0
    evals = read_metrics(os.path.join(runs["z3"], "metrics.jsonl"))[1]
    assert [e["step"] for e in evals] == [3, 6]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_tensor_parallel_size(shards, tp1_runs, tp2_runs, tmp_path, before,
                                                after):
    """ZeRO-3 on 2 ranks at TP=`before` stopped after step 3, resumed on 2 ranks at
    TP=`after` (dp 2/tp): the checkpoint goes through DeepSpeed's universal format with our
    TP layout declared (parallel.deepspeed.declare_tp_layout) and is cut into the new TP
    shards. Steps 4-6 see the uninterrupted run's batches and give its losses; the Adam
    moments and step counts came along (a restart with fresh optimizer state, or from
    scratch, would not give them)."""
    full, stopped = tp1_runs if before == 1 else tp2_runs
    resumed = resumable_copy(stopped, tmp_path / "resumed")
    lines = metrics_lines(resumed)
    proc = run([*LAUNCH, *overrides(shards, resumed, f"parallel.tensor={after}")],
               cwd=tmp_path, NPROC_PER_NODE="2")
    assert_resumed(lines, metrics_lines(resumed), proc, resumed, 3)
    a, b = train_records(full), train_records(resumed)
    assert [r["batch_digest"] for r in a] == [r["batch_digest"] for r in b]
    for ra, rb in zip(a[3:], b[3:], strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5), ra["step"]
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4), ra["step"]
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-9)
    state = json.loads((resumed / "checkpoints" / "step_00000006" /
                        "trainer_state.json").read_text())
    assert (state["layout"]["tp"], state["layout"]["dp"]) == (after, 2 // after)
    assert state["step"] == 6 and state["consumed_samples"] == 48


def test_a_new_run_starts_from_given_weights(shards, tp1_runs, tmp_path):
    """train.init_from: a run stopped after 3 steps (ZeRO-3, TP=1 on 2 ranks), given as its
    state-dict file (tools/convert_to_hf.py --state-dict) to a new run at TP=2, and as its run
    directory to one at TP=1 (ZeRO-3 partitioned over 2 ranks). With lr 0 the new runs' model
    stays what they loaded, so their validation loss is the one the source logged after 3
    steps (an untrained model's is far above it)."""
    source, launch = tp1_runs[1], LAUNCH  # read only
    logged = read_metrics(os.path.join(source, "metrics.jsonl"))[1][-1]["val_loss"]
    run([sys.executable, f"{ROOT}/tools/convert_to_hf.py", str(source), "--state-dict",
         str(tmp_path / "source.pt"), "--no-progress"], cwd=tmp_path)
    for name, weights, tp in (("from_file", tmp_path / "source.pt", 2), ("from_run", source, 1)):
        new = tmp_path / name
        proc = run([*launch, *overrides(shards, new, f"train.init_from={weights}",
                                        f"parallel.tensor={tp}", "optim.lr=0", "train.steps=1",
                                        "train.eval_every=0")], cwd=tmp_path, NPROC_PER_NODE="2")
        assert f"initialised the weights from {weights}" in proc.stderr
        val = read_metrics(os.path.join(new, "metrics.jsonl"))[1][-1]["val_loss"]
        assert val == pytest.approx(logged, rel=1e-5), name
    # not what an untrained model scores: the source's loss at step 1 is well above it
    assert train_records(source)[0]["loss"] > logged * 1.02


def test_resume_on_another_data_parallel_size(shards, tp1_runs, tmp_path):
    """ZeRO-3 on 2 ranks stopped after step 3 and resumed by 1 process (through DeepSpeed's
    universal checkpoint): steps 4-6 see exactly the batches of the uninterrupted 2-rank run
    (same digests) and give its losses."""
    full, resumed = tp1_runs[0], resumable_copy(tp1_runs[1], tmp_path / "resumed")
    before = metrics_lines(resumed)
    proc = run([sys.executable, "-m", "nbp_mega.train", f"{ROOT}/configs/tiny.yaml",
                *overrides(shards, resumed)], cwd=tmp_path)
    assert_resumed(before, metrics_lines(resumed), proc, resumed, 3)
    a, b = train_records(full), train_records(resumed)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["batch_digest"] for r in a] == [r["batch_digest"] for r in b]
    assert len({r["batch_digest"] for r in a}) == 6
    for ra, rb in zip(a[3:], b[3:], strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5), ra["step"]
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-9)
    assert (resumed / "checkpoints" / "step_00000003" / "universal").is_dir()
    state = json.loads((resumed / "checkpoints" / "step_00000006" /
                        "trainer_state.json").read_text())
    assert state["layout"]["dp"] == 1 and len(state["data"]["streams"]) == 4
