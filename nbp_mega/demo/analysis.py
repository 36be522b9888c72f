"""Objective numbers for the demo report: where the square is, what colour, which way it
moves; the validation loss of a trained model per latent row; tokenizer reconstruction PSNR.

Legend: N clips; F frames; R side in pixels; C = 3; T, H, W latent grid; Nt targets.

A demo clip is a grey background with one saturated square (nbp_mega/demo/videos.py), so the
square is simply the pixels whose channels differ by more than SATURATION (grey has none).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nbp_mega.demo.videos import CLASSES

SATURATION = 60  # max - min channel of a "square" pixel (the class colours have >= 145)
DIRECTIONS = {(0, 1): "right", (1, 0): "down", (0, -1): "left", (-1, 0): "up"}
MIN_SPEED = 0.4  # pixels per frame: slower counts as "still"


@dataclass
class ClipStats:
    found: float  # fraction of frames with a square
    area: float  # mean square pixels per frame where found
    colour: tuple[float, float, float]  # mean RGB of the square's pixels
    velocity: tuple[float, float]  # (dy, dx) pixels per frame of the square's centre
    nearest_class: int  # class whose colour is nearest (-1: no square)
    direction: str  # right / down / left / up / still / none

    @property
    def matches(self) -> tuple[bool, bool]:
        return self.nearest_class >= 0, self.direction in DIRECTIONS.values()


def square_mask(frames: np.ndarray) -> np.ndarray:
    """uint8 [F, R, R, 3] -> bool [F, R, R]: the saturated pixels."""
    f = frames.astype(np.int16)
    return f.max(axis=-1) - f.min(axis=-1) > SATURATION


def _direction(velocity: np.ndarray) -> str:
    if np.hypot(*velocity) < MIN_SPEED:
        return "still"
    axis = int(np.argmax(np.abs(velocity)))
    step = [0, 0]
    step[axis] = int(np.sign(velocity[axis]))
    return DIRECTIONS[tuple(step)]


def clip_stats(frames: np.ndarray) -> ClipStats:
    """The square of one clip uint8 [F, R, R, 3]: colour, area, velocity, class guesses."""
    mask = square_mask(frames)
    found = mask.reshape(len(mask), -1).any(axis=1)
    if not found.any():
        return ClipStats(0.0, 0.0, (0.0, 0.0, 0.0), (0.0, 0.0), -1, "none")
    colour = frames[mask].astype(np.float64).mean(axis=0)
    yy, xx = np.mgrid[0:frames.shape[1], 0:frames.shape[2]]
    centres = np.array([(yy[m].mean(), xx[m].mean()) for m in mask[found]])  # [F', 2]
    times = np.flatnonzero(found)
    velocity = (np.polyfit(times, centres, 1)[0] if len(times) > 1 else np.zeros(2))
    palette = np.array([c.colour for c in CLASSES], dtype=np.float64)
    nearest = int(np.argmin(((palette - colour) ** 2).sum(axis=1)))
    return ClipStats(float(found.mean()), float(mask[found].sum() / found.sum()),
                     tuple(colour.round(1)), tuple(velocity.round(2)), nearest,
                     _direction(velocity))


def class_summary(clips: list[np.ndarray], labels: list[int]) -> list[dict]:
    """Per class: clips, mean colour and velocity, and how often colour / motion direction
    match the class (the colour nearest to the square's, the dominant axis of its motion)."""
    stats = [clip_stats(c) for c in clips]
    rows = []
    for k, cls in enumerate(CLASSES):
        mine = [s for s, y in zip(stats, labels, strict=True) if y == k]
        if not mine:
            continue
        want = DIRECTIONS[cls.direction]
        rows.append({
            "class": cls.name, "clips": len(mine),
            "square_found": float(np.mean([s.found for s in mine])),
            "area": float(np.mean([s.area for s in mine])),
            "colour": [round(float(x), 1) for x in np.mean([s.colour for s in mine], axis=0)],
            "velocity": [round(float(x), 2) for x in np.mean([s.velocity for s in mine],
                                                              axis=0)],
            "colour_match": float(np.mean([s.nearest_class == k for s in mine])),
            "direction_match": float(np.mean([s.direction == want for s in mine])),
            "directions": sorted({s.direction for s in mine}),
        })
    return rows


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 arrays of one shape."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
