"""One evaluation: every metric of an EvalConfig for one model, as a results dict.

    results = evaluate(cfg, dims)    # every rank calls it; rank 0 writes OUT/results.json

FVD sets and validation batches are split over the job's data-parallel ranks (torchrun
--nproc-per-node N); the small diagnostics (temporal consistency, tokenizer reconstruction)
run on rank 0. Each FVD set's statistics live in OUT/stats/: a rerun after an interruption
resumes them, and the reference set's are reused by every model evaluated against it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np

from nbp_mega.checksums import sha256_tensors
from nbp_mega.eval.config import EvalConfig
from nbp_mega.eval.frechet import stats_distance
from nbp_mega.eval.fvd import Slice, set_statistics
from nbp_mega.eval.sources import GeneratedClips, RealClips


@dataclasses.dataclass
class Loaded:
    """What the metrics run on (None where no metric asked for it)."""

    model: object = None
    run_cfg: object = None
    checkpoint: dict | None = None
    tokenizer: object = None

    @property
    def clip_frames(self) -> int:
        """Pixel frames of one clip the model generates (1 + ft (T - 1))."""
        return 1 + self.tokenizer.downsample[0] * (self.model.cfg.grid[0] - 1)


def load(cfg: EvalConfig, dims) -> Loaded:
    from nbp_mega.generate.load import load_trained_model, resolve_checkpoint
    from nbp_mega.tokenizer.video import load_video_tokenizer

    out = Loaded()
    samples_model = not cfg.generated and (cfg.wants("fvd") or cfg.wants("temporal"))
    if cfg.run and (cfg.wants("per_block") or samples_model):
        path = os.path.abspath(cfg.run)
        if not os.path.isfile(path):
            _, path = resolve_checkpoint(path, cfg.checkpoint or None)
        out.model, out.run_cfg = load_trained_model(path, dims=dims, device=dims.device)
        out.checkpoint = {"path": path, "grid": list(out.model.cfg.grid),
                          "weights_sha256": sha256_tensors(
            {k: v for k, v in out.model.state_dict().items() if hasattr(v, "detach")})}
    if cfg.tokenizer:
        out.tokenizer = load_video_tokenizer(cfg.tokenizer, device=dims.device)
    return out


def _clip_frames(cfg: EvalConfig, loaded: Loaded) -> int:
    return loaded.clip_frames if loaded.model is not None and loaded.tokenizer is not None \
        else cfg.fvd.frames


def fvd_sets(cfg: EvalConfig, loaded: Loaded, dims) -> dict:
    """The reference set's statistics and each fold's FVD against them."""
    from nbp_mega.eval.detector import load_detector

    p = cfg.fvd
    detector = load_detector(p.detector, sha256=p.detector_sha256 or None,
                             allow_other=p.allow_other_detector, device=dims.device)
    stats_dir = os.path.join(cfg.out, "stats")
    os.makedirs(stats_dir, exist_ok=True)
    # windows of exactly the evaluated frames: the same reference set (and cached statistics)
    # for every model, whatever its clip length
    real = RealClips(cfg.videos, count=p.num_reference, frames=p.frames, resolution=p.resolution,
                     fps=p.fps, seed=p.seed)
    ref_path = cfg.reference_stats or os.path.join(stats_dir, "reference.npz")
    reference = set_statistics(real, detector, p, path=ref_path, group=dims.dp_group)
    fake = _generated(cfg, loaded, count=p.samples * p.folds, frames=_clip_frames(cfg, loaded))
    folds = []
    for f in range(p.folds):
        part = Slice(fake, f * p.samples, (f + 1) * p.samples)
        stats = set_statistics(part, detector, p, group=dims.dp_group,
                               path=os.path.join(stats_dir, f"generated_fold{f}.npz"))
        folds.append(stats_distance(reference, stats))
    return {"fvd": float(np.mean(folds)), "fvd_std": float(np.std(folds)), "folds": folds,
            "samples_per_fold": p.samples, "reference_clips": p.num_reference,
            "reference_stats": os.path.abspath(ref_path), "skipped_videos": real.skipped,
            "detector": detector.describe()}


def _generated(cfg: EvalConfig, loaded: Loaded, *, count: int, frames: int
               ) -> GeneratedClips | RealClips:
    """The clips to evaluate: the model's samples, or the first frames of the files in
    cfg.generated."""
    from nbp_mega.generate.outputs import check_tokenizer

    p = cfg.fvd
    if cfg.generated:
        return RealClips(cfg.generated, count=count, frames=frames, resolution=p.resolution,
                         first=True)
    size = check_tokenizer(loaded.tokenizer, loaded.model.cfg)
    if size != (p.resolution, p.resolution):
        raise ValueError(f"the model generates {size[0]}x{size[1]} frames (grid through the "
                         f"tokenizer), fvd.resolution={p.resolution}: expected real clips of "
                         f"the generated size (set fvd.resolution={size[0]})")
    context = None
    if p.context_frames:  # generated clip i continues real clip i of its own draw
        context = RealClips(cfg.videos, count=count, frames=frames, resolution=p.resolution,
                            fps=p.fps, seed=p.seed + 1)
    return GeneratedClips(loaded.model, loaded.tokenizer, count=count, seed=p.seed,
                          sampling=cfg.sampling, record=loaded.checkpoint, context=context,
                          context_frames=p.context_frames)


def temporal(cfg: EvalConfig, loaded: Loaded) -> dict:
    """Frame-to-frame change of the first generated clips against real clips."""
    from nbp_mega.eval.temporal import TemporalStats, compare

    n, bs = cfg.temporal.clips, cfg.fvd.batch_size
    frames = _clip_frames(cfg, loaded)
    fake = _generated(cfg, loaded, count=n, frames=frames)
    real = RealClips(cfg.videos, count=n, frames=frames, resolution=cfg.fvd.resolution,
                     fps=cfg.fvd.fps, seed=cfg.fvd.seed)
    f, r = TemporalStats(), TemporalStats()
    for lo in range(0, n, bs):
        hi = min(n, lo + bs)
        f.update(fake.videos(lo, hi))
        r.update(real.videos(lo, hi))
    return compare(f, r)


def tokenizer_reconstruction(cfg: EvalConfig, loaded: Loaded) -> dict:
    from nbp_mega.tokenizer.metrics import evaluate_tokenizer

    n, bs = cfg.tokenizer_eval.clips, cfg.fvd.batch_size
    frames = _clip_frames(cfg, loaded) if loaded.model is not None \
        else 1 + loaded.tokenizer.downsample[0] * math.ceil((cfg.fvd.frames - 1)
                                                            / loaded.tokenizer.downsample[0])
    real = RealClips(cfg.videos, count=n, frames=frames, resolution=cfg.fvd.resolution,
                     fps=cfg.fvd.fps, seed=cfg.fvd.seed)
    batches = (np.stack([real.frames_uint8(i) for i in range(lo, min(n, lo + bs))])
               for lo in range(0, n, bs))
    return {**evaluate_tokenizer(loaded.tokenizer, batches), "frames": frames}


def per_block(cfg: EvalConfig, loaded: Loaded, dims) -> dict:
    from nbp_mega.data.shards import ShardIndex, expand_shards
    from nbp_mega.eval.per_block import position_scores

    shards = cfg.per_block.val_shards or (loaded.run_cfg.data.val_shards
                                          if loaded.run_cfg is not None else "")
    if not shards:
        raise ValueError("metric per_block: the run has no data.val_shards; expected "
                         "per_block.val_shards (validation token shards of the model's grid)")
    index = ShardIndex.build(expand_shards(shards))
    try:
        return position_scores(loaded.model, index, batch_size=cfg.per_block.batch_size,
                               max_batches=cfg.per_block.max_batches, dims=dims)
    finally:
        index.close()


def evaluate(cfg: EvalConfig, dims) -> dict:
    """Every metric cfg.metrics names -> the results (rank 0 also writes them: report.py)."""
    started = time.perf_counter()
    loaded = load(cfg, dims)
    results: dict = {"model": loaded.checkpoint, "timings_s": {}, "metrics": cfg.metrics,
                     "tokenizer": None if loaded.tokenizer is None else {
                         "path": cfg.tokenizer, "name": loaded.tokenizer.name,
                         "sha256": loaded.tokenizer.checksum()}}
    steps = {"per_block": lambda: per_block(cfg, loaded, dims),
             "fvd": lambda: fvd_sets(cfg, loaded, dims),
             "temporal": lambda: temporal(cfg, loaded) if dims.rank == 0 else None,
             "tokenizer": lambda: tokenizer_reconstruction(cfg, loaded)
             if dims.rank == 0 else None}
    for metric, step in steps.items():
        if cfg.wants(metric):
            t = time.perf_counter()
            results["tokenizer_reconstruction" if metric == "tokenizer" else metric] = step()
            results["timings_s"][metric] = time.perf_counter() - t
    results["timings_s"]["total"] = time.perf_counter() - started
    return results
