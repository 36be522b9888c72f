#!/usr/bin/env bash
# tools/gpu_check.sh OUT_DIR: what to run in the few minutes a GPU is lent, as one command.
#
# Stages, in order; each has its own timeout and log OUT_DIR/<stage>.log, and a failed stage
# does not stop the next ones:
#   env    nvidia-smi, Python/torch/CUDA versions, `python -m nbp_mega.ops --info` (as found)
#   deps   only where a package the project needs is missing: installs it from .whl/ (wheels
#          carried to a machine without network; see below), else from the index
#   build  pip install -e . --no-build-isolation --no-deps with NBP_REQUIRE_EXTENSION=1 and
#          TORCH_CUDA_ARCH_LIST = this GPU's capability only; then checks that nbp_mega._C has
#          CUDA kernels for it
#   tests  NBP_REQUIRE_EXTENSION=1 pytest -q -m gpu tests
#   train  synthetic shards; configs/tiny.yaml on one GPU (torchrun, 1 process, nccl, bf16),
#          evaluation and a checkpoint every 2 steps, stopped at step 4; the same command
#          again resumes to step 6; then checks metrics.jsonl (steps 1-6 once each, val_loss
#          at 2, 4, 6) and the checkpoints
#   bench  tools/bench_attention.py --device cuda --shapes paper long --dtype bfloat16 --json
#          > OUT_DIR/bench_attention_cuda.json (fused CUDA kernel, FlexAttention, SDPA with
#          the dense mask, SDPA is_causal), and its markdown tables in bench.log
#   generation  tools/bench_generation.py --device cuda --size 700m --dtype bf16 --cuda-graph
#          --json > OUT_DIR/bench_generation_cuda.json: the paper's 700M with random weights,
#          NBP rows / frames / NTP at batch 1 and 8, eager and with CUDA-graph steps; its tables
#          in generation.log put video frames/s of NBP rows and NTP next to the paper's 8.89
#          and 0.80 (one A100). If the graphs fail, their rows say SKIPPED with the error and
#          the eager ones stand
# OUT_DIR/summary.json, rewritten after every stage: each stage's exit code (124 = timed out,
# null = not run: no time left) and seconds. Exit status 0 when every stage run passed.
#
# Time: all of it under 9 minutes on one H100/H200. Each stage's timeout is also capped by
# what is left of GPU_CHECK_BUDGET seconds (default 540); a stage with < 15 s left is not run.
# Environment: GPU_CHECK_STAGES="env build ..." runs only those stages (in the order above);
# GPU_CHECK_PYTHON picks the interpreter (default: .venv/bin/python if it runs torch, else
# python3: the device machine gets the working tree without .venv and has its own torch);
# GPU_CHECK_BACKEND / GPU_CHECK_PRECISION (nccl / bf16) change the train stage.
#
# Wheels for a machine without network (the device machine has torch, numpy, pytest, yaml,
# tqdm, ninja, psutil, ... but not deepspeed, megatron-core, webdataset, braceexpand, hjson,
# pydantic): on a machine with network, in the repository root,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl megatron-core==0.16.1 webdataset==1.0.2 braceexpand==0.1.7 hjson pydantic \
#     pydantic-core annotated-types typing-inspection
#   .venv/bin/python -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
# and carry .whl: deps then takes ~20 s; from an index instead, 1-2 minutes (deepspeed builds
# from its source distribution).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STAGES=(env deps build tests train bench generation)
declare -A LIMIT=([env]=60 [deps]=150 [build]=240 [tests]=150 [train]=150 [bench]=180
                  [generation]=240)
RESULTS=()

now_ms() { echo $(($(date +%s%N) / 1000000)); }

pick_python() {
  if [[ -n "${GPU_CHECK_PYTHON:-}" ]]; then
    echo "$GPU_CHECK_PYTHON"
  elif "$ROOT/.venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "$ROOT/.venv/bin/python"
  else
    command -v python3
  fi
}

# -- the stages (each runs in its own bash under `timeout`, from the repository root) ----------
stage_env() {
  local rc=0
  nvidia-smi || rc=1
  "$PY" - <<'EOF' || rc=1
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN",
      torch.backends.cudnn.version(), "GPU available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f} GiB")
sys.exit(0 if torch.cuda.is_available() else "torch sees no GPU")
EOF
  command -v nvcc && nvcc --version | tail -2
  "$PY" -m nbp_mega.ops --info || rc=1
  return $rc
}

missing_packages() {  # the pip names of what the project imports and this Python lacks
  "$PY" - <<'EOF'
import importlib.util
need = {"deepspeed": "deepspeed", "megatron.core": "megatron-core", "webdataset": "webdataset",
        "braceexpand": "braceexpand", "yaml": "PyYAML", "tqdm": "tqdm", "numpy": "numpy",
        "sentencepiece": "sentencepiece", "tensorboard": "tensorboard", "ninja": "ninja",
        "pytest": "pytest", "hjson": "hjson", "pydantic": "pydantic"}
def found(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # its parent package is missing
        return False
print(" ".join(pip for module, pip in need.items() if not found(module)))
EOF
}

stage_deps() {
  local missing pins=() name pin
  missing="$(missing_packages)" || return 1
  if [[ -z "$missing" ]]; then
    echo "every package the project imports is installed"
    return 0
  fi
  echo "missing: $missing"
  for name in $missing; do  # the version requirements.txt pins, where it pins one
    pin="$(grep -i "^${name}==" requirements.txt || true)"
    pins+=("${pin:-$name}")
  done
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install --no-index --find-links .whl "${pins[@]}" || return 1
  else
    echo "no .whl/ here: trying the package index (no network on the device machine)"
    "$PY" -m pip install "${pins[@]}" || return 1
  fi
  missing="$(missing_packages)"
  [[ -z "$missing" ]] || { echo "still missing: $missing"; return 1; }
}

stage_build() {
  set -e
  local cap
  cap="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null; then
    CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc)")")"
  fi
  export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="$cap"
  export NBP_REQUIRE_EXTENSION=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  echo "building for sm $cap with $CUDA_HOME/bin/nvcc, $MAX_JOBS jobs"
  "$PY" -m pip install -e . --no-build-isolation --no-deps
  "$PY" - "$cap" <<'EOF'
import sys
from nbp_mega.ops import fused
info = fused.build_info()
print(info)
if not fused.CUDA_COMPILED or sys.argv[1] not in info["cuda"]["archs"]:
    sys.exit(f"nbp_mega._C has no CUDA kernels for sm {sys.argv[1]}: {info}")
EOF
}

stage_tests() {
  NBP_REQUIRE_EXTENSION=1 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
}

stage_train() {
  set -e
  local data="$OUT/data" run="$OUT/run"
  rm -rf "$data" "$run"
  "$PY" -m nbp_mega.data.synthetic "$data" --grid 5 8 8 --vocab 64 --classes 4 \
    --num-train 256 --num-val 64 --shard-size 64
  local train=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1
               -m nbp_mega.train configs/tiny.yaml "run_dir=$run" "data.shards=$data/train"
               "data.val_shards=$data/val" "parallel.backend=${GPU_CHECK_BACKEND:-nccl}"
               "train.precision=${GPU_CHECK_PRECISION:-bf16}" train.steps=6
               train.eval_every=2 train.save_every=2 log.progress=false)
  echo "== steps 1-4"
  "${train[@]}" train.stop_at=4
  echo "== resumed: steps 5-6"
  "${train[@]}" train.stop_at=0
  "$PY" - "$run" <<'EOF'
import json, os, sys
run = sys.argv[1]
rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")) if line.strip()]
steps = [r["step"] for r in rows if "loss" in r]
evals = [r["step"] for r in rows if "val_loss" in r]
latest = open(os.path.join(run, "checkpoints", "latest")).read().strip()
print(f"steps {steps}, evaluations at {evals}, latest checkpoint {latest}")
assert steps == [1, 2, 3, 4, 5, 6], steps
assert evals == [2, 4, 6], evals
assert latest.endswith("6"), latest
EOF
}

stage_bench() {
  local rc
  "$PY" tools/bench_attention.py --device cuda --shapes paper long --dtype bfloat16 --json \
    > "$OUT/bench_attention_cuda.json"
  rc=$?
  "$PY" -c 'import json, sys; sys.path.insert(0, "tools"); import bench_attention as b
print(b.markdown(json.load(open(sys.argv[1]))))' "$OUT/bench_attention_cuda.json"
  return $rc
}

stage_generation() {
  local rc json="$OUT/bench_generation_cuda.json"
  "$PY" tools/bench_generation.py --device cuda --size 700m --dtype bf16 --cuda-graph --json \
    > "$json"
  rc=$?
  "$PY" -c 'import json, sys; sys.path.insert(0, "tools"); import bench_generation as b
print(b.markdown(json.load(open(sys.argv[1]))))' "$json" || rc=1
  return $rc
}

# -- the runner ---------------------------------------------------------------------------------
write_summary() {
  local ok=true entry
  for entry in "${RESULTS[@]}"; do
    [[ "$entry" == *'"exit_code": 0,'* ]] || ok=false
  done
  local IFS=,
  printf '{"ok": %s, "python": "%s", "budget_s": %d, "total_seconds": %s,\n "stages": [%s\n]}\n' \
    "$ok" "$PY" "$BUDGET" "$(seconds_since "$START_MS")" "${RESULTS[*]}" \
    > "$OUT/summary.json"
  [[ "$ok" == true ]]
}

seconds_since() {
  local ms=$(($(now_ms) - $1))
  printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}

run_stage() {  # run_stage NAME: run stage_NAME under its timeout, log it, record it
  local name="$1" left limit start rc
  left=$((BUDGET - ($(now_ms) - START_MS) / 1000))
  limit=$((LIMIT[$name] < left ? LIMIT[$name] : left))
  if ((left < 15)); then
    echo "$name: not run, ${left}s left of the ${BUDGET}s budget" | tee "$OUT/$name.log"
    RESULTS+=("$(printf '\n  {"name": "%s", "exit_code": null, "seconds": 0, "timeout_s": %d, "log": "%s.log"}' "$name" "$limit" "$name")")
    write_summary
    return
  fi
  echo "== $name (timeout ${limit}s)"
  start="$(now_ms)"
  timeout --kill-after=5 "$limit" bash -c "cd '$ROOT' && stage_$name" > "$OUT/$name.log" 2>&1
  rc=$?
  RESULTS+=("$(printf '\n  {"name": "%s", "exit_code": %d, "seconds": %s, "timeout_s": %d, "log": "%s.log"}' "$name" "$rc" "$(seconds_since "$start")" "$limit" "$name")")
  echo "   exit $rc after $(seconds_since "$start")s: $OUT/$name.log"
  write_summary
}

main() {
  if (($# != 1)); then
    echo "usage: tools/gpu_check.sh OUT_DIR" >&2
    return 2
  fi
  local wanted=" ${GPU_CHECK_STAGES:-${STAGES[*]}} " name
  for name in $wanted; do
    [[ " ${STAGES[*]} " == *" $name "* ]] || { echo "unknown stage $name" >&2; return 2; }
  done
  mkdir -p "$1" || return 2
  OUT="$(cd "$1" && pwd)"
  START_MS="$(now_ms)"
  PY="$(pick_python)"
  BUDGET="${GPU_CHECK_BUDGET:-540}"
  export OUT PY
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  export -f stage_env stage_deps stage_build stage_tests stage_train stage_bench
  export -f stage_generation
  export -f missing_packages
  echo "python: $PY; logs and summary.json in $OUT"
  for name in "${STAGES[@]}"; do
    [[ "$wanted" == *" $name "* ]] && run_stage "$name"
  done
  write_summary
}

# Run when executed; only define the functions when sourced (tests/test_gpu_check.py).
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
