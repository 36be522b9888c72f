"""Backend choice and the warning for GPUs that torch cannot use (a fake nvidia-smi)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from nbp_mega.config_fields import ConfigError
from nbp_mega.parallel import dims as pdims

SMI = """#!/bin/sh
[ "$1" = "-L" ] || exit 2
echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)"
echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)"
"""


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text(SMI)
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_gpus_torch_cannot_use_are_listed(fake_smi):
    assert pdims.gpus_torch_cannot_use() == [
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)",
        "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)"]


def test_no_nvidia_smi_means_no_hidden_gpus(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert pdims.gpus_torch_cannot_use() == []


def test_cpu_training_on_a_gpu_machine_is_loud(fake_smi, dims, caplog):
    with caplog.at_level(logging.INFO, logger="nbp_mega.parallel"):
        pdims.report_devices(dims)
    assert "device cpu, backend gloo" in caplog.text
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "TRAINING ON THE CPU" in warning[0].getMessage()
    assert "2 GPU(s)" in warning[0].getMessage()


def test_quiet_on_a_cpu_machine(monkeypatch, tmp_path, dims, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="nbp_mega.parallel"):
        pdims.report_devices(dims)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_backend_choice(fake_smi):
    assert pdims.choose_backend("auto") == "gloo"
    assert pdims.choose_backend("gloo") == "gloo"
    with pytest.raises(ConfigError, match="backend=nccl.*nvidia-smi lists 2.*driver older"):
        pdims.choose_backend("nccl")
