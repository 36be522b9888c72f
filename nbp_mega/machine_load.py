"""What else ran on the machine while a benchmark measured: the "load" of a bench record.

A figure may go into the README only from a run whose record says nothing else ran. Sampled
from /proc: the CPU time (utime + stime + the children it reaped) of every visible process
outside the benchmark's own process tree, as a delta for those alive at the start and all of
it for those started later (kernel threads counted apart), the CPU time the hypervisor stole
(/proc/stat), and the load averages at labelled moments (they include the bench's own load).
"quiet" = others used <= QUIET_MAX_FRACTION of the cores' time and steal was <= that too.
(/proc shows this container's processes only; neighbours outside it appear as steal, if at
all.)

    watch = LoadWatch()          # at the start
    ... watch.tick() in loops, watch.sample("label") at switches ...
    record["load"] = watch.summary()

Also a process's own memory as /proc counts it (`proc_status`, `reset_peak_rss`), for the
memory benchmarks.
"""

from __future__ import annotations

import os
import time

QUIET_MAX_FRACTION = 0.02  # of the cores' time: others' CPU use, and steal, for "quiet"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- what else runs ---------------------------------------------------------------------------
def read_processes() -> dict:
    """{(pid, start ticks): (ppid, comm, CPU ticks)} of the visible processes; CPU = utime +
    stime + cutime + cstime (its reaped children's time included)."""
    procs = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:  # it just ended
            continue
        comm, fields = stat[stat.find("(") + 1: stat.rfind(")")], stat[stat.rfind(")") + 2:]
        fields = fields.split()  # fields[0] is stat field 3 (state)
        procs[int(name), int(fields[19])] = (int(fields[1]), comm,
                                             sum(int(x) for x in fields[11:15]))
    return procs


def process_tree(procs: dict, root: int) -> set:
    """The keys of `root` and all its descendants in `procs`."""
    children = {}
    for key, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(key)
    tree = {key for key in procs if key[0] == root}
    todo = [root]
    while todo:
        for key in children.get(todo.pop(), []):
            if key not in tree:
                tree.add(key)
                todo.append(key[0])
    return tree


def kernel_threads(procs: dict) -> set:
    return {key for key, (ppid, _, _) in procs.items() if key[0] == 2 or ppid == 2}


def read_cpu_ticks() -> list[int]:
    """/proc/stat's machine-wide line: user nice system idle iowait irq softirq steal ..."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def load_summary(first: dict, last: dict, comm: dict, own: set, kernel: set,
                 cpu_before: list[int], cpu_after: list[int], wall: float, cores: int,
                 ticks_per_s: float = CLK_TCK) -> dict:
    """Who else used the CPU between two samples (first/last: {key: CPU ticks}) and whether
    that leaves the run "quiet"."""
    used = {key: max(last[key] - first.get(key, 0), 0) / ticks_per_s for key in last
            if key not in own}
    others = sum(s for key, s in used.items() if key not in kernel)
    delta = [a - b for a, b in zip(cpu_after, cpu_before, strict=True)]
    steal = delta[7] / max(sum(delta[:8]), 1) if len(delta) > 7 else 0.0
    capacity = wall * cores
    busiest = sorted(((s, key) for key, s in used.items() if s >= 1.0), reverse=True)[:10]
    return {
        "quiet": others <= QUIET_MAX_FRACTION * capacity and steal <= QUIET_MAX_FRACTION,
        "rule": f"others' CPU time <= {QUIET_MAX_FRACTION:.0%} of {cores} cores x wall, and "
                f"steal <= {QUIET_MAX_FRACTION:.0%}",
        "wall_seconds": round(wall, 1), "others_cpu_seconds": round(others, 2),
        "others_fraction": round(others / capacity, 4) if capacity else None,
        "kernel_threads_cpu_seconds": round(sum(used[k] for k in used if k in kernel), 2),
        "steal_fraction": round(steal, 4),
        "others": [{"pid": key[0], "comm": comm[key], "cpu_seconds": round(s, 2),
                    "kernel_thread": key in kernel} for s, key in busiest],
    }


class LoadWatch:
    """Samples /proc from the start of the bench to its end (see "Load" above)."""

    def __init__(self):
        self.start, self.cpu_before = time.monotonic(), read_cpu_ticks()
        self.first, self.last, self.comm = {}, {}, {}
        self.own, self.kernel, self.load_average = set(), set(), []
        self._next = 0.0
        self.sample("start")

    def sample(self, label: str | None = None) -> None:
        procs = read_processes()
        self.own |= process_tree(procs, os.getpid())
        self.kernel |= kernel_threads(procs)
        for key, (_, comm, ticks) in procs.items():
            # alive at the first sample: count from here; started later: count all of it
            self.first.setdefault(key, ticks if label == "start" else 0)
            self.last[key], self.comm[key] = ticks, comm
        if label:
            self.load_average.append({"at": label, "t": round(time.monotonic() - self.start, 1),
                                      "load": [round(x, 2) for x in os.getloadavg()]})

    def tick(self) -> None:
        """Sample every 2 s at most (catches short-lived processes; cheap)."""
        if time.monotonic() >= self._next:
            self._next = time.monotonic() + 2.0
            self.sample()

    def summary(self) -> dict:
        self.sample("end")
        return {**load_summary(self.first, self.last, self.comm, self.own, self.kernel,
                               self.cpu_before, read_cpu_ticks(),
                               time.monotonic() - self.start, os.cpu_count()),
                "load_average": self.load_average}


# -- this process's memory ---------------------------------------------------------------------
def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> None:
    """VmHWM := the current VmRSS, so the next peak is of what runs from now on."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
