"""The video sets an evaluation streams: real clips from a folder, clips a model generates.

Both are indexable and deterministic (nbp_mega.eval.fvd.VideoSource): video i is the same
whoever asks and whenever, so ranks split a set by index and a resumed set continues exactly.

    real = RealClips("ucf101/train", count=10_000, frames=17, resolution=128, fps=8, seed=0)
    fake = GeneratedClips(model, tokenizer, count=10_000, seed=0, sampling=SamplingConfig())

Legend: n videos, T frames, R resolution (square), t/h/w latent grid.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os

import numpy as np
import torch

from nbp_mega.data.video import (
    ClipSpec,
    VideoError,
    iter_clips,
    list_videos,
    output_times,
    probe,
)


class RealClips:
    """`count` clips of `frames` frames: clip i is a random window (seeded by seed and i //
    V) of video order[i % V], order a seeded permutation of the V videos long enough for one
    clip. Every video is probed once, at construction; the too short are listed in `skipped`.

    first=True (a folder of samples, e.g. another model's): clip i is the first `frames`
    frames of the i-th usable video in file order, each video once."""

    def __init__(self, root: str, *, count: int, frames: int, resolution: int,
                 fps: float | None = None, seed: int = 0, first: bool = False):
        self.root, self.count, self.seed, self.first = os.path.abspath(root), count, seed, first
        self.spec = ClipSpec(frames=frames, resolution=resolution, fps=fps or None,
                             sampling="stride" if first else "random", clips_per_video=1,
                             seed=seed)
        self.spec.check()
        probes, unreadable = probe_folder(self.root)
        self.usable, self.skipped = [], list(unreadable)
        for info in probes:
            if _num_frames(info, self.spec) >= frames:
                self.usable.append(info)
            else:
                self.skipped.append(f"{info.path}: shorter than {frames} frames"
                                    + (f" at {fps} fps" if fps else ""))
        paths = len(probes) + len(unreadable)
        if not self.usable:
            raise VideoError(f"{root}: none of its {paths} videos gives a clip of {frames} "
                             f"frames ({'; '.join(self.skipped[:3]) or 'no video files'})")
        if first and count > len(self.usable):
            raise VideoError(f"{root}: {len(self.usable)} videos of at least {frames} frames "
                             f"(of {paths}), the protocol evaluates {count}: expected one "
                             "video per clip")
        self.order = np.arange(len(self.usable)) if first else \
            np.random.default_rng(seed).permutation(len(self.usable))

    def __len__(self) -> int:
        return self.count

    def frames_uint8(self, i: int) -> np.ndarray:
        """Clip i: uint8 [T, R, R, 3]."""
        V = len(self.usable)
        info = self.usable[self.order[i % V]]
        spec = dataclasses.replace(self.spec, seed=self.seed * 1_000_003 + i // V)
        return next(iter_clips(info, spec)).frames

    def videos(self, lo: int, hi: int) -> torch.Tensor:
        clips = np.stack([self.frames_uint8(i) for i in range(lo, hi)])  # [n, T, R, R, 3]
        return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 255

    def describe(self) -> dict:
        names = "\n".join(f"{os.path.relpath(v.path, self.root)}:{os.path.getsize(v.path)}"
                          for v in self.usable)
        return {"kind": "videos", "first_frames": self.first, "root": self.root,
                "videos": len(self.usable),
                "files_sha256": hashlib.sha256(names.encode()).hexdigest()[:16],
                "count": self.count, "frames": self.spec.frames,
                "resolution": self.spec.resolution, "fps": self.spec.fps, "seed": self.seed}


@functools.lru_cache(maxsize=8)
def probe_folder(root: str) -> tuple[tuple, tuple[str, ...]]:
    """(probes of the readable videos under root, why each other one is not), once per
    process: an evaluation draws several sets from one folder (reference, contexts, temporal,
    tokenizer), and probing reads every file's packet times."""
    probes, unreadable = [], []
    for path in list_videos(root):
        try:
            probes.append(probe(path))
        except VideoError as e:
            unreadable.append(str(e))
    return tuple(probes), tuple(unreadable)


def _num_frames(info, spec: ClipSpec) -> int:
    return len(output_times(info, spec.fps))


class GeneratedClips:
    """`count` clips sampled from a model and decoded: clip i from seed + i, class
    (seed + i) mod C for class-conditional models, and for frame prediction the first
    context_frames pixel frames of real clip i (encoded by the tokenizer; the decoded clip
    shows their reconstruction, as the K600 protocol evaluates)."""

    def __init__(self, model, tokenizer, *, count: int, seed: int, sampling, record: dict,
                 context: RealClips | None = None, context_frames: int = 0):
        from nbp_mega.generate.outputs import check_tokenizer

        self.model, self.tokenizer, self.count, self.seed = model, tokenizer, count, seed
        self.sampling, self.record = sampling, record
        self.context, self.context_frames = context, context_frames
        check_tokenizer(tokenizer, model.cfg)
        if model.cfg.text_len:
            raise ValueError("the model is text-conditional (model.text_len > 0): generating an "
                             "FVD set needs a prompt per clip, which the evaluation does not "
                             "take; expected a class-conditional or unconditional model")
        self.latent_context = self._latent_frames(context_frames) if context_frames else 0
        if context_frames and context is None:
            raise ValueError(f"fvd.context_frames={context_frames}: frame prediction needs the "
                             "real videos to take them from (videos: a folder)")

    def _latent_frames(self, pixel_frames: int) -> int:
        """Latent frames that `pixel_frames` frames encode to (1 + ft (K - 1) of them)."""
        ft = self.tokenizer.downsample[0]
        bt = self.model.layout.blocks.block[0]
        K, rest = divmod(pixel_frames - 1, ft)
        K += 1
        if rest or K % bt or K >= self.model.cfg.grid[0]:
            raise ValueError(f"fvd.context_frames={pixel_frames}: expected 1 + {ft} k pixel "
                             f"frames (the tokenizer's time downsample) giving a multiple of "
                             f"the block's {bt} latent frames, fewer than the grid's "
                             f"{self.model.cfg.grid[0]}")
        return K

    def __len__(self) -> int:
        return self.count

    def tokens(self, lo: int, hi: int) -> torch.Tensor:
        """Clips lo..hi-1 as token grids [n, t, h, w] (the given frames' tokens included)."""
        from nbp_mega.generate import generate

        seeds = [self.seed + i for i in range(lo, hi)]
        classes = self.model.cfg.num_classes
        labels = torch.tensor([s % classes for s in seeds]) if classes else None
        context = None
        if self.context_frames:
            pixels = self.context.videos(lo, hi)[:, :, : self.context_frames]  # [n, 3, F, R, R]
            context = self.tokenizer.encode(pixels - 0.5)[:, : self.latent_context]
        return generate(self.model, seeds=seeds, labels=labels, context=context,
                        sampling=self.sampling).cpu()

    def videos(self, lo: int, hi: int) -> torch.Tensor:
        from nbp_mega.generate.outputs import decode_tokens

        return decode_tokens(self.tokenizer, self.tokens(lo, hi))

    def describe(self) -> dict:
        return {"kind": "generated", **self.record, "count": self.count, "seed": self.seed,
                "sampling": vars(self.sampling), "context_frames": self.context_frames,
                "context": None if self.context is None or not self.context_frames
                else self.context.describe()}
