"""FVD: the protocol fixed in code, feature statistics streamed, resumable and split over ranks.

    fvd = compute_fvd(real, fake, detector_path="i3d_torchscript.pt")   # tensors or iterables
    stats = set_statistics(source, detector, cfg, path="out/fake_0.npz", group=dims.dp_group)

A protocol (FVDConfig; presets `ucf101` and `k600` from the NBP paper's evaluation) says which
frames, at what size, how many videos, how many folds. A video set is a `VideoSource`: videos
[n, 3, T, H, W] in [0, 1] by index range, the same videos for the same range whoever asks, so
rank r streams batches r, r + world, ... of it and an interrupted set resumes at the batch after
its last saved state (each rank's state file, written every `save_every` batches). Only one
batch of videos exists at a time. A finished set's statistics are a file recording what made
them (the set, the protocol's feature settings, the detector's sha256), reused only when all
of those match: the reference-set cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from typing import Protocol

import numpy as np
import torch

from nbp_mega.config_fields import ConfigError, option
from nbp_mega.eval.detector import Detector, load_detector, prepare
from nbp_mega.eval.frechet import FeatureStats, stats_distance
from nbp_mega.parallel.collectives import all_gather_objects, group_size

# What a video is for the detector: these fields change the features of a given set.
FEATURE_FIELDS = ("frames", "eval_resolution")


@dataclasses.dataclass
class FVDConfig:
    """An FVD protocol: presets fill every field; keys given beside `protocol` override it."""

    protocol: str = option("custom", "ucf101 | k600 (the paper's) | fvd2048_16f (StyleGAN-V's "
                           "metric) | custom (these fields)",
                           choices=["ucf101", "k600", "fvd2048_16f", "custom"])
    detector: str = option("", "path of StyleGAN-V's i3d_torchscript.pt (nothing downloaded)")
    detector_sha256: str = option("", "pin: refuse a detector file of another sha256 "
                                  "(empty: record the file's checksum, do not check)")
    allow_other_detector: bool = option(False, "use a detector that fails the pin anyway")
    frames: int = option(16, "the first this many frames of each clip are evaluated", min=1)
    resolution: int = option(128, "clips are read and generated at this size (square)", min=8)
    eval_resolution: int = option(0, "frames resized to this size before the I3D's 224 "
                                  "(0 = as read; K600: 64)", min=0)
    fps: float = option(0.0, "real clips resampled to this rate (0 = the file's)", min=0.0)
    samples: int = option(2048, "generated videos per fold", min=2)
    folds: int = option(1, "independent sets of `samples` generated videos; FVD is the mean "
                        "over folds (with its std)", min=1)
    reference_clips: int = option(0, "real clips (0 = samples)", min=0)
    context_frames: int = option(0, "frame prediction: the first this many pixel frames of "
                                 "each generated clip come from a real clip (K600: 5), "
                                 "reconstructed by the tokenizer and evaluated too", min=0)
    seed: int = option(0, "seed of generated sample i is seed + i; real clips are drawn "
                       "from it too")
    batch_size: int = option(16, "videos per detector (and generator) call", min=1)
    save_every: int = option(16, "batches between saved states (resume)", min=1)

    @property
    def num_reference(self) -> int:
        return self.reference_clips or self.samples

    def feature_settings(self) -> dict:
        return {k: getattr(self, k) for k in FEATURE_FIELDS}

    def validate(self) -> None:
        if self.context_frames >= self.frames:
            raise ConfigError(f"fvd.context_frames={self.context_frames} with fvd.frames="
                              f"{self.frames}: expected fewer given frames than evaluated ones")


# NBP_FACTS.md section 7. UCF-101: 10,000 class-conditional samples x 4 folds vs random training
# clips, 8 fps, 128x128. K600: 50,000 x 4 folds, generated at 128x128 and evaluated at 64x64, the
# 5 conditioning frames (tokenizer reconstructions) part of the evaluated clip. Both: the first
# 16 of the 17 frames.
PRESETS = {
    "ucf101": dict(frames=16, resolution=128, eval_resolution=0, fps=8.0, samples=10_000,
                   folds=4, reference_clips=10_000, context_frames=0),
    "k600": dict(frames=16, resolution=128, eval_resolution=64, fps=0.0, samples=50_000,
                 folds=4, reference_clips=50_000, context_frames=5),
    # StyleGAN-V's fvd2048_16f: 2048 generated vs 2048 real clips of 16 frames, one fold (the
    # size stays the config's)
    "fvd2048_16f": dict(frames=16, samples=2048, folds=1, reference_clips=2048),
}


def fvd_config(section: dict | None = None) -> FVDConfig:
    """An FVDConfig from a YAML section: its protocol's preset, then the section's keys."""
    from nbp_mega.config_fields import check, merge

    section = dict(section or {})
    base = merge(FVDConfig(), {"protocol": section.get("protocol", "custom")}, prefix="fvd.")
    cfg = merge(dataclasses.replace(base, **PRESETS.get(base.protocol, {})), section, "fvd.")
    check(cfg, prefix="fvd.")
    return cfg


class VideoSource(Protocol):
    """A fixed, indexable set of videos."""

    def __len__(self) -> int: ...

    def videos(self, lo: int, hi: int) -> torch.Tensor:
        """Videos lo..hi-1: [hi - lo, 3, T, H, W] floats in [0, 1]; the same for the same range."""
        ...

    def describe(self) -> dict:
        """What identifies the set (recorded with its statistics; a resume checks it)."""
        ...


class TensorSource:
    """Videos already in memory [N, 3, T, H, W]."""

    def __init__(self, videos: torch.Tensor, name: str = "tensor"):
        self.data, self.name = videos, name

    def __len__(self) -> int:
        return len(self.data)

    def videos(self, lo: int, hi: int) -> torch.Tensor:
        return self.data[lo:hi]

    def describe(self) -> dict:
        return {"kind": self.name, "shape": list(self.data.shape)}


class Slice:
    """Videos lo..hi-1 of another source (one fold of a generated set)."""

    def __init__(self, source: VideoSource, lo: int, hi: int):
        self.source, self.lo, self.hi = source, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def videos(self, lo: int, hi: int) -> torch.Tensor:
        return self.source.videos(self.lo + lo, self.lo + hi)

    def describe(self) -> dict:
        return {**self.source.describe(), "slice": [self.lo, self.hi]}


def batch_features(detector: Detector, videos: torch.Tensor, cfg: FVDConfig) -> torch.Tensor:
    """Videos [B, 3, T, H, W] in [0, 1] -> detector features [B, D] float64 (resized on the
    detector's device: on a GPU the 224 x 224 frames never exist on the host)."""
    x = prepare(videos.to(detector.device), frames=cfg.frames,
                resolution=cfg.eval_resolution or None)
    return detector.features(x)


# -- statistics files ------------------------------------------------------------------------
def save_stats(path: str, stats: FeatureStats, meta: dict) -> None:
    """Atomically (a crash leaves the old file or the new one, never half of one)."""
    tmp = f"{path}.tmp{os.getpid()}"
    state = stats.state_dict()
    with open(tmp, "wb") as f:
        np.savez(f, count=state["count"], mean=np.asarray(state["mean"], np.float64),
                 m2=np.asarray(state["m2"], np.float64), meta=json.dumps(meta, sort_keys=True))
    os.replace(tmp, path)


def load_stats(path: str) -> tuple[FeatureStats, dict]:
    try:
        with np.load(path, allow_pickle=False) as z:
            stats = FeatureStats()
            mean, m2 = (None if z[k].ndim == 0 else z[k] for k in ("mean", "m2"))
            stats.load_state_dict({"count": int(z["count"]), "mean": mean, "m2": m2})
            return stats, json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a statistics file written by nbp_mega.eval ({e}); "
                         "delete it to recompute") from None


def _check_meta(path: str, found: dict, expected: dict) -> None:
    diff = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    if diff:
        detail = "; ".join(f"{k}: file {found.get(k)!r}, now {expected.get(k)!r}" for k in diff)
        raise ValueError(f"{path} holds statistics of another set or protocol ({detail}). "
                         "Expected statistics made with the same set, protocol and detector: "
                         "delete the file to recompute, or give another path")


def stats_meta(source: VideoSource, detector: Detector, cfg: FVDConfig) -> dict:
    return {"set": source.describe(), "videos": len(source), "detector_sha256": detector.sha256,
            **cfg.feature_settings()}


# -- streamed statistics ---------------------------------------------------------------------
def set_statistics(source: VideoSource, detector: Detector, cfg: FVDConfig, *,
                   path: str | None = None, group=None, on_batch=None) -> FeatureStats:
    """Feature statistics of a whole set, every rank of `group` streaming its share.

    path: the finished statistics (reused when they are of this set, protocol and detector)
    and, beside it, each rank's state while the set runs (`path.rank{r}of{w}`), resumed from.
    on_batch(done, total) after each of this rank's batches.
    """
    if len(source) < 2:
        raise ValueError(f"a set of {len(source)} videos ({source.describe()}): FVD needs at "
                         "least 2 per set")
    meta = stats_meta(source, detector, cfg)
    if path and os.path.exists(path):
        stats, found = load_stats(path)
        _check_meta(path, found, meta)
        return stats
    rank, world = (torch.distributed.get_rank(group), group_size(group)) \
        if torch.distributed.is_initialized() else (0, 1)
    mine = list(range(rank, math.ceil(len(source) / cfg.batch_size), world))
    partial = f"{path}.rank{rank}of{world}" if path else None
    stats, done = _resume(partial, {**meta, "world": world})
    for j in range(done, len(mine)):
        lo = mine[j] * cfg.batch_size
        stats.update(batch_features(detector, source.videos(lo, min(lo + cfg.batch_size,
                                                                    len(source))), cfg))
        if partial and ((j + 1) % cfg.save_every == 0 or j + 1 == len(mine)):
            save_stats(partial, stats, {**meta, "world": world, "batches_done": j + 1})
        if on_batch is not None:
            on_batch(j + 1, len(mine))
    total = FeatureStats()
    for state in all_gather_objects(stats.state_dict(), group):  # rank order: deterministic
        part = FeatureStats()
        part.load_state_dict(state)
        total.merge(part)
    if path:
        if rank == 0:
            save_stats(path, total, meta)
        all_gather_objects(None, group)  # the finished file exists before a state goes
        if os.path.exists(partial):  # a rank with no batch (more ranks than batches) has none
            os.remove(partial)
    return total


def _resume(partial: str | None, meta: dict) -> tuple[FeatureStats, int]:
    """(this rank's statistics so far, its batches done) from its state file, if any."""
    if not partial or not os.path.exists(partial):
        return FeatureStats(), 0
    stats, found = load_stats(partial)
    done = found.pop("batches_done", None)
    if done is None:
        raise ValueError(f"{partial}: a state file without batches_done; delete it to restart")
    _check_meta(partial, found, meta)
    return stats, int(done)


# -- the Python API --------------------------------------------------------------------------
def _stream(videos, detector: Detector, cfg: FVDConfig) -> FeatureStats:
    """Statistics of a tensor [N, 3, T, H, W] or an iterable of such batches."""
    batches = [videos] if torch.is_tensor(videos) else videos
    stats = FeatureStats()
    for batch in batches:
        for lo in range(0, len(batch), cfg.batch_size):
            stats.update(batch_features(detector, batch[lo : lo + cfg.batch_size], cfg))
    if stats.count < 2:
        raise ValueError(f"a set of {stats.count} videos: FVD needs at least 2 per set")
    return stats


def compute_fvd(real: torch.Tensor | Iterable[torch.Tensor],
                fake: torch.Tensor | Iterable[torch.Tensor], *, detector_path: str,
                detector_sha256: str | None = None, allow_other_detector: bool = False,
                frames: int = 16, eval_resolution: int | None = None, batch_size: int = 16,
                device: str | torch.device = "cpu") -> float:
    """FVD of two sets of videos [B, 3, T, H, W] in [0, 1] (tensors, or iterables of batches
    streamed one at a time): Frechet distance of the detector's features over the first
    `frames` frames (each frame first resized to eval_resolution when given)."""
    detector = load_detector(detector_path, sha256=detector_sha256,
                             allow_other=allow_other_detector, device=device)
    cfg = FVDConfig(frames=frames, eval_resolution=eval_resolution or 0, batch_size=batch_size)
    return stats_distance(_stream(real, detector, cfg), _stream(fake, detector, cfg))
