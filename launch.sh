#!/usr/bin/env bash
""":"
# nbp_mega launcher: one file, read by bash or by Python.
#
#   deepspeed --hostfile hosts launch.sh CONFIG [key=value ...]   # cluster (DeepSpeed launcher)
#   NPROC_PER_NODE=8 bash launch.sh CONFIG [key=value ...]        # one node (torchrun)
#   NNODES=4 NODE_RANK=i MASTER_ADDR=host0 NPROC_PER_NODE=8 bash launch.sh CONFIG ...
#
# The DeepSpeed launcher runs the user script as `python -u launch.sh ... --local_rank=N`
# on every host, so below the bash part this file is a Python program: bash never reads past
# the `exec`, and to Python the bash part is a string. (`bash -n` cannot check this file.)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$here/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
nproc="${NPROC_PER_NODE:-1}"
nnodes="${NNODES:-1}"
if [ "$nnodes" -gt 1 ]; then
  rdzv=(--nnodes="$nnodes" --node_rank="${NODE_RANK:?set NODE_RANK}"
        --master_addr="${MASTER_ADDR:?set MASTER_ADDR}" --master_port="${MASTER_PORT:-29500}")
else
  rdzv=(--standalone)
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node="$nproc" \
  -m nbp_mega.train "$@"
":"""

# Python part: started by the DeepSpeed launcher (`python -u launch.sh CONFIG ...`).
import os
import runpy
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from nbp_mega.cluster.hosts import preflight_deepspeed_hosts  # noqa: E402

preflight_deepspeed_hosts()  # every host reachable, or stop now, naming those that are not
sys.argv[0] = "nbp_mega.train"
runpy.run_module("nbp_mega.train", run_name="__main__", alter_sys=True)
