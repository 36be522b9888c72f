"""A real one-node SLURM cluster on loopback, in a temporary folder, for tests.

    cluster = SlurmCluster(tmp_path); cluster.start()   # munged, slurmctld, slurmd; node idle
    cluster.command("sbatch", ...); cluster.job(job_id)["JobState"]
    cluster.stop()                                       # cancels jobs, stops the daemons

Its own munge key and socket, a generated slurm.conf (free ports, state and spool folders in
the temporary folder, no cgroups: proctrack/linuxproc and task/none; partition `debug`, the
default, preempted by partition `urgent`) and SLURM_CONF for the client commands; nothing
outside the folder is read or changed. Needs Debian's slurm-wlm and
munge (slurmd runs jobs as root here, as the test's user). The fixture `slurm_cluster` skips
the tests only where those binaries are missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel")


def missing_binaries() -> list[str]:
    return [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None and
            not os.path.exists(f"/usr/sbin/{name}")]


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies (no stray daemons)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=nbptest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser=root
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthType=auth/munge
AuthInfo=socket={root}/munge-run/munge.socket,cred_expire=5
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
JobRequeue=1
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
KillWait=30
SlurmdParameters=config_overrides
# A job in partition `urgent` preempts (cancels) the jobs of `debug` it needs the CPUs of,
# after GraceTime seconds in which their tasks have SIGTERM (time to checkpoint).
PreemptType=preempt/partition_prio
PreemptMode=CANCEL
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=20
PartitionName=urgent Nodes={node} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


class SlurmCluster:
    def __init__(self, root):
        self.root = str(root)
        self.node = socket.gethostname().split(".")[0]
        self.conf = os.path.join(self.root, "slurm.conf")
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": self.conf}

    # -- start / stop -------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        for sub in ("state", "spool", "munge-key", "munge-run"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        os.chmod(os.path.join(self.root, "munge-key"), 0o700)
        self._start_munge()
        with open(os.path.join(self.root, "plugstack.conf"), "w"):
            pass
        import pwd

        with open(self.conf, "w") as f:
            f.write(SLURM_CONF.format(root=self.root, ctld_port=_free_port(),
                                      slurmd_port=_free_port(), node=self.node,
                                      user=pwd.getpwuid(os.getuid()).pw_name,
                                      cpus=max(2, os.cpu_count() or 1)))
        self._daemon("slurmctld", [_binary("slurmctld"), "-D", "-f", self.conf])
        self._daemon("slurmd", [_binary("slurmd"), "-D", "-f", self.conf, "-N", self.node])
        self.wait_for(lambda: self.node_state() == "IDLE", timeout, "the node to be idle")

    def _start_munge(self) -> None:
        key = os.path.join(self.root, "munge-key", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(128))
        os.chmod(key, 0o600)
        run = os.path.join(self.root, "munge-run")
        self._daemon("munged", [_binary("munged"), "--foreground", "--force",
                                f"--socket={run}/munge.socket", f"--key-file={key}",
                                f"--pid-file={run}/munged.pid", f"--seed-file={run}/seed",
                                f"--log-file={run}/munged.log"])
        self.wait_for(lambda: os.path.exists(f"{run}/munge.socket"), 30, "munged's socket")

    def _daemon(self, name: str, cmd: list[str]) -> None:
        log = open(os.path.join(self.root, f"{name}.out"), "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True,
                                            preexec_fn=_die_with_parent)

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--user", str(os.getuid())],
                           env=self.env, capture_output=True, timeout=30)
            deadline = time.monotonic() + 60
            while self.command("squeue", "-h", check=False).strip() and \
                    time.monotonic() < deadline:
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- use ----------------------------------------------------------------------------------
    def command(self, *args: str, check: bool = True, timeout: float = 60, cwd=None,
                **env: str) -> str:
        proc = subprocess.run(args, env={**self.env, **env}, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): "
                                 f"{proc.stderr.strip()}\n{self.logs()}")
        return proc.stdout

    def node_state(self) -> str:
        out = self.command("scontrol", "-o", "show", "node", self.node, check=False)
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        return fields.get("State", "")

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.command("scontrol", "-o", "show", "job", job_id)
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait_for(self, predicate, timeout: float, what: str, poll: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited ({proc.returncode}) while waiting "
                                         f"for {what}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout} s\n{self.logs()}")
            time.sleep(poll)

    def logs(self, lines: int = 30) -> str:
        """The end of every daemon's log, for failure messages."""
        out = []
        for name in ("munged.out", "slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            path = os.path.join(self.root, name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    tail = f.readlines()[-lines:]
                out.append(f"--- {path}\n{''.join(tail)}")
        return "\n".join(out)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"no SLURM/munge here (missing {', '.join(missing)}; Debian/Ubuntu: apt-get "
                    "install slurm-wlm munge)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
