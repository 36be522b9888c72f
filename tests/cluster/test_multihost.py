"""`deepspeed --hostfile hosts launch.sh ...` across two real hosts, over real ssh.

The hosts are network namespaces on this machine, each with its own sshd and hostname
(tests/cluster/netns.py); DeepSpeed's launcher runs on host a and starts the ranks of both
over ssh with pdsh, exactly as on a cluster. Environment for the remote ranks travels in
.deepspeed_env: GLOO_SOCKET_IFNAME=eth0, since a host's name resolves to 127.0.0.1 here.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time

import pytest

from nbp_mega.cluster.hosts import HostfileError, deepspeed_launch_hosts, parse_hostfile
from nbp_mega.data.synthetic import write_synthetic_shards
from tests.cluster.netns import skip_reason, two_hosts
from tests.test_train import BIN, JOB_VARS, ROOT, overrides, run, train_records

pytestmark = pytest.mark.distributed
CONFIG = f"{ROOT}/configs/tiny.yaml"
A, B, NOBODY = "10.77.0.1", "10.77.0.2", "10.77.0.3"  # NOBODY: an address no host has
FAST = ("train.steps=4", "train.eval_every=0", "parallel.timeout_minutes=1")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("multihost")


@pytest.fixture(scope="module")
def cluster(base):
    """Hosts a and b; b sees its own empty tmpfs at <base>/unshared."""
    reason = skip_reason()
    if reason:
        pytest.skip(f"no test hosts on this machine: {reason}")
    (base / "unshared").mkdir()
    with two_hosts(base / "hosts", hidden_on_b=[base / "unshared"]) as made:
        yield made


@pytest.fixture(scope="module")
def shards(base):
    out = base / "synthetic"
    write_synthetic_shards(str(out), num_train=64, num_val=16, grid=(2, 4, 8), vocab=32,
                           classes=4, shard_size=16, seed=0, noise=0.02)
    return out


def launch(cluster, workdir, hosts: list[str], run_dir, shards) -> subprocess.CompletedProcess:
    """`deepspeed --hostfile hosts launch.sh ...` typed on host a, one rank per host."""
    workdir.mkdir()
    (workdir / "hosts").write_text("".join(f"{h} slots=1\n" for h in hosts))
    (workdir / ".deepspeed_env").write_text("GLOO_SOCKET_IFNAME=eth0\nOMP_NUM_THREADS=1\n")
    cmd = [f"{BIN}/deepspeed", "--hostfile", "hosts", f"{ROOT}/launch.sh", CONFIG,
           *overrides(shards, run_dir, *FAST)]
    env = {k: v for k, v in cluster.env().items() if k not in JOB_VARS}
    return subprocess.run(cluster.on("a", cmd), cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=300)


def test_two_hosts_train_as_one_host_with_two_ranks(cluster, base, shards):
    """2 hosts x 1 rank = 1 host x 2 ranks: the same batches (digests) and losses. DeepSpeed
    finds MASTER_ADDR as host a's address (`hostname -I` over ssh), and the ranks ran on the
    two hosts (each named by the run-dir check)."""
    two = base / "shared" / "two_hosts"
    proc = launch(cluster, base / "launch_two", [A, B], two, shards)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-8000:]
    one = base / "one_host"
    run(["bash", f"{ROOT}/launch.sh", CONFIG, *overrides(shards, one, *FAST)], cwd=base,
        NPROC_PER_NODE="2")
    assert f"--master_addr={A}" in output
    assert f"run_dir {two} is shared by the 2 ranks on hosts nbp-a, nbp-b" in output
    a, b = train_records(two), train_records(one)
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    assert [r["batch_digest"] for r in a] == [r["batch_digest"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6), ra["step"]
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5), ra["step"]
    assert not (two / ".run_dir_check").exists()


def test_an_unreachable_host_stops_the_launch_before_training(cluster, base, shards):
    """A hostfile naming an address no host has: the job stops before training, naming the
    host and what was tried. (DeepSpeed alone checks only the first host; pdsh's ssh fails
    for the second, and host a's rank waits for it until the collective timeout, here 60 s,
    then fails naming no host.) The hostfile check from the launching machine names it too,
    with the ssh it tried."""
    run_dir = base / "shared" / "unreachable"
    proc = launch(cluster, base / "launch_unreachable", [A, NOBODY], run_dir, shards)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-8000:]
    assert f"1 of the 2 hosts in the hostfile cannot be reached from {A}" in output
    assert f"{NOBODY}: TCP connection to {NOBODY}:22 (the ssh port" in output
    assert not run_dir.exists()  # rank 0 never reached train.py

    check = [sys.executable, "-m", "nbp_mega.cluster.hosts"]
    env = cluster.env(PYTHONPATH=ROOT)
    bad = subprocess.run(cluster.on("a", [*check, base / "launch_unreachable" / "hosts"]),
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert f"{NOBODY}: `ssh -o BatchMode=yes -o ConnectTimeout=5 {NOBODY} true`" in bad.stderr
    assert A + ":" not in bad.stderr
    (base / "good_hosts").write_text(f"{A} slots=1\n{B} slots=1\n")
    good = subprocess.run(cluster.on("a", [*check, base / "good_hosts"]), env=env,
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert f"all 2 hosts answer over ssh: {A}, {B}" in good.stdout


def test_a_run_dir_not_shared_by_the_hosts_fails_on_every_rank(cluster, base, shards):
    """run_dir where host b sees another directory (its own tmpfs): every rank fails at
    start, naming run_dir and the host that cannot see rank 0's marker."""
    run_dir = base / "unshared" / "run"
    proc = launch(cluster, base / "launch_unshared", [A, B], run_dir, shards)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-8000:]
    message = f"RuntimeError: run_dir {run_dir} is not shared by all hosts"
    for rank, host in enumerate((A, B)):  # pdsh prefixes each line with its host
        assert f"{host}: [rank{rank}]: {message}" in output, output[-8000:]
    assert f"which these hosts cannot see: nbp-b (rank 1: {run_dir}/.run_dir_check: No such " \
           "file or directory)" in output
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.mark.parametrize("text,error", [
    ("node1 slots=2\nnode1 slots=2\n", "line 2: host node1 is listed twice"),
    ("node1 slots=0\n", "line 1: 'node1 slots=0': expected `hostname slots=N`"),
    ("# only a comment\n", "names no host"),
    ("node1 slots=2 max_slots=4\n", "line 1: 'node1 slots=2 max_slots=4': expected"),
    ("node1\n", "line 1: 'node1': expected"),
])
def test_bad_hostfiles_are_refused_naming_the_line(text, error):
    with pytest.raises(HostfileError, match=re.escape(error)):
        parse_hostfile(text, "hosts")


def test_the_hosts_of_a_deepspeed_launch_are_read_from_its_per_host_launcher():
    """launch.sh's preflight finds the job's hosts in its parent's command line, as
    DeepSpeed's launcher.launch gets them; any other parent (torchrun, python): no check."""
    world = base64.urlsafe_b64encode(json.dumps({"h1": [0, 1], "h2": [0, 1]}).encode())
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m",
                               "deepspeed.launcher.launch", f"--world_info={world.decode()}",
                               "--node_rank=1", "--master_addr=h1", "launch.sh", "CONFIG"])
    try:
        for _ in range(500):  # until the child has exec'd (its cmdline is then ours)
            with open(f"/proc/{parent.pid}/cmdline", "rb") as f:
                if b"--world_info" in f.read():
                    break
            time.sleep(0.01)
        assert deepspeed_launch_hosts(parent.pid) == (["h1", "h2"], 1)
    finally:
        parent.kill()
        parent.wait()
    assert deepspeed_launch_hosts() is None  # pytest's parent


def test_a_hostfile_gives_its_hosts_in_order():
    hosts = parse_hostfile("# the job\nb slots=2  # gpu box\n\na slots=1\n")
    assert [(h.name, h.slots) for h in hosts] == [("b", 2), ("a", 1)]

