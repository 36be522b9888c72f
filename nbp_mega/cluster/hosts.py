"""Multi-host launches: the hostfile, a reachability preflight, the shared-run-dir check.

`deepspeed --hostfile hosts launch.sh CONFIG ...` reads a hostfile of `hostname slots=N`
lines, checks over ssh that the *first* host answers, and starts every host's ranks with
pdsh (ssh). A later host that cannot be reached only makes pdsh print one line, while the
ranks already started wait for it until the collective timeout (30 minutes by default). So:

- `preflight_deepspeed_hosts()` (run by launch.sh on each host's first rank, before any
  training code): every other host of the job must accept a TCP connection on its ssh port,
  else the job stops at once, naming the host and what was tried.
- `python -m nbp_mega.cluster.hosts HOSTFILE`: the same hostfile checked from the launching
  machine, strictly parsed, each host tried with the ssh login that pdsh will make.
- `check_shared_run_dir(run_dir, dims)` (train.py, after the job is joined): rank 0 writes a
  marker with a random token in run_dir and every rank must read it back; checkpoints,
  metrics and resumes assume that every host sees the same run_dir.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger("nbp_mega.cluster")

HOSTFILE_FORMAT = "`hostname slots=N` (N >= 1 ranks on that host), one host a line, # comments"
SKIP_CHECK_VAR = "NBP_SKIP_HOST_CHECK"  # "1": no preflight (e.g. ssh on a port ssh -G can't tell)
MARKER = ".run_dir_check"


class HostfileError(ValueError):
    """A hostfile that is not `hostname slots=N` lines."""


class HostsUnreachable(RuntimeError):
    """Hosts of the job that cannot be reached; the message names each and what was tried."""


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


def parse_hostfile(text: str, path: str = "hostfile") -> list[Host]:
    """The hosts of a DeepSpeed hostfile, in order; bad lines fail naming line and text."""
    hosts: dict[str, Host] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        slots = fields[1].removeprefix("slots=") if len(fields) == 2 else ""
        if not (fields[1:2] and fields[1].startswith("slots=") and slots.isdigit()
                and int(slots) >= 1):
            raise HostfileError(f"{path} line {number}: {raw.strip()!r}: expected "
                                f"{HOSTFILE_FORMAT}")
        if fields[0] in hosts:
            raise HostfileError(f"{path} line {number}: host {fields[0]} is listed twice; "
                                "list each host once, with all its slots")
        hosts[fields[0]] = Host(fields[0], int(slots))
    if not hosts:
        raise HostfileError(f"{path} names no host; expected {HOSTFILE_FORMAT}")
    return list(hosts.values())


def read_hostfile(path: str) -> list[Host]:
    try:
        with open(path) as f:
            return parse_hostfile(f.read(), path)
    except FileNotFoundError:
        raise HostfileError(f"hostfile {path} does not exist; expected a file of "
                            f"{HOSTFILE_FORMAT}") from None


# --- reachability -------------------------------------------------------------------------

def ssh_endpoint(host: str) -> tuple[str, int]:
    """(address, port) that `ssh host` connects to, as ssh's config on this machine says
    (`ssh -G`, which resolves aliases and Port lines without connecting); (host, 22) where
    ssh is missing."""
    try:
        out = subprocess.run(["ssh", "-G", host], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return host, 22
    conf = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    return conf.get("hostname", host), int(conf.get("port", 22))


def tcp_problem(host: str, timeout: float) -> str | None:
    """None when host's ssh port accepts a TCP connection, else what was tried and the error."""
    address, port = ssh_endpoint(host)
    tried = f"TCP connection to {address}:{port} (the ssh port, from `ssh -G {host}`)"
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return None
    except socket.gaierror as err:
        return f"{tried}: the name does not resolve ({err.strerror})"
    except TimeoutError:
        return f"{tried}: no answer within {timeout:g} s"
    except OSError as err:
        return f"{tried}: {err.strerror or err}"


def ssh_problem(host: str, timeout: float) -> str | None:
    """None when `ssh host true` logs in without a password (what pdsh does), else the command
    and ssh's error."""
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(timeout)}", host, "true"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10)
    except (OSError, subprocess.SubprocessError) as err:
        return f"`{' '.join(cmd)}`: {err}"
    if proc.returncode == 0:
        return None
    error = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return f"`{' '.join(cmd)}`: {error[0]}"


def unreachable(hosts: list[str], probe, timeout: float = 5.0) -> dict[str, str]:
    """{host: what was tried and how it failed} for the hosts `probe` cannot reach (all tried
    at once, so a dead host costs one timeout)."""
    if not hosts:
        return {}
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        problems = pool.map(lambda h: probe(h, timeout), hosts)
    return {h: p for h, p in zip(hosts, problems, strict=True) if p}


def describe_unreachable(problems: dict[str, str], where: str, hosts: list[str]) -> str:
    lines = [f"{len(problems)} of the {len(hosts)} hosts in the hostfile cannot be reached "
             f"from {where}:"]
    lines += [f"  {host}: {problem}" for host, problem in problems.items()]
    lines.append("Each host in the hostfile must be up, known by that name to the launching "
                 "machine and to the other hosts, and accept passwordless ssh (the DeepSpeed "
                 "launcher starts each host's ranks over ssh, with pdsh); fix or remove those "
                 "lines. Check from the launching machine with `python -m "
                 "nbp_mega.cluster.hosts HOSTFILE`.")
    return "\n".join(lines)


def deepspeed_launch_hosts(pid: int | None = None) -> tuple[list[str], int] | None:
    """(hosts, this host's node rank) of a multi-host DeepSpeed launch, else None.

    DeepSpeed's per-host launcher (`python -m deepspeed.launcher.launch --world_info=...
    --node_rank=N`) is our parent and holds the hostfile's hosts only in its command line
    (the base64 JSON of {host: [slot ids]}, in node-rank order); it does not pass them on.
    """
    try:
        with open(f"/proc/{pid or os.getppid()}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if "deepspeed.launcher.launch" not in argv:
        return None
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    try:
        world = json.loads(base64.urlsafe_b64decode(opts["world_info"]))
        return list(world), int(opts.get("node_rank", 0))
    except (KeyError, ValueError):
        return None


def preflight_deepspeed_hosts(timeout: float = 5.0) -> None:
    """Stop a DeepSpeed multi-host job, before it trains, when a host cannot be reached.

    Run by the first rank on each host (LOCAL_RANK 0): the ranks of the others only wait."""
    launch = deepspeed_launch_hosts()
    if (launch is None or len(launch[0]) < 2 or os.environ.get("LOCAL_RANK", "0") != "0"
            or os.environ.get(SKIP_CHECK_VAR) == "1"):
        return
    hosts, node_rank = launch
    problems = unreachable([h for i, h in enumerate(hosts) if i != node_rank], tcp_problem,
                           timeout)
    if problems:
        where = f"{hosts[node_rank]} (node rank {node_rank}, host {socket.gethostname()})"
        raise SystemExit(f"nbp_mega preflight: {describe_unreachable(problems, where, hosts)}"
                         f"\n(An ssh port that `ssh -G` does not know, e.g. deepspeed "
                         f"--ssh_port, belongs in ~/.ssh/config; {SKIP_CHECK_VAR}=1 in "
                         ".deepspeed_env skips this check.)")


# --- the shared run directory -------------------------------------------------------------

def check_shared_run_dir(run_dir: str, dims, wait_s: float = 5.0) -> None:
    """Fail on every rank unless every rank sees the marker rank 0 writes in run_dir.

    A run_dir on a host-local disk would give each host its own checkpoints, and a resume
    that loads a mix of them. Rank 0 writes a random token, every rank looks for it for up
    to `wait_s` (slow attribute caches of network file systems), and all compare notes.
    """
    from nbp_mega.parallel.collectives import all_gather_objects

    if dims.world_size == 1:
        return
    marker = os.path.join(os.path.abspath(run_dir), MARKER)
    # rank 0's ("ok", token) or ("error", why), to every rank (the gather is the barrier)
    kind, value = all_gather_objects(_write_marker(marker) if dims.rank == 0 else None)[0]
    if kind == "error":
        raise RuntimeError(value)
    seen = all_gather_objects((socket.gethostname(), _read_marker(marker, value, wait_s)))
    if dims.rank == 0:
        os.remove(marker)
    missing = {}
    for rank, (host, problem) in enumerate(seen):
        if problem:
            missing.setdefault(host, []).append(f"rank {rank}: {problem}")
    if missing:
        raise RuntimeError(
            f"run_dir {os.path.abspath(run_dir)} is not shared by all hosts: rank 0 (host "
            f"{seen[0][0]}) wrote {marker}, which these hosts cannot see: "
            + "; ".join(f"{host} ({', '.join(why)})" for host, why in missing.items())
            + ". Checkpoints, metrics and resumes need one run_dir that every host reads and "
            "writes: put it on a file system shared by all hosts (NFS, Lustre, ...), mounted "
            "at the same path everywhere.")
    log.info("run_dir %s is shared by the %d ranks on hosts %s", os.path.abspath(run_dir),
             dims.world_size, ", ".join(dict.fromkeys(host for host, _ in seen)))


def _write_marker(marker: str) -> tuple[str, str]:
    token = secrets.token_hex(16)
    try:
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker + ".tmp", "w") as f:
            f.write(token)
        os.replace(marker + ".tmp", marker)  # readers never see half a token
    except OSError as err:
        return "error", (f"run_dir {os.path.dirname(marker)}: rank 0 (host "
                         f"{socket.gethostname()}) cannot write in it: {err}")
    return "ok", token


def _read_marker(marker: str, token: str, wait_s: float) -> str | None:
    """None once `marker` holds `token`, else what this rank saw instead."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(marker) as f:
                if f.read() == token:
                    return None
                problem = f"{marker} holds another token (a copy, not the same directory)"
        except OSError as err:
            problem = f"{marker}: {err.strerror or err}"
        if time.monotonic() > deadline:
            return problem
        time.sleep(0.2)


# --- command line -------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nbp_mega.cluster.hosts",
        description="Check a DeepSpeed hostfile from the launching machine: its format, and "
                    "a passwordless ssh login to every host (what pdsh will do).")
    parser.add_argument("hostfile")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per host")
    args = parser.parse_args(argv)
    try:
        hosts = [h.name for h in read_hostfile(args.hostfile)]
    except HostfileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    problems = unreachable(hosts, ssh_problem, args.timeout)
    if problems:
        print(f"error: {describe_unreachable(problems, socket.gethostname(), hosts)}",
              file=sys.stderr)
        return 1
    print(f"{args.hostfile}: all {len(hosts)} hosts answer over ssh: {', '.join(hosts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
