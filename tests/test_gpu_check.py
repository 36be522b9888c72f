"""tools/gpu_check.sh without a GPU: it parses, and its runner goes on after a failed or timed-out
stage, leaves out what the time budget cannot fit, and says so in summary.json.

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
    # budget then leaves < 15 s, so tests, train and bench are not run.
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
    assert list(stages) == ["env", "deps", "build", "tests", "train", "bench"]
    assert {n: s["exit_code"] for n, s in stages.items()} == {
        "env": 0, "deps": 3, "build": 124, "tests": None, "train": None, "bench": None}
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
