"""Temporal consistency (nbp_mega.eval.temporal): known frame changes, and a clip that jumps
every few frames (the paper's screen fluctuation) found where it jumps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nbp_mega.eval.temporal import TemporalStats, compare, frame_differences


def drifting(n: int, frames: int = 9, step: float = 0.01) -> torch.Tensor:
    """[n, 3, frames, 8, 8]: every pixel brightens by `step` a frame, from its own level."""
    base = torch.linspace(0.1, 0.5, n)[:, None, None, None, None]
    t = torch.arange(frames, dtype=torch.float32)[None, None, :, None, None]
    return (base + step * t).expand(n, 3, frames, 8, 8).clone()


def test_frame_differences_are_the_mean_absolute_change():
    d = frame_differences(drifting(2, step=0.02))
    np.testing.assert_allclose(d, 0.02, rtol=1e-5)
    assert d.shape == (2, 8)
    with pytest.raises(ValueError, match="T >= 2"):
        frame_differences(drifting(1, frames=1))


def test_a_clip_that_jumps_between_blocks_flickers_where_it_jumps():
    """Real: a steady drift. Generated: the same with a jump of 0.1 after frame 4 (blocks of
    4 frames): flicker well above real's, and the worst step is 3 -> 4."""
    real, same, jumpy = TemporalStats(), TemporalStats(), TemporalStats()
    clips = drifting(6)
    real.update(clips[:3]).update(clips[3:])  # streamed in two batches
    same.update(clips)
    jumped = clips.clone()
    jumped[:, :, 4:] += 0.1
    jumpy.update(jumped)
    steady = compare(same, real)
    assert steady["flicker_ratio"] == pytest.approx(1) and steady["mean_change_ratio"] == \
        pytest.approx(1)
    assert steady["generated"]["flicker"] == pytest.approx(0, abs=1e-5)  # constant change
    out = compare(jumpy, real)
    assert out["worst_step"] == 3 and out["worst_step_ratio"] == pytest.approx(11, rel=1e-4)
    assert out["mean_change_ratio"] == pytest.approx((8 * 0.01 + 0.1) / (8 * 0.01), rel=1e-4)
    assert out["generated"]["flicker"] > 1 and out["generated"]["clips"] == 6
    with pytest.raises(ValueError, match="same length"):
        compare(TemporalStats().update(drifting(2, frames=5)), real)
