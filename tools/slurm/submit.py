#!/usr/bin/env python3
"""Submit a training run to SLURM: tools/slurm/train.sbatch, filled in from the config.

    tools/slurm/submit.py configs/nbp_700m.yaml train.steps=20000 --nodes 4 --gpus-per-node 8 \\
        --time 24:00:00 --partition gpu
    tools/slurm/submit.py configs/tiny.yaml --tasks-per-node 2 --dry-run   # CPU nodes; print it

One rank per GPU; on CPU-only nodes (no --gpus-per-node) --tasks-per-node ranks per node, each
with --cpus-per-task cores. The job writes its logs to <run_dir>/logs/ (slurm-<jobid>.out and
<jobid>/restart<k>/rank<r>.log), checkpoints and requeues itself on SIGUSR1 (sent
--signal-seconds before the time limit) or SIGTERM (preemption), and resumes from
<run_dir>/checkpoints/latest. The filled-in script is kept as <run_dir>/logs/train.sbatch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from nbp_mega.cluster.slurm import JobRequest, prepare_job  # noqa: E402
from nbp_mega.config_fields import ConfigError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for nbp_mega.train")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per node, one rank each (default 0: CPU-only nodes)")
    p.add_argument("--tasks-per-node", type=int, default=0,
                   help="CPU-only nodes: ranks per node (default 1)")
    p.add_argument("--cpus-per-task", type=int, default=0,
                   help="cores per rank (default: the partition's); sets OMP_NUM_THREADS")
    p.add_argument("--time", default="", help="time limit, as sbatch --time (e.g. 24:00:00)")
    p.add_argument("--partition", default="", help="sbatch --partition")
    p.add_argument("--account", default="", help="sbatch --account")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="SIGUSR1 this many seconds before the time limit, to checkpoint and "
                        "requeue (SLURM may send it up to 60 s earlier; 0 = none; default 300)")
    p.add_argument("--job-name", default="", help="default: nbp-<name of run_dir>")
    p.add_argument("--python", default="",
                   help="the ranks' Python on the nodes (default: the one running this)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the batch script and the sbatch command; submit nothing")
    args = p.parse_intermixed_args(argv)
    for name in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task",
                 "signal_seconds"):
        if getattr(args, name) < (1 if name == "nodes" else 0):
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected "
                    f"{'a positive' if name == 'nodes' else 'a non-negative'} integer")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    request = JobRequest(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                         tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
                         time=args.time, partition=args.partition, account=args.account,
                         signal_seconds=args.signal_seconds, job_name=args.job_name,
                         python=args.python)
    config = os.path.abspath(args.config)
    try:
        script, run_dir = prepare_job(config, args.overrides, request)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = os.path.join(run_dir, "logs", "train.sbatch")
    command = ["sbatch", "--parsable", path, config, *args.overrides]
    if args.dry_run:
        print(script, end="")
        print("# would run: " + " ".join(command), file=sys.stderr)
        return 0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(script)
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        print(f"error: sbatch failed ({proc.returncode}): {proc.stderr.strip()}",
              file=sys.stderr)
        return proc.returncode
    job_id = proc.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: logs in {run_dir}/logs/slurm-{job_id}.out and "
          f"{run_dir}/logs/{job_id}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
