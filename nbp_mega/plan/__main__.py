"""`python -m nbp_mega.plan CONFIG [key=value ...] --gpus N --gpu-mem GiB [options]`.

Lists the layouts that fit (memory per GPU by component, step time) and recommends one: the
fastest that leaves --margin of the memory free. --preset fills in a GPU's memory, peak and
link rates (explicit options win). Exit status 1 (with the reason) when nothing fits.
"""

from __future__ import annotations

import argparse
import json
import sys

# name: (memory GiB, dense bf16 TFLOP/s, NVLink all-reduce bus GB/s, network GB/s per GPU)
PRESETS = {
    "a100-80gb": (80.0, 312.0, 235.0, 25.0),  # NVLink 3, 8 x HDR 200 Gb/s per node
    "h100-80gb": (80.0, 989.4, 370.0, 50.0),  # NVLink 4 (SXM), 8 x NDR 400 Gb/s per node
}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m nbp_mega.plan", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for training")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a GPU's defaults")
    p.add_argument("--gpu-mem", type=float, help="memory of one GPU, GiB")
    p.add_argument("--node-gpus", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--intra-bw", type=float, help="GB/s per GPU inside a node (default 150)")
    p.add_argument("--inter-bw", type=float, help="GB/s per GPU between nodes (default 25)")
    p.add_argument("--peak-tflops", type=float, help="dense TFLOP/s of one GPU in the "
                   "config's precision (default 312, an A100's bf16)")
    p.add_argument("--efficiency", type=float, default=0.45,
                   help="fraction of the peak the matmuls reach (default 0.45)")
    p.add_argument("--margin", type=float, default=0.10,
                   help="memory fraction the recommendation leaves free (default 0.10)")
    p.add_argument("--reserve", type=float, default=2.0,
                   help="GiB per GPU outside PyTorch's allocator: CUDA context, NCCL (2)")
    p.add_argument("--top", type=int, default=15, help="rows of the table (default 15)")
    p.add_argument("--json", action="store_true", help="print a JSON record instead")
    args = p.parse_intermixed_args(argv)
    mem, peak, intra, inter = PRESETS.get(args.preset, (None, 312.0, 150.0, 25.0))
    args.gpu_mem = args.gpu_mem or mem
    if args.gpu_mem is None:
        p.error("give --gpu-mem (GiB of one GPU) or a --preset")
    args.peak_tflops = args.peak_tflops or peak
    args.intra_bw, args.inter_bw = args.intra_bw or intra, args.inter_bw or inter
    return args


def main(argv=None) -> int:
    from nbp_mega.config import load_config
    from nbp_mega.config_fields import ConfigError
    from nbp_mega.plan.layout import Cluster, Job
    from nbp_mega.plan.report import format_table, plan_record
    from nbp_mega.plan.search import nothing_fits_message, search

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        cluster = Cluster(gpus=args.gpus, gpu_mem_gib=args.gpu_mem, node_gpus=args.node_gpus,
                          intra_bw=args.intra_bw, inter_bw=args.inter_bw,
                          peak_tflops=args.peak_tflops, efficiency=args.efficiency,
                          margin=args.margin, reserve_gib=args.reserve)
        plan = search(Job.of_config(cfg), cluster)
    except ConfigError as e:
        print(f"nbp_mega.plan: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"config": args.config, "overrides": args.overrides,
                          **plan_record(plan)}, indent=1))
    else:
        print(format_table(plan, args.top))
    if plan.recommended is None:
        print(f"nbp_mega.plan: {nothing_fits_message(plan)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
