"""Evaluate a trained model: FVD under a pinned protocol, validation loss and accuracy by
position, temporal consistency of its clips, and the tokenizer's reconstruction quality.

    python -m nbp_mega.eval CONFIG [key=value ...]          (= python tools/evaluate.py ...)
    torchrun --nproc-per-node 8 -m nbp_mega.eval CONFIG ...  # FVD sets split over 8 ranks
    python -m nbp_mega.eval CONFIG --watch RUN_DIR [--once] [--poll 300] [--until-pid PID]

CONFIG: YAML of nbp_mega.eval.config.EvalConfig (configs/eval/*.yaml; `fvd.protocol: ucf101`
or `k600` fixes the paper's protocol, keys beside it override). Writes (rank 0):
  OUT/results.json   every number, the config and protocol, the sha256 of the model's weights,
                     the tokenizer and the I3D file
  OUT/summary.md     the same in tables, with OUT/per_block.png and OUT/temporal.png
  OUT/stats/         each FVD set's feature statistics: an interrupted evaluation run again
                     resumes them; the reference set's are reused while set, protocol and
                     detector match
--watch RUN_DIR: evaluate each checkpoint of a training run as it appears (oldest first),
into OUT/step_NNNNNNNN/, sharing one reference-set statistics file, and add the numbers to
RUN_DIR/tensorboard/eval at the checkpoint's step. Stops after the run's last step (its
train.steps), after one pass with --once, or once process PID has ended (--until-pid: the
training job that started it, log.eval_config) and a last pass found nothing new.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time

from nbp_mega.eval.config import load_eval_config

STEP = re.compile(r"^step_(\d{8})$")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="evaluation YAML (configs/eval/)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. fvd.samples=256")
    p.add_argument("--watch", metavar="RUN_DIR", default=None,
                   help="evaluate every checkpoint of this run as it is written")
    p.add_argument("--once", action="store_true", help="--watch: one pass, then exit")
    p.add_argument("--poll", type=float, default=300.0, help="--watch: seconds between looks")
    p.add_argument("--until-pid", type=int, default=None,
                   help="--watch: stop once this process has ended (after a last pass)")
    p.add_argument("--compare", nargs="+", metavar="OUT", default=None,
                   help="tables and plots of these evaluations side by side (into --out)")
    p.add_argument("--out", default=None, help="--compare: output folder")
    args = p.parse_args(argv)
    if (args.compare is None) == (args.config is None):
        p.error("expected CONFIG (an evaluation) or --compare OUT ... --out DIR, one of them")
    if args.compare is not None and not args.out:
        p.error("--compare needs --out DIR")
    return args


def run_once(cfg, dims) -> dict:
    from nbp_mega.eval.report import write_results
    from nbp_mega.eval.runner import evaluate

    results = evaluate(cfg, dims)
    if dims.rank == 0:
        results["files"] = write_results(cfg, results)
    return results


def checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, name) of the run's complete checkpoints, oldest first."""
    folder = os.path.join(run_dir, "checkpoints")
    names = sorted(n for n in os.listdir(folder) if STEP.match(n)) if os.path.isdir(folder) \
        else []
    return [(int(STEP.match(n).group(1)), n) for n in names]


def final_step(run_dir: str) -> int | None:
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return int(yaml.safe_load(f).get("train", {}).get("steps", 0)) or None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def watch(cfg, dims, run_dir: str, *, once: bool, poll: float,
          until_pid: int | None = None) -> int:
    """Evaluate each new checkpoint; TensorBoard scalars at its step (rank 0)."""
    from torch.utils.tensorboard import SummaryWriter

    from nbp_mega.eval.report import scalars

    reference = cfg.reference_stats or os.path.join(cfg.out, "stats", "reference.npz")
    writer = SummaryWriter(os.path.join(run_dir, "tensorboard", "eval")) if dims.rank == 0 \
        else None
    last, evaluated = final_step(run_dir), 0
    while True:
        ended = until_pid is not None and not _alive(until_pid)  # then this pass is the last
        for step, name in checkpoints(run_dir):
            out = os.path.join(cfg.out, name)
            if os.path.exists(os.path.join(out, "results.json")):
                continue
            one = dataclasses.replace(cfg, run=run_dir, checkpoint=name, out=out,
                                      reference_stats=reference)
            results = run_once(one, dims)
            if writer is not None:
                for tag, value in scalars(results).items():
                    writer.add_scalar(tag, value, step)
                writer.flush()
                print(f"evaluated {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in
                                                        scalars(results).items()
                                                        if k.startswith("eval/")), flush=True)
            evaluated += 1
        done = last is not None and any(s >= last for s, _ in checkpoints(run_dir))
        if once or done or ended:
            break
        time.sleep(poll)
    if writer is not None:
        writer.close()
    return evaluated


def main(argv=None) -> int:
    import torch

    from nbp_mega.parallel.dims import ParallelConfig, init_parallel, shutdown_parallel

    args = parse_args(argv)
    if args.compare:
        from nbp_mega.eval.report import write_comparison

        try:
            files = write_comparison(args.compare, args.out)
        except (ValueError, FileNotFoundError) as e:
            print(f"evaluate.py: error: {e}", file=sys.stderr)
            return 2
        print(f"{args.out}: {', '.join(files.values())}")
        return 0
    try:
        overrides = list(args.overrides)
        if args.watch:
            overrides.append(f"run={args.watch}")
        cfg = load_eval_config(args.config, overrides)
    except ValueError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    joined = not torch.distributed.is_initialized()
    dims = init_parallel(ParallelConfig(tensor=1,
                                        backend="gloo" if cfg.device == "cpu" else "nccl"))
    try:
        if args.watch:
            n = watch(cfg, dims, args.watch, once=args.once, poll=args.poll,
                      until_pid=args.until_pid)
            if dims.rank == 0:
                print(f"{args.watch}: {n} checkpoints evaluated into {cfg.out}")
            return 0
        results = run_once(cfg, dims)
    except (ValueError, FileNotFoundError) as e:  # bad input: config, files, checkpoints
        if dims.rank == 0:
            print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        if joined:
            shutdown_parallel()
    if dims.rank == 0:
        print(f"{cfg.out}: {results['files']['results']}, {results['files']['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
