"""Peak dense TFLOP/s of one device, the denominator of MFU.

On a GPU the peak is the datasheet's dense tensor-core rate for the precision the matmuls run
in (bf16; tf32 when torch lets fp32 matmuls use it; plain fp32 otherwise), looked up by the
name torch reports. An unknown GPU and the CPU get a measured matmul rate instead (said in the
log), and `log.peak_tflops` overrides both. Sparsity figures (2x) are never used.
"""

from __future__ import annotations

import logging
import re

import torch

log = logging.getLogger("nbp_mega.peak_flops")

# (pattern in torch.cuda.get_device_name(), bf16, tf32, fp32) dense TFLOP/s; first match wins,
# so the specific variants come before the family. Sources: NVIDIA's datasheets (dense
# figures = half the "with sparsity" ones): A100 (2021-06), H100 SXM/PCIe/NVL (2023), H200
# (2024-11), B200 (DGX B200, 2024), L40S, L4, A10, A40, RTX A6000, RTX 4090 (Ada whitepaper,
# fp16/bf16 with fp32 accumulate), V100 (fp16 tensor cores; no bf16); AMD's MI300X datasheet.
GPU_PEAKS: list[tuple[str, float, float, float]] = [
    (r"H100.*PCIe", 756.0, 378.0, 51.2),
    (r"H100 NVL", 835.5, 417.5, 60.0),
    (r"H200 NVL", 835.5, 417.5, 60.0),
    (r"H100|H800|H200|GH200", 989.4, 494.7, 66.9),  # SXM and GH200: same tensor rate
    (r"B200", 2250.0, 1125.0, 75.0),
    (r"A100|A800", 312.0, 156.0, 19.5),
    (r"L40S", 362.1, 183.0, 91.6),
    (r"L4\b", 121.0, 60.0, 30.3),
    (r"A10\b", 125.0, 62.5, 31.2),
    (r"A40\b", 149.7, 74.8, 37.4),
    (r"RTX A6000", 154.8, 77.4, 38.7),
    (r"RTX 4090", 165.2, 82.6, 82.6),
    (r"V100", 125.0, 15.7, 15.7),  # fp16 tensor cores; bf16 is emulated, tf32 absent
    (r"MI300X", 1307.4, 653.7, 163.4),
]


def datasheet_peak(device_name: str, precision: str, fp32_uses_tf32: bool) -> float | None:
    """Dense TFLOP/s of `device_name` for precision "bf16" | "fp32", or None if unknown."""
    for pattern, bf16, tf32, fp32 in GPU_PEAKS:
        if re.search(pattern, device_name):
            if precision == "bf16":
                return bf16
            return tf32 if fp32_uses_tf32 else fp32
    return None


def peak_tflops(device: torch.device, precision: str, override: float = 0.0) -> float:
    """The MFU denominator for one device: override > datasheet > a measured matmul."""
    from nbp_mega.metrics import measure_matmul_tflops

    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = torch.get_float32_matmul_precision() != "highest"
        peak = datasheet_peak(name, precision, tf32)
        if peak is not None:
            log.info("MFU peak: %.1f TFLOP/s (%s, %s, datasheet dense)", peak, name, precision)
            return peak
        log.warning("MFU peak: %s is not in nbp_mega/peak_flops.py's table; using a measured "
                    "matmul rate (set log.peak_tflops to the datasheet figure)", name)
    dtype = torch.bfloat16 if precision == "bf16" and device.type == "cuda" else torch.float32
    peak = measure_matmul_tflops(device, dtype=dtype)
    log.info("MFU peak: %.3f TFLOP/s measured by a %s matmul on %s", peak, dtype, device)
    return peak
