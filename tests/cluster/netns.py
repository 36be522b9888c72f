"""Two real hosts on one machine, for multi-host launches over real ssh (needs root).

    with two_hosts(workdir, hidden_on_b=[some_dir]) as cluster:
        subprocess.run(cluster.on("a", ["deepspeed", "--hostfile", ...]), env=cluster.env())

Each host is a network namespace holding only lo and eth0 (the two eth0 are the ends of one
veth pair, 10.77.0.0/24: host a is 10.77.0.1, host b 10.77.0.2), with its own hostname
(a UTS namespace: nbp-a, nbp-b) and its own sshd (Debian's openssh-server) listening on its
address, with a generated host key and the authorized key of a user key pair made here.
`hidden_on_b` directories get a fresh tmpfs over them in host b's own mount namespace: host b
sees an empty directory where host a sees the real one (a disk the hosts do not share).

Commands "on" a host run in its namespaces; `cluster.env()` puts first on PATH an `ssh` that
uses this cluster's key and known_hosts (`ssh -F <ssh_config>`), so DeepSpeed's launcher,
pdsh and its ssh checks all log in with it. Teardown, also after a failure: every process in
the namespaces (sshds, what they started) is killed by id, then the namespaces go, and the
veth pair with them; /run/sshd (sshd's privilege-separation directory) is removed if made here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SUBNET = "10.77.0"
PRIVSEP_DIR = Path("/run/sshd")


def skip_reason() -> str | None:
    """Why this machine cannot make the test hosts (not root, no `ip netns`, no sshd)."""
    if os.geteuid() != 0:
        return "needs root, to make network namespaces and run sshd"
    if shutil.which("ip") is None:
        return "needs `ip` (iproute2) for network namespaces"
    if not os.access(SSHD, os.X_OK):
        return f"needs {SSHD} (Debian's openssh-server)"
    probe = f"nbp-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"`ip netns add` is not available here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class TestHost:
    name: str  # hostname inside the host
    netns: str
    ip: str


@dataclass
class Cluster:
    dir: Path
    hosts: dict[str, TestHost]  # "a", "b"
    bin: Path  # holds the `ssh` wrapper

    def on(self, host: str, cmd: list[str]) -> list[str]:
        """`cmd` as run on host `host` (in its network namespace)."""
        return ["ip", "netns", "exec", self.hosts[host].netns, *map(str, cmd)]

    def env(self, **extra) -> dict[str, str]:
        return {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}", **extra}


def sh(*cmd) -> str:
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{shlex.join(map(str, cmd))} failed: {proc.stderr.strip()}")
    return proc.stdout


def keygen(path: Path) -> str:
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", path)
    return path.with_suffix(".pub").read_text().strip()


SSHD_CONFIG = """\
ListenAddress {ip}
HostKey {dir}/host_{name}
AuthorizedKeysFile {dir}/authorized_keys
PidFile none
StrictModes no
UsePAM no
PermitRootLogin yes
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PrintMotd no
"""

SSH_CONFIG = """\
Host *
  User root
  IdentityFile {dir}/user_key
  IdentitiesOnly yes
  UserKnownHostsFile {dir}/known_hosts
  StrictHostKeyChecking yes
  BatchMode yes
  ConnectTimeout 5
  LogLevel ERROR
"""


def write_ssh_files(workdir: Path, hosts: dict[str, TestHost]) -> Path:
    """Keys, sshd/ssh configs, known_hosts and the `ssh` wrapper; returns the wrapper's dir."""
    (workdir / "authorized_keys").write_text(keygen(workdir / "user_key") + "\n")
    known = []
    for key, host in hosts.items():
        known.append(f"{host.ip} {keygen(workdir / f'host_{key}')}")
        (workdir / f"sshd_{key}.conf").write_text(SSHD_CONFIG.format(ip=host.ip, dir=workdir,
                                                                      name=key))
    (workdir / "known_hosts").write_text("\n".join(known) + "\n")
    (workdir / "ssh_config").write_text(SSH_CONFIG.format(dir=workdir))
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {workdir}/ssh_config "$@"\n')
    wrapper.chmod(0o755)
    return bin_dir


def start_sshd(workdir: Path, key: str, host: TestHost, hidden: list[Path]) -> subprocess.Popen:
    """sshd of `host`, in its network namespace, own hostname and own mount namespace."""
    script = "set -e; "
    script += "".join(f"mount -t tmpfs nbp-hidden {shlex.quote(str(d))}; " for d in hidden)
    script += (f"hostname {host.name}; exec {SSHD} -D -e -f "
               f"{shlex.quote(str(workdir / f'sshd_{key}.conf'))}")
    log = open(workdir / f"sshd_{key}.log", "w")
    proc = subprocess.Popen(["ip", "netns", "exec", host.netns, "unshare", "--mount", "--uts",
                             "sh", "-c", script], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 15
    while "Server listening on" not in (workdir / f"sshd_{key}.log").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"sshd of host {host.name} did not start: "
                               f"{(workdir / f'sshd_{key}.log').read_text()}")
        time.sleep(0.05)
    return proc


def kill_namespace_processes(netns: str) -> None:
    """Every process in network namespace `netns` (all started by this fixture or through
    its sshds), by id: SIGTERM, then SIGKILL after 5 s."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", netns],
                                               capture_output=True, text=True).stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if os.path.exists(f"/proc/{p}")
                    and not _is_zombie(p)]
            time.sleep(0.05)
        if not pids:
            return


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def remove_stale_namespaces() -> None:
    """Namespaces this fixture made in a test process that no longer exists (killed before
    its teardown ran): their processes, then the namespaces."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in (line.split()[0] for line in listed.splitlines() if line.strip()):
        match = re.fullmatch(r"nbp-(\d+)-[ab]", name)
        if match and not os.path.exists(f"/proc/{match[1]}"):
            kill_namespace_processes(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextmanager
def two_hosts(workdir: Path, hidden_on_b: list[Path] = ()):
    remove_stale_namespaces()
    workdir.mkdir(parents=True, exist_ok=True)
    tag = os.getpid()
    hosts = {k: TestHost(f"nbp-{k}", f"nbp-{tag}-{k}", f"{SUBNET}.{i}")
             for i, k in enumerate("ab", start=1)}
    made_privsep = not PRIVSEP_DIR.exists()
    made, sshds = [], []
    try:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        for host in hosts.values():
            sh("ip", "netns", "add", host.netns)
            made.append(host.netns)
        a, b = hosts["a"].netns, hosts["b"].netns
        sh("ip", "link", "add", "eth0", "netns", a, "type", "veth", "peer", "name", "eth0",
           "netns", b)
        for host in hosts.values():
            sh("ip", "-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            sh("ip", "-n", host.netns, "link", "set", "eth0", "up")
            sh("ip", "-n", host.netns, "link", "set", "lo", "up")
        bin_dir = write_ssh_files(workdir, hosts)
        for key, host in hosts.items():
            sshds.append(start_sshd(workdir, key, host, list(hidden_on_b) if key == "b" else []))
        yield Cluster(workdir, hosts, bin_dir)
    finally:
        for netns in made:
            kill_namespace_processes(netns)
        for proc in sshds:  # reap them (killed above, with everything in the namespace)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for netns in made:  # the veth pair lives in them and goes with them
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        if made_privsep:
            shutil.rmtree(PRIVSEP_DIR, ignore_errors=True)
