"""Synthetic video files (PyAV): coloured squares moving over a gradient, for tokenizer
training demos and tests.

    python -m nbp_mega.data.synthetic_video OUT_DIR [--count 16 --frames 24 --size 48]
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def moving_squares(rng: np.random.Generator, frames: int, height: int, width: int) -> np.ndarray:
    """uint8 [F, H, W, 3]: a smooth background and two squares moving at constant speed."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = rng.integers(40, 200, size=3)
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    squares = [(rng.integers(0, height), rng.integers(0, width), rng.integers(-2, 3),
                rng.integers(-2, 3), rng.integers(0, 256, size=3), int(rng.integers(6, 12)))
               for _ in range(2)]
    for f in range(frames):
        frame = (base + 0.5 * (xx[..., None] + yy[..., None])).clip(0, 255)
        for y0, x0, dy, dx, colour, size in squares:
            y, x = (y0 + dy * f) % height, (x0 + dx * f) % width
            frame[y:y + size, x:x + size] = colour
        video[f] = frame
    return video


def write_video(path: str, frames: np.ndarray, *, fps: int = 8, codec: str = "mpeg4",
                pix_fmt: str = "yuv420p", options: dict | None = None) -> None:
    """Encode uint8 [F, H, W, 3] into `path` (container from the extension); `options` go to
    the encoder (e.g. {"crf": "10"} for libx264)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=pix_fmt)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush


def write_synthetic_videos(out_dir: str, *, count: int = 16, frames: int = 24, size: int = 48,
                           seed: int = 0) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = os.path.join(out_dir, f"video{i:04d}.mp4")
        write_video(path, moving_squares(rng, frames, size, size))
        paths.append(path)
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="write synthetic moving-square videos")
    p.add_argument("out_dir")
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    paths = write_synthetic_videos(args.out_dir, count=args.count, frames=args.frames,
                                   size=args.size, seed=args.seed)
    print(f"wrote {len(paths)} videos to {args.out_dir}")


if __name__ == "__main__":
    main()
