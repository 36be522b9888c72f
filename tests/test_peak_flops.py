"""The MFU denominator: datasheet peaks by GPU name and precision, override, measured fallback."""

from __future__ import annotations

import logging

import pytest
import torch

import nbp_mega.metrics
from nbp_mega.peak_flops import datasheet_peak, peak_tflops


@pytest.mark.parametrize("name,bf16,tf32,fp32", [
    ("NVIDIA H100 80GB HBM3", 989.4, 494.7, 66.9),
    ("NVIDIA H100 PCIe", 756.0, 378.0, 51.2),
    ("NVIDIA H100 NVL", 835.5, 417.5, 60.0),
    ("NVIDIA H200", 989.4, 494.7, 66.9),
    ("NVIDIA GH200 480GB", 989.4, 494.7, 66.9),
    ("NVIDIA A100-SXM4-80GB", 312.0, 156.0, 19.5),
    ("NVIDIA A100 80GB PCIe", 312.0, 156.0, 19.5),
    ("NVIDIA A10", 125.0, 62.5, 31.2),       # not an A100
    ("NVIDIA L40S", 362.1, 183.0, 91.6),     # not an L4
    ("NVIDIA L4", 121.0, 60.0, 30.3),
    ("NVIDIA B200", 2250.0, 1125.0, 75.0),
])
def test_datasheet_peak_by_name_and_precision(name, bf16, tf32, fp32):
    assert datasheet_peak(name, "bf16", False) == bf16
    assert datasheet_peak(name, "fp32", True) == tf32
    assert datasheet_peak(name, "fp32", False) == fp32


def test_unknown_gpu_has_no_datasheet_peak():
    assert datasheet_peak("NVIDIA Imaginary X1", "bf16", False) is None


def test_override_wins():
    assert peak_tflops(torch.device("cpu"), "fp32", override=123.0) == 123.0


def test_hopper_is_no_longer_an_a100(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_tflops(torch.device("cuda", 0), "bf16") == 989.4


def test_unknown_gpu_and_cpu_measure_and_say_so(monkeypatch, caplog):
    measured = []
    monkeypatch.setattr(nbp_mega.metrics, "measure_matmul_tflops",
                        lambda device, dtype=torch.float32: measured.append((device, dtype))
                        or 7.5)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU")
    with caplog.at_level(logging.INFO, logger="nbp_mega.peak_flops"):
        assert peak_tflops(torch.device("cuda", 0), "bf16") == 7.5
        assert peak_tflops(torch.device("cpu"), "bf16") == 7.5
    assert "Mystery GPU is not in" in caplog.text
    assert measured == [(torch.device("cuda", 0), torch.bfloat16),
                        (torch.device("cpu"), torch.float32)]
