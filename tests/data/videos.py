"""Tiny synthetic video files for the video and preprocessing tests (written with PyAV).

Every frame is one flat colour that encodes the frame's number (robust to lossy codecs and
to resizing), so a test can tell which source frame ended up at each output position:
R = 8 + 16 * (n % 15), G = 8 + 16 * (n // 15), B = 128 (n < 225).
"""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pytest

# (file suffix, encoder, pixel format): the containers/codecs the tests cover.
FORMATS = {
    "mp4-h264": (".mp4", "libx264", "yuv420p"),
    "avi-mpeg4": (".avi", "mpeg4", "yuv420p"),
    "webm-vp9": (".webm", "libvpx-vp9", "yuv420p"),
    "avi-mjpeg": (".avi", "mjpeg", "yuvj420p"),
    "mkv-ffv1": (".mkv", "ffv1", "yuv420p"),
}


def has_encoder(name: str) -> bool:
    import av

    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:  # noqa: BLE001 - any failure means this build lacks it
        return False


def require_format(kind: str) -> tuple[str, str, str]:
    suffix, codec, pix = FORMATS[kind]
    if not has_encoder(codec):
        pytest.skip(f"this PyAV/FFmpeg build has no {codec} encoder (needed for {kind})")
    return suffix, codec, pix


def frame_image(n: int, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] flat frame encoding the number n."""
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 8 + 16 * (n % 15), 8 + 16 * (n // 15), 128
    return img


def frame_number(frame: np.ndarray) -> int:
    """The number encoded by frame_image (from the mean colour of [H, W, 3])."""
    r, g = frame[..., 0].mean(), frame[..., 1].mean()
    return int(round((g - 8) / 16)) * 15 + int(round((r - 8) / 16))


def write_video(path: str, kind: str = "mkv-ffv1", *, frames: int = 30, rate: int = 30,
                width: int = 64, height: int = 48, times_ms: list[int] | None = None) -> str:
    """Write `frames` frames numbered 0.. at `rate` fps (or at `times_ms`, variable rate)."""
    import av

    _, codec, pix = require_format(kind)
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix
        if times_ms is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for n in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_image(n, height, width), format="rgb24")
            if times_ms is not None:
                frame.pts, frame.time_base = times_ms[n], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_broken_files(folder: str) -> dict[str, str]:
    """Deliberately bad inputs: {name: a fragment the skip reason must contain}."""
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, "zero.mp4"), "wb").close()
    rng = np.random.default_rng(0)
    with open(os.path.join(folder, "garbage.mp4"), "wb") as f:
        f.write(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with open(os.path.join(folder, "notes.avi"), "w") as f:
        f.write("this is a text file, not a video\n" * 30)
    _write_png(os.path.join(folder, "photo.mp4"))
    good = write_video(os.path.join(folder, "cut.tmp.mp4"), "mp4-h264", frames=30)
    with open(good, "rb") as f:
        data = f.read()
    with open(os.path.join(folder, "cut.mp4"), "wb") as f:  # moov atom lost: unreadable
        f.write(data[: len(data) // 2])
    os.remove(good)
    write_video(os.path.join(folder, "short.mkv"), "mkv-ffv1", frames=3)
    return {"zero.mp4": "empty file", "garbage.mp4": "not a readable video",
            "notes.avi": "not a readable video", "photo.mp4": "still image",
            "cut.mp4": "not a readable video", "short.mkv": "too short"}


def _write_png(path: str) -> None:
    """A PNG image under a video file name."""
    import av

    with av.open(path, "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = 32, 32, "rgb24"
        frame = av.VideoFrame.from_ndarray(frame_image(3, 32, 32), format="rgb24")
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            container.mux(packet)


def write_truncated_mjpeg(path: str, *, frames: int = 30, keep: float = 0.5) -> str:
    """An MJPEG AVI cut in the middle: the header still declares all frames."""
    full = write_video(path + ".full.avi", "avi-mjpeg", frames=frames)
    with open(full, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    os.remove(full)
    return path
