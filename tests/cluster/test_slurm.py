"""SLURM jobs: submit.py and train.sbatch against a real one-node cluster (slurm_cluster.py),
and the allocation checks on their own.

The cluster test submits the tiny run of tests/test_preemption.py (2 CPU ranks), sends its
ranks SIGUSR1 mid-run as `#SBATCH --signal` would, and expects one checkpoint, the job
requeued by its own script (Restarts=1), the second attempt resuming at the checkpoint's step
without recomputing the steps before it, and at the end the uninterrupted run's losses, batch
digests and validation loss.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import nbp_mega.cluster.slurm as slurm
from nbp_mega.cluster.slurm import (
    STOP_SIGNALS,
    Allocation,
    JobRequest,
    StopRequest,
    StopVote,
    catch_stop_signals,
    check_layout,
    prepare_job,
    rank_environment,
    render_sbatch,
)
from nbp_mega.config_fields import ConfigError
from tests.cluster.slurm_cluster import slurm_cluster  # noqa: F401 (fixture)
from tests.test_preemption import (
    STEPS,
    assert_same_run,
    checkpoints,
    preemption_overrides,
    preemption_shards,
    reference_run,
)
from tests.test_train import ROOT, metrics_lines

TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SUBMIT = os.path.join(ROOT, "tools", "slurm", "submit.py")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


# -- without a cluster -------------------------------------------------------------------------
def test_stop_request_notes_signals_and_the_time_limit():
    """A stop signal only sets the flag (without the handler it would end this process), the
    previous handlers come back afterwards, and train.max_minutes counts from `started`."""
    stop = StopRequest(max_minutes=1, started=time.time())
    before = [signal.getsignal(sig) for sig in STOP_SIGNALS]
    with stop.handling_signals():
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.signal == "SIGUSR1"
        assert stop.agreed() == StopVote(signalled=1, out_of_time=0)  # a job of one
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == "SIGUSR1"  # the first one is kept
    assert [signal.getsignal(sig) for sig in STOP_SIGNALS] == before
    assert StopRequest(max_minutes=1, started=time.time() - 61).agreed() == StopVote(0, 1)
    assert not StopRequest(max_minutes=0, started=0).agreed()
    assert StopVote(2, 1).reason(4, 1.5) == ("a stop signal (SIGUSR1/SIGTERM) reached 2 of 4 "
                                             "ranks and train.max_minutes=1.5 passed")


def test_a_signal_during_start_up_stops_the_run(monkeypatch):
    """An srun task catches stop signals from its first line: one that comes before the
    trainer runs (imports, the checkpoint load) is kept for the first step's vote."""
    monkeypatch.setattr(slurm, "_early_signals", [])
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        catch_stop_signals()
        stop = StopRequest()
        os.kill(os.getpid(), signal.SIGTERM)
        with stop.handling_signals():
            assert stop.signal == "SIGTERM"
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_allocation_gpus_must_divide_by_tensor_parallel():
    env = {"SLURM_JOB_ID": "17", "SLURM_JOB_NUM_NODES": "3", "SLURM_NTASKS_PER_NODE": "1",
           "SLURM_GPUS_PER_NODE": "h100:1"}
    alloc = Allocation.from_env(env)
    assert (alloc.nodes, alloc.tasks_per_node, alloc.gpus_per_node) == (3, 1, 1)
    with pytest.raises(ConfigError) as e:
        check_layout(alloc, 2, "SLURM job 17")
    assert str(e.value) == ("SLURM job 17: 3 nodes x 1 GPU = 3 GPUs, which parallel.tensor=2 "
                            "does not divide; ask for a multiple of 2 GPUs or set "
                            "parallel.tensor to one of [1, 3]")
    check_layout(Allocation.from_env({**env, "SLURM_JOB_NUM_NODES": "4"}), 2, "job")
    many = {**env, "SLURM_NTASKS_PER_NODE": "2", "SLURM_GPUS_PER_NODE": "4"}
    with pytest.raises(ConfigError, match="2 tasks per node on nodes with 4 GPUs; nbp_mega "
                       "runs one rank per GPU, so ask for --ntasks-per-node=4"):
        check_layout(Allocation.from_env(many), 1, "job")
    with pytest.raises(ConfigError, match="no SLURM_JOB_ID"):
        Allocation.from_env({})


def test_submit_fills_the_script_and_refuses_a_bad_layout(tmp_path, capsys):
    from tools.slurm.submit import main

    run_dir = tmp_path / "run"
    script, where = prepare_job(TINY, [f"run_dir={run_dir}", "parallel.tensor=2"],
                                JobRequest(nodes=2, gpus_per_node=4, time="1:00:00",
                                           partition="gpu", signal_seconds=120))
    assert where == str(run_dir)
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == ["#SBATCH --job-name=nbp-run", "#SBATCH --nodes=2",
                      "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                      "#SBATCH --time=1:00:00", "#SBATCH --partition=gpu",
                      "#SBATCH --signal=USR1@120", "#SBATCH --requeue",
                      "#SBATCH --open-mode=append",
                      f"#SBATCH --output={run_dir}/logs/slurm-%j.out",
                      f"#SBATCH --chdir={os.getcwd()}"]
    assert f"python={sys.executable}\n" in script
    assert not re.search(r"@[A-Z_]+@", script)  # every field filled
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    # 3 GPUs for parallel.tensor=2: refused before anything is submitted
    assert main([TINY, f"run_dir={run_dir}", "parallel.tensor=2", "--nodes", "3",
                 "--gpus-per-node", "1", "--dry-run"]) == 2
    assert ("error: submitting " + TINY + ": 3 nodes x 1 GPU = 3 GPUs, which "
            "parallel.tensor=2 does not divide") in capsys.readouterr().err
    assert not run_dir.exists()
    with pytest.raises(KeyError, match="MISSING"):
        render_sbatch("#SBATCH --x=@MISSING@\n", {})


def test_rank_environment_comes_from_the_task(monkeypatch):
    monkeypatch.setattr("nbp_mega.cluster.slurm.hostnames", lambda nodes: ["gpu07", "gpu08"])
    monkeypatch.delenv("NBP_MASTER_PORT", raising=False)
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456", "RANK": "0"}
    assert rank_environment(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                     "MASTER_ADDR": "gpu07", "MASTER_PORT": str(29500 + 3456)}


# -- on a real SLURM cluster -------------------------------------------------------------------
def _submit(cluster, shards, run_dir, *args) -> str:
    proc = subprocess.run([sys.executable, SUBMIT, TINY, *preemption_overrides(shards, run_dir),
                           *args], env={**cluster.env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120, cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr + cluster.logs()
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def _step_lines(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.distributed
def test_preempted_job_checkpoints_requeues_and_continues_exactly(slurm_cluster, tmp_path,  # noqa: F811
                                                                  tmp_path_factory):
    cluster = slurm_cluster
    reference = reference_run(tmp_path_factory)
    run_dir = tmp_path / "run"
    job = _submit(cluster, preemption_shards(tmp_path_factory), run_dir,
                  "--tasks-per-node", "2", "--time", "10", "--signal-seconds", "60")

    def ended() -> bool:
        return cluster.job(job)["JobState"] in ENDED

    def report() -> str:
        logs = [p for p in (run_dir / "logs").rglob("*") if p.is_file()]
        return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in logs) + cluster.logs()

    cluster.wait_for(lambda: _step_lines(run_dir) >= 3 or ended(), 180, "step 3")
    assert not ended(), report()
    cluster.command("scancel", "--signal=USR1", job)  # to every rank, as --signal=USR1@N does
    latest = run_dir / "checkpoints" / "latest"
    cluster.wait_for(lambda: latest.exists() or ended(), 120, "the stop checkpoint")
    k = int(latest.read_text().removeprefix("step_"))
    first_attempt = metrics_lines(run_dir)  # steps 1..k, before the job is requeued
    cluster.wait_for(ended, 240, f"job {job} to end")
    info = cluster.job(job)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0"), \
        report()

    logs = run_dir / "logs" / job
    # scancel signals both ranks, but not at one instant: the ranks' vote after a step may
    # count 1 or 2 of them (seen in CI: "1 of 2"); either way both stop at that same step k
    stop = re.compile(rf"stopping after step {k} of {STEPS}: a stop signal \(SIGUSR1/SIGTERM\) "
                      r"reached ([12]) of 2 ranks")
    votes = [stop.findall((logs / "restart0" / f"rank{rank}.log").read_text()) for rank in (0, 1)]
    assert len(votes[0]) == 1 and votes[0] == votes[1], report()
    resumed = (logs / "restart1" / "rank0.log").read_text()
    assert f"resumed from {run_dir}/checkpoints/step_{k:08d} (step {k})" in resumed, report()
    assert "requeueing" in (run_dir / "logs" / f"slurm-{job}.out").read_text()
    # The second attempt did not recompute steps 1..k (their timings would differ) ...
    assert 3 <= k < STEPS and len(first_attempt) == k
    assert metrics_lines(run_dir)[:k] == first_attempt
    assert json.loads(metrics_lines(run_dir)[k])["step"] == k + 1
    # ... and together they are the uninterrupted run.
    assert_same_run(reference, run_dir)
    assert checkpoints(run_dir) == [f"step_{k:08d}", f"step_{STEPS:08d}"]


# Stands in for the ranks' Python in the batch script: until attempt $LAST_ATTEMPT it waits
# for SIGUSR1 or SIGTERM and leaves with the requeue code; that attempt ends at once.
FAKE_RANK = """#!/usr/bin/env bash
attempt=${SLURM_RESTART_COUNT:-0}
if [ "$attempt" -ge "$LAST_ATTEMPT" ]; then echo "rank $SLURM_PROCID done"; exit 0; fi
trap 'echo "rank $SLURM_PROCID got SIGUSR1"; sleep 1; exit 75' USR1  # sleep: "checkpoint"
trap 'echo "rank $SLURM_PROCID got SIGTERM"; sleep 1; exit 75' TERM
touch "$MARKS/attempt$attempt.rank$SLURM_PROCID"
for _ in $(seq 1200); do sleep 0.1; done  # a trap runs between commands
exit 1
"""


def _fake_job(cluster, tmp_path, last_attempt: int):
    """Submit train.sbatch (filled by prepare_job in the current directory, the job's) with
    FAKE_RANK as the ranks' Python.
    -> (job id, run_dir, a function waiting until both ranks of an attempt run)"""
    fake, marks = tmp_path / "fake_python", tmp_path / "marks"
    fake.write_text(FAKE_RANK)
    fake.chmod(0o755)
    marks.mkdir()
    run_dir = tmp_path / "run"
    script, _ = prepare_job(TINY, [f"run_dir={run_dir}"],
                            JobRequest(tasks_per_node=2, python=str(fake), signal_seconds=0))
    (tmp_path / "job.sbatch").write_text(script)
    (run_dir / "logs").mkdir(parents=True)
    job = cluster.command("sbatch", "--parsable", str(tmp_path / "job.sbatch"), TINY,
                          cwd=tmp_path, MARKS=str(marks),
                          LAST_ATTEMPT=str(last_attempt)).strip()

    def running(attempt: int) -> None:
        cluster.wait_for(lambda: len(list(marks.glob(f"attempt{attempt}.*"))) == 2, 60,
                         f"both ranks of attempt {attempt}")
    return job, run_dir, running


def _rank_logs(run_dir, job: str, attempt: int) -> list[str]:
    return [(run_dir / "logs" / job / f"restart{attempt}" / f"rank{r}.log").read_text()
            for r in (0, 1)]


@pytest.mark.distributed
def test_batch_script_requeues_after_its_signal_and_a_preemption(slurm_cluster, tmp_path,  # noqa: F811
                                                                  monkeypatch):
    """SIGUSR1 to the batch script alone (`scancel --batch`) reaches the ranks through it;
    a preemption (a job of partition `urgent` needs the CPUs) sends them SIGTERM. Both times
    they leave with the requeue code and the script requeues the job."""
    cluster = slurm_cluster
    monkeypatch.chdir(tmp_path)
    job, run_dir, running = _fake_job(cluster, tmp_path, last_attempt=2)
    running(0)
    cluster.command("scancel", "--batch", "--signal=USR1", job)
    running(1)
    cluster.command("sbatch", "--partition=urgent", "--ntasks=2", "--output=/dev/null",
                    "--wrap=true")
    cluster.wait_for(lambda: cluster.job(job)["JobState"] in ENDED, 90, f"job {job} to end")
    info = cluster.job(job)
    batch_log = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "2"), batch_log
    assert "got SIGUSR1, passing it to the ranks" in batch_log
    assert batch_log.count("requeueing") == 2 and "training finished" in batch_log
    for rank, log in enumerate(_rank_logs(run_dir, job, 0)):
        assert f"rank {rank} got SIGUSR1\n" in log
    for rank, log in enumerate(_rank_logs(run_dir, job, 1)):
        assert f"rank {rank} got SIGTERM\n" in log
    assert _rank_logs(run_dir, job, 2) == ["rank 0 done\n", "rank 1 done\n"]


@pytest.mark.distributed
def test_batch_script_does_not_requeue_a_cancelled_job(slurm_cluster, tmp_path,  # noqa: F811
                                                       monkeypatch):
    """scancel: the ranks get SIGTERM and checkpoint, and the job stays cancelled."""
    cluster = slurm_cluster
    monkeypatch.chdir(tmp_path)
    job, run_dir, running = _fake_job(cluster, tmp_path, last_attempt=1)
    running(0)
    cluster.command("scancel", job)
    cluster.wait_for(lambda: cluster.job(job)["JobState"] in ENDED, 60, f"job {job} to end")
    info = cluster.job(job)
    batch_log = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), batch_log
    assert "the job was cancelled, so it is not requeued" in batch_log
    for rank, log in enumerate(_rank_logs(run_dir, job, 0)):
        assert f"rank {rank} got SIGTERM\n" in log


@pytest.mark.distributed
def test_a_job_whose_ranks_tensor_parallel_does_not_divide_stops_at_launch(
        slurm_cluster, tmp_path):  # noqa: F811
    """One rank from srun for parallel.tensor=2: the rank refuses before training."""
    proc = subprocess.run(["srun", "--ntasks=1", sys.executable, "-m", "nbp_mega.cluster.slurm",
                           TINY, f"run_dir={tmp_path}/run", "parallel.tensor=2"],
                          env={**slurm_cluster.env, "PYTHONPATH": ROOT}, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr + slurm_cluster.logs()
    assert re.search(r"error: SLURM job \d+: 1 node x 1 CPU rank = 1 rank, which "
                     r"parallel.tensor=2 does not divide; ask for a multiple of 2 ranks or set "
                     r"parallel.tensor to one of \[1\]", proc.stderr), proc.stderr
