"""Temporal consistency: frame-to-frame change of generated clips against real ones.

    fake, real = TemporalStats(), TemporalStats()
    fake.update(videos)                           # [B, 3, T, H, W] in [0, 1], streamed
    report = compare(fake, real)

The paper sees "screen fluctuation" with large blocks (a whole latent frame per step): frames
generated together agree within a block, but the picture can jump between blocks. Real video
changes smoothly. So for each clip, d_t = mean |x_{t+1} - x_t| over pixels and channels
(t = 0..T-2); a clip fluctuates when d_t jumps around its own mean: its flicker is
std_t(d_t) / mean_t(d_t). The per-step profile mean_clips(d_t) shows where the jumps sit (at
block boundaries they line up, every few frames).
"""

from __future__ import annotations

import numpy as np
import torch


def frame_differences(videos: torch.Tensor) -> np.ndarray:
    """[B, 3, T, H, W] -> d [B, T - 1]: mean absolute change from frame t to t + 1."""
    if videos.ndim != 5 or videos.shape[2] < 2:
        raise ValueError(f"videos of shape {list(videos.shape)}: expected [B, 3, T >= 2, H, W]")
    v = videos.double()
    return (v[:, :, 1:] - v[:, :, :-1]).abs().mean(dim=(1, 3, 4)).cpu().numpy()


class TemporalStats:
    """Running sums of each clip's frame differences (float64)."""

    def __init__(self):
        self.clips, self.profile, self.mean_sum, self.flicker_sum = 0, None, 0.0, 0.0

    def update(self, videos: torch.Tensor) -> TemporalStats:
        d = frame_differences(videos)  # [B, T-1]
        if self.profile is None:
            self.profile = np.zeros(d.shape[1])
        elif d.shape[1] != len(self.profile):
            raise ValueError(f"clips of {d.shape[1] + 1} frames after clips of "
                             f"{len(self.profile) + 1}: expected one clip length per set")
        mean = d.mean(axis=1)
        self.clips += len(d)
        self.profile += d.sum(axis=0)
        self.mean_sum += float(mean.sum())
        self.flicker_sum += float((d.std(axis=1) / np.maximum(mean, 1e-12)).sum())
        return self

    def summary(self) -> dict:
        if not self.clips:
            raise ValueError("no clips: temporal statistics need at least one")
        return {"clips": self.clips, "mean_change": self.mean_sum / self.clips,
                "flicker": self.flicker_sum / self.clips,
                "profile": (self.profile / self.clips).tolist()}


def compare(fake: TemporalStats, real: TemporalStats) -> dict:
    """Both sets' summaries and fake / real ratios (1 = as steady as real video), with the
    largest ratio of the per-step profile and the step it is at (a fluctuation's place)."""
    f, r = fake.summary(), real.summary()
    if len(f["profile"]) != len(r["profile"]):
        raise ValueError(f"generated clips of {len(f['profile']) + 1} frames, real ones of "
                         f"{len(r['profile']) + 1}: expected the same length")
    ratio = np.asarray(f["profile"]) / np.maximum(np.asarray(r["profile"]), 1e-12)
    return {"generated": f, "real": r,
            "mean_change_ratio": f["mean_change"] / max(r["mean_change"], 1e-12),
            "flicker_ratio": f["flicker"] / max(r["flicker"], 1e-12),
            "profile_ratio": ratio.tolist(), "worst_step": int(ratio.argmax()),
            "worst_step_ratio": float(ratio.max())}
