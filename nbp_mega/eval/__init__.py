"""Evaluation: FVD with a pinned protocol, per-block validation, generation diagnostics.

    from nbp_mega.eval import compute_fvd
    fvd = compute_fvd(real, fake, detector_path="i3d_torchscript.pt")  # [B, 3, T, H, W] in [0, 1]

tools/evaluate.py CONFIG runs every metric of an evaluation config and writes JSON + Markdown.
"""

from nbp_mega.eval.detector import DetectorError, load_detector, prepare
from nbp_mega.eval.frechet import FeatureStats, frechet_distance
from nbp_mega.eval.fvd import PRESETS, FVDConfig, compute_fvd, fvd_config, set_statistics

__all__ = ["PRESETS", "DetectorError", "FVDConfig", "FeatureStats", "compute_fvd",
           "frechet_distance", "fvd_config", "load_detector", "prepare", "set_statistics"]
