"""SLURM: the allocation a job got, the ranks srun starts, and leaving early to be requeued.

A job submitted by tools/slurm/submit.py runs tools/slurm/train.sbatch, which starts

    srun python -m nbp_mega.cluster.slurm CONFIG [key=value ...]

one task per GPU (on CPU-only nodes: --ntasks-per-node tasks). `main` below is such a task: it
becomes rank SLURM_PROCID of SLURM_NTASKS (the rendezvous is the allocation's first host,
`scontrol show hostnames $SLURM_JOB_NODELIST`), checks the allocation against
parallel.tensor, and runs nbp_mega.train. srun starts the ranks itself, not torchrun: SLURM's
signals then reach every rank, where torchrun's agent would kill its workers on SIGTERM and
die on SIGUSR1.

Leaving early (`StopRequest`, used by the trainer under any launcher): SIGUSR1 (SLURM sends it
before the time limit, `#SBATCH --signal`), SIGTERM (preemption, scancel, a container's stop)
or train.max_minutes only set a flag. After every step all ranks add up their flags in one
small all-reduce, so they stop after the same step although a signal reaches them at
different times; they write one checkpoint and exit with REQUEUE_EXIT_CODE, which the batch
script answers with `scontrol requeue` (unless the job was cancelled). The requeued job runs
the same command and resumes from <run_dir>/checkpoints/latest. A signal arriving while a
checkpoint is written only sets the flag: the save finishes, and that checkpoint is the one
the job leaves with.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import torch

from nbp_mega.config_fields import ConfigError
from nbp_mega.parallel.collectives import all_reduce_

# EX_TEMPFAIL of sysexits.h ("try again later"): tools/slurm/train.sbatch requeues the job on it.
REQUEUE_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(SystemExit):
    """Raised after the agreed stop checkpoint: the process exits with REQUEUE_EXIT_CODE."""

    def __init__(self) -> None:
        super().__init__(REQUEUE_EXIT_CODE)


# -- leaving early -----------------------------------------------------------------------------
_early_signals: list[str] = []  # caught by catch_stop_signals before a StopRequest took over


def _record_early(signum, frame) -> None:
    _early_signals.append(signal.Signals(signum).name)


def catch_stop_signals() -> None:
    """Record stop signals from now on instead of dying of them (an srun task calls this
    first: a signal during the minutes of start-up then stops the job after its first step)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record_early)


def process_start_time() -> float:
    """When this process started (seconds since the epoch)."""
    import psutil

    return psutil.Process().create_time()


@dataclass
class StopVote:
    """What the ranks said after a step: how many caught a stop signal, how many ran out of
    train.max_minutes (each counts its own minutes)."""

    signalled: int
    out_of_time: int

    def __bool__(self) -> bool:
        return bool(self.signalled or self.out_of_time)

    def reason(self, world_size: int, max_minutes: float) -> str:
        parts = []
        if self.signalled:
            parts.append(f"a stop signal (SIGUSR1/SIGTERM) reached {self.signalled} of "
                         f"{world_size} ranks")
        if self.out_of_time:
            parts.append(f"train.max_minutes={max_minutes:g} passed")
        return " and ".join(parts)


class StopRequest:
    """Whether this job should checkpoint and leave: a stop signal or train.max_minutes."""

    def __init__(self, max_minutes: float = 0.0, started: float | None = None):
        self.max_minutes = max_minutes
        self.started = process_start_time() if started is None else started
        self.signal: str | None = None

    def _on_signal(self, signum, frame) -> None:
        # Only note it: the step in flight, or a checkpoint being written, carries on.
        if self.signal is None:
            self.signal = signal.Signals(signum).name

    @contextlib.contextmanager
    def handling_signals(self):
        """Within: SIGUSR1 and SIGTERM set the flag instead of ending the process."""
        if threading.current_thread() is not threading.main_thread():
            yield self  # Python delivers signals to the main thread only
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        if self.signal is None and _early_signals:  # during start-up or the checkpoint load
            self.signal = _early_signals[0]
        try:
            yield self
        except Preempted:
            # Keep catching: a launcher that saw another rank leave first may signal this one
            # (torchrun sends SIGTERM), which must still leave with REQUEUE_EXIT_CODE.
            raise
        except BaseException:
            self._restore(previous)
            raise
        self._restore(previous)

    @staticmethod
    def _restore(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def out_of_time(self) -> bool:
        return self.max_minutes > 0 and time.time() - self.started >= self.max_minutes * 60

    def agreed(self, group=None) -> StopVote:
        """Every rank of `group` (default: all) calls this after the same step and gets the
        same answer: one all-reduce of two small integers."""
        votes = torch.tensor([self.signal is not None, self.out_of_time()], dtype=torch.int64)
        signalled, out_of_time = all_reduce_(votes, group).tolist()
        return StopVote(signalled, out_of_time)


# -- the allocation ----------------------------------------------------------------------------
def _count(value: str | None) -> int:
    """The count in a SLURM GPU/task field: '4', 'a100:4', '4(x2)' -> 4; unset -> 0."""
    if not value:
        return 0
    match = re.search(r"(\d+)(\(x\d+\))?$", value.split(",")[0])
    if match is None:
        raise ConfigError(f"cannot read a count from the SLURM value {value!r}")
    return int(match.group(1))


@dataclass
class Allocation:
    """What SLURM gave this job: nodes x ranks per node (x GPUs per node)."""

    job_id: str
    nodes: int
    tasks_per_node: int
    gpus_per_node: int  # 0: CPU-only nodes

    @classmethod
    def from_env(cls, env=None) -> Allocation:
        env = os.environ if env is None else env
        if "SLURM_JOB_ID" not in env:
            raise ConfigError("no SLURM_JOB_ID in the environment: this runs as a task of a "
                              "SLURM job (tools/slurm/submit.py); outside SLURM use "
                              "`python -m nbp_mega.train` or launch.sh")
        nodes = _count(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")) or 1
        tasks = _count(env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE"))
        if not tasks:
            tasks = max(_count(env.get("SLURM_NTASKS")) // nodes, 1)
        gpus = _count(env.get("SLURM_GPUS_PER_NODE")) or _count(env.get("SLURM_GPUS_ON_NODE"))
        return cls(job_id=env["SLURM_JOB_ID"], nodes=nodes, tasks_per_node=tasks,
                   gpus_per_node=gpus)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def describe(self) -> str:
        """'2 nodes x 4 GPUs = 8 GPUs' or '1 node x 2 CPU ranks = 2 ranks'."""
        unit = "GPU" if self.gpus_per_node else "CPU rank"
        per_node = self.gpus_per_node or self.tasks_per_node
        total = "GPU" if self.gpus_per_node else "rank"
        return (f"{_plural(self.nodes, 'node')} x {_plural(per_node, unit)} = "
                f"{_plural(self.world_size, total)}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def check_layout(alloc: Allocation, tensor: int, where: str) -> None:
    """One rank per GPU, and parallel.tensor dividing the ranks; else a ConfigError naming
    the numbers (`where`: the job, or the submission being prepared)."""
    if alloc.gpus_per_node and alloc.tasks_per_node != alloc.gpus_per_node:
        raise ConfigError(f"{where}: {alloc.tasks_per_node} tasks per node on nodes with "
                          f"{alloc.gpus_per_node} GPUs; nbp_mega runs one rank per GPU, so "
                          f"ask for --ntasks-per-node={alloc.gpus_per_node} (submit.py does)")
    if alloc.world_size % tensor:
        divisors = [t for t in range(1, alloc.world_size + 1) if alloc.world_size % t == 0]
        raise ConfigError(f"{where}: {alloc.describe()}, which parallel.tensor={tensor} does "
                          f"not divide; ask for a multiple of {tensor} "
                          f"{'GPUs' if alloc.gpus_per_node else 'ranks'} or set "
                          f"parallel.tensor to one of {divisors}")


def hostnames(nodelist: str) -> list[str]:
    """The hosts of a SLURM node list ('gpu[01-03],cpu7'), as `scontrol show hostnames`
    expands it."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"`scontrol show hostnames {nodelist}` failed: {e}") from None
    return out.split()


def rendezvous_port(job_id: str) -> int:
    """A port for the job's rendezvous, the same on every node (NBP_MASTER_PORT overrides)."""
    return int(os.environ.get("NBP_MASTER_PORT") or 29500 + int(job_id) % 10000)


def rank_environment(env=None) -> dict[str, str]:
    """What init_parallel reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), for
    this srun task. Values from the shell that ran sbatch are replaced: sbatch exports it."""
    env = os.environ if env is None else env
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env["SLURM_LOCALID"],
            "MASTER_ADDR": hostnames(env["SLURM_JOB_NODELIST"])[0],
            "MASTER_PORT": str(rendezvous_port(env["SLURM_JOB_ID"]))}


# -- the batch script --------------------------------------------------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SBATCH_TEMPLATE = os.path.join(REPO, "tools", "slurm", "train.sbatch")
_FIELD = re.compile(r"@([A-Z_]+)@")


def render_sbatch(template: str, fields: dict[str, str]) -> str:
    """Fill the @NAME@ fields of `template`. An `#SBATCH` line whose field is empty is left
    out (an option not asked for); values in the script body are shell-quoted."""
    unknown = sorted(set(_FIELD.findall(template)) - set(fields))
    if unknown:
        raise KeyError(f"{SBATCH_TEMPLATE}: no value for the fields {unknown}")
    lines = []
    for line in template.splitlines(keepends=True):
        names = _FIELD.findall(line)
        if line.startswith("#SBATCH"):
            values = [str(fields[n]) for n in names]
            if not all(values):
                continue
            if any(re.search(r"\s", v) for v in values):
                raise ValueError(f"{line.strip()}: the values {values} must not hold spaces "
                                 "(an #SBATCH line cannot quote them)")
            lines.append(_FIELD.sub(lambda m: str(fields[m.group(1)]), line))
        else:
            lines.append(_FIELD.sub(lambda m: shlex.quote(str(fields[m.group(1)])), line))
    return "".join(lines)


@dataclass
class JobRequest:
    """What submit.py asks SLURM for (the sbatch options it fills in)."""

    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU-only nodes, tasks_per_node ranks each
    tasks_per_node: int = 0  # 0: one per GPU (or 1 on CPU nodes)
    cpus_per_task: int = 0  # 0: the partition's default
    time: str = ""  # sbatch --time; "" = the partition's default
    partition: str = ""
    account: str = ""
    signal_seconds: int = 300  # SIGUSR1 this long before the time limit (0 = none)
    job_name: str = ""  # "" = nbp-<run_dir's name>
    python: str = ""  # the ranks' interpreter; "" = this one (sys.executable)

    def allocation(self) -> Allocation:
        if self.gpus_per_node and self.tasks_per_node not in (0, self.gpus_per_node):
            raise ConfigError(f"--tasks-per-node={self.tasks_per_node} with "
                              f"--gpus-per-node={self.gpus_per_node}: nbp_mega runs one rank "
                              "per GPU; leave --tasks-per-node out on GPU nodes")
        tasks = self.gpus_per_node or self.tasks_per_node or 1
        return Allocation(job_id="(to submit)", nodes=self.nodes, tasks_per_node=tasks,
                          gpus_per_node=self.gpus_per_node)


def prepare_job(config: str, overrides: list[str], request: JobRequest, *,
                template: str = SBATCH_TEMPLATE) -> tuple[str, str]:
    """(batch script, run_dir) for training `config` with `overrides` as `request` asks:
    the config is loaded (bad keys fail here) and the layout checked against it."""
    from nbp_mega.config import load_config

    cfg = load_config(config, overrides)
    alloc = request.allocation()
    check_layout(alloc, cfg.parallel.tensor, f"submitting {config}")
    run_dir = os.path.abspath(cfg.run_dir)
    fields = {
        "JOB_NAME": request.job_name or f"nbp-{os.path.basename(run_dir)}",
        "NODES": alloc.nodes, "TASKS_PER_NODE": alloc.tasks_per_node,
        "GPUS_PER_NODE": request.gpus_per_node or "", "CPUS_PER_TASK": request.cpus_per_task or "",
        "TIME": request.time, "PARTITION": request.partition, "ACCOUNT": request.account,
        "SIGNAL_SECONDS": request.signal_seconds or "", "RUN_DIR": run_dir,
        "WORKDIR": os.getcwd(), "PYTHON": request.python or sys.executable,
        "REPO": REPO,
    }
    with open(template) as f:
        return render_sbatch(f.read(), fields), run_dir


# -- an srun task ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    """`srun python -m nbp_mega.cluster.slurm CONFIG [key=value ...]`: one rank of the job."""
    catch_stop_signals()  # before the slow imports: a signal then may come at any time
    argv = sys.argv[1:] if argv is None else argv
    from nbp_mega.config import load_config
    from nbp_mega.train import main as train_main
    from nbp_mega.train import parse_args

    try:
        alloc = Allocation.from_env()
        config, overrides = parse_args(argv)
        cfg = load_config(config, overrides)
        check_layout(alloc, cfg.parallel.tensor, f"SLURM job {alloc.job_id}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    os.environ.update(rank_environment())
    train_main(argv)


if __name__ == "__main__":
    main()
