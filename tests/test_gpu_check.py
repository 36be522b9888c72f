"""tools/gpu_check.sh without a GPU: it parses, and its runner goes on after a failed or timed-out
stage, leaves out what the time budget cannot fit, and says so in summary.json; its generation
stage runs the generation bench as the GPU needs it (a stand-in bench answers here).

The stages themselves need a GPU (the train stage also runs on the CPU with
GPU_CHECK_BACKEND=gloo GPU_CHECK_PRECISION=fp32, in about a minute: not run here).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from tests.test_bench_tools import load_tool

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "tools" / "gpu_check.sh"


def run_bash(code: str, **env) -> subprocess.CompletedProcess:
    """bash -c code; GPU_CHECK_PYTHON set spares the check that a venv's torch imports."""
    env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable, **env}
    return subprocess.run(["bash", "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def test_gpu_check_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_gpu_check_is_shellcheck_clean():
    run = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout


def test_gpu_check_goes_on_after_a_failed_stage_and_records_each(tmp_path):
    # Stand-in stages: env passes, deps fails, build outlives its 3 s timeout; the 17 s
    # budget then leaves < 15 s, so tests, train, bench and generation are not run.
    code = f"""
    source {SCRIPT}
    stage_env() {{ echo environment fine; }}
    stage_deps() {{ echo broken; return 3; }}
    stage_build() {{ sleep 60; }}
    stage_tests() {{ echo never; }}
    LIMIT[build]=3
    main {tmp_path}
    """
    run = run_bash(code, GPU_CHECK_BUDGET="17")
    assert run.returncode == 1, run.stdout + run.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is False and summary["budget_s"] == 17
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["env", "deps", "build", "tests", "train", "bench", "generation"]
    assert {n: s["exit_code"] for n, s in stages.items()} == {
        "env": 0, "deps": 3, "build": 124, "tests": None, "train": None, "bench": None,
        "generation": None}
    assert 3 <= stages["build"]["seconds"] < 10 and stages["build"]["timeout_s"] == 3
    assert (tmp_path / "env.log").read_text() == "environment fine\n"
    assert (tmp_path / "deps.log").read_text() == "broken\n"
    assert "not run" in (tmp_path / "tests.log").read_text()


def test_gpu_check_runs_the_chosen_stages_only(tmp_path):
    code = f"""
    source {SCRIPT}
    stage_bench() {{ echo benched; }}
    main {tmp_path}
    """
    run = run_bash(code, GPU_CHECK_STAGES="bench")
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is True and [s["name"] for s in summary["stages"]] == ["bench"]
    assert run_bash(f"bash {SCRIPT} {tmp_path}", GPU_CHECK_STAGES="bild").returncode == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_gpu_check_env_stage_says_there_is_no_gpu(tmp_path):
    run = run_bash(f"bash {SCRIPT} {tmp_path}", GPU_CHECK_STAGES="env")
    assert run.returncode == 1
    stage, = json.loads((tmp_path / "summary.json").read_text())["stages"]
    assert stage["name"] == "env" and stage["exit_code"] == 1
    log = (tmp_path / "env.log").read_text()
    assert "torch sees no GPU" in log and '"extension"' in log  # nbp_mega.ops --info ran


def canned_generation_records() -> list[dict]:
    """What tools/bench_generation.py --cuda-graph prints when the graphs fail to capture."""
    bench = load_tool("bench_generation")
    machine = {"shape": "machine", "gpu": "a GPU", "cpu": "x86_64", "threads": 16,
               "torch": torch.__version__, "dtype": "bf16", "quiet": True,
               "model": {"layers": 24, "hidden": 1536, "heads": 16}}
    setup = dict(block_len=16, batch=1, steps=48, seconds=1.2, video_frames_per_s=10.0,
                 video_frames_per_s_with_decode=9.5, sampler_overhead=0.05,
                 sampler_fraction=0.04)
    rows = [dict(setup, shape="rows", variant="eager"),
            dict(setup, shape="ntp", variant="eager", steps=768, video_frames_per_s=0.75,
                 video_frames_per_s_with_decode=0.74),
            {"shape": "rows", "variant": "cuda_graph", "batch": 1, "seconds": None,
             "error": "RuntimeError: capture failed"}]
    return [machine, *rows, *bench.comparisons(rows, "cuda")]


def test_gpu_check_generation_stage_benches_700m_bf16_with_and_without_graphs(tmp_path):
    # A stand-in interpreter answers for the bench (recording its arguments) and hands
    # everything else (the tables) to the real one.
    canned = tmp_path / "canned.json"
    canned.write_text(json.dumps(canned_generation_records()))
    stub = tmp_path / "python"
    stub.write_text(f"""#!/bin/bash
if [[ "$1" == tools/bench_generation.py ]]; then
  echo "$@" > {tmp_path}/args
  cat {canned}
  exit 0
fi
exec {sys.executable} "$@"
""")
    stub.chmod(0o755)
    out = tmp_path / "out"
    run = run_bash(f"bash {SCRIPT} {out}", GPU_CHECK_STAGES="generation",
                   GPU_CHECK_PYTHON=str(stub))
    assert run.returncode == 0, run.stdout + run.stderr + (out / "generation.log").read_text()
    args = (tmp_path / "args").read_text().split()
    assert args[:1] == ["tools/bench_generation.py"] and "--json" in args
    assert " ".join(args[1:]).startswith("--device cuda --size 700m --dtype bf16 --cuda-graph")
    written = json.loads((out / "bench_generation_cuda.json").read_text())
    assert written == json.loads(canned.read_text())  # the bench's JSON, kept under OUT_DIR
    log = (out / "generation.log").read_text()
    assert "| eager | 1 | 10.0 | 0.75 | 8.89 / 0.80 |" in log  # NBP rows, NTP, the paper's
    assert "| rows | cuda_graph | 1 | SKIPPED: RuntimeError: capture failed |" in log
