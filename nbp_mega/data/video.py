"""Reading video files into fixed-size uint8 clips (PyAV), resampled by timestamps.

Legend: T frames per clip; R output resolution (square); K output frames of a whole video;
H, W source frame size.

How a video becomes clips:
  1. probe (demux only, nothing decoded): the presentation times of the first video stream's
     packets give the time span [t0, t_end) that the file really holds and the source rate;
  2. output instants t_k = t0 + k / fps, k = 0..K-1, t_k < t_end (fps=None: the source frames'
     own times, i.e. no resampling);
  3. windows of T output frames: every `stride` frames, or `clips_per_video` random starts
     drawn from a seed and the file's name (the same file always gives the same windows);
  4. one streaming decode: output frame k is the source frame on screen at t_k (the last one
     whose time is <= t_k), so a 30 fps file sampled at 8 fps keeps real-time motion speed and
     variable-frame-rate files come out right. Only frames some window needs are converted,
     resized (shorter side to R, area filter) and centre-cropped; decoding stops after the
     last window, and at most the frames of the windows in progress are held in memory.
A decode error or an early end of the stream keeps the clips completed before it: the
iterator raises VideoError after yielding them, so the caller knows how many it got.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".mpg", ".mpeg", ".m4v", ".gif",
                    ".flv", ".wmv", ".ts", ".3gp", ".ogv")
# A source frame counts as shown at instant t if its time is <= t + this many source frame
# durations: timestamps are rounded to the container's time base (1 ms in webm), so k / fps
# and the matching frame's stored time can differ by a fraction of a millisecond.
_TIME_TOLERANCE = 0.25


class VideoError(ValueError):
    """A file that cannot be read as a video, or not enough of it (the message says why)."""


@dataclass(frozen=True)
class ClipSpec:
    """How clips are cut from a video."""

    frames: int = 17  # frames per clip (T)
    resolution: int = 128  # output side R: shorter side resized to R, centre crop R x R
    fps: float | None = None  # output frame rate; None = the source frames as they are
    stride: int | None = None  # output frames between window starts (None = frames)
    clips_per_video: int = 0  # at most this many clips per video (0 = all; random: required)
    sampling: str = "stride"  # "stride" (regular windows) or "random" (seeded starts)
    seed: int = 0  # seed of random windows

    def check(self) -> None:
        if self.frames < 1 or self.resolution < 1:
            raise VideoError(f"frames={self.frames}, resolution={self.resolution}: both must "
                             f"be >= 1")
        if self.fps is not None and not self.fps > 0:
            raise VideoError(f"fps={self.fps}: expected a positive rate (or none for the "
                             f"source rate)")
        if self.stride is not None and self.stride < 1:
            raise VideoError(f"stride={self.stride}: expected >= 1 output frames")
        if self.sampling not in ("stride", "random"):
            raise VideoError(f"sampling={self.sampling!r}: expected 'stride' or 'random'")
        if self.sampling == "random" and self.clips_per_video < 1:
            raise VideoError("random sampling needs clips_per_video >= 1 (windows per video)")


@dataclass
class VideoProbe:
    """What the container says about the first video stream, and the packet times it holds."""

    path: str
    times: np.ndarray  # [F] sorted presentation times (s) of the source frames present
    src_fps: float  # the stream's average rate (or one estimated from `times`)
    width: int
    height: int
    codec: str
    container: str
    note: str | None  # why the file looks incomplete (truncated), None when it looks whole

    @property
    def frame_duration(self) -> float:
        return 1.0 / self.src_fps

    @property
    def end(self) -> float:
        """End of the last frame present (s)."""
        return float(self.times[-1]) + self.frame_duration


@dataclass
class Clip:
    index: int  # window number in the video (0-based, in time order)
    start_time: float  # time of its first output frame, seconds from the video's first frame
    frames: np.ndarray  # uint8 [T, R, R, 3]


# -- probing ---------------------------------------------------------------------------------
def _open(path: str):
    import av

    if not os.path.exists(path):
        raise VideoError(f"{path}: file not found")
    if not os.path.isfile(path):
        raise VideoError(f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    try:
        container = av.open(path)
    except av.FFmpegError as e:
        raise VideoError(f"{path}: not a readable video container ({_reason(e)})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: holds no video stream (a {container.format.name} file)")
    return container


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {getattr(error, 'strerror', None) or error}"


def probe(path: str) -> VideoProbe:
    """Read the packet times of `path`'s first video stream without decoding any frame."""
    import av

    container = _open(path)
    note = None
    with container:
        stream = container.streams.video[0]
        base = float(stream.time_base) if stream.time_base else None
        stamps = []
        try:
            for packet in container.demux(stream):
                if packet.size:  # the last, empty packet only flushes the decoder
                    stamps.append(packet.pts if packet.pts is not None else packet.dts)
        except av.FFmpegError as e:
            note = f"container damaged after {len(stamps)} frames ({_reason(e)})"
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        width, height = stream.codec_context.width, stream.codec_context.height
        codec, fmt = stream.codec_context.name, container.format.name
        declared = _declared_frames(stream, rate)
    if not stamps:
        raise VideoError(f"{path}: its {codec} video stream holds no frames"
                         + (f"; {note}" if note else ""))
    times = _packet_times(stamps, base, rate)
    rate = rate or _estimated_rate(times)
    if note is None and declared and declared > len(times) + 1:
        note = f"truncated: {len(times)} of the {declared} frames its header declares"
    return VideoProbe(path, times, rate, width, height, codec, fmt, note)


def _declared_frames(stream, rate: float) -> int:
    """Frames the header promises (0 when it does not say; matroska and webm often don't)."""
    if stream.frames:
        return int(stream.frames)
    if stream.duration and stream.time_base and rate:
        return int(round(float(stream.duration * stream.time_base) * rate))
    return 0


def _packet_times(stamps: list, base: float | None, rate: float) -> np.ndarray:
    """[F] sorted seconds; streams without timestamps count frames at the nominal rate."""
    if base is None or any(s is None for s in stamps):
        return np.arange(len(stamps)) / (rate or 25.0)
    return np.sort(np.asarray(stamps, dtype=np.float64)) * base


def _estimated_rate(times: np.ndarray) -> float:
    if len(times) < 2 or times[-1] <= times[0]:
        return 25.0  # one frame: any rate works, it only sets the frame's display time
    return (len(times) - 1) / float(times[-1] - times[0])


# -- planning windows ------------------------------------------------------------------------
def output_times(info: VideoProbe, fps: float | None, start: float | None = None,
                 end: float | None = None) -> np.ndarray:
    """[K] instants (s, absolute stream time) of the output frames within [start, end) seconds
    counted from the first frame."""
    first = float(info.times[0])
    lo = first + (start or 0.0)
    hi = min(info.end, first + end) if end is not None else info.end
    if fps is None:
        return info.times[(info.times >= lo - 1e-9) & (info.times < hi)]
    eps = _TIME_TOLERANCE * info.frame_duration  # the last instant must still show a frame
    return lo + np.arange(max(0, int(np.ceil((hi - lo - eps) * fps)))) / fps


def clip_starts(num_frames: int, spec: ClipSpec, name: str) -> list[int]:
    """Window starts (output frame numbers, increasing) for a video of `num_frames` frames."""
    last = num_frames - spec.frames  # the last possible start
    if last < 0:
        return []
    if spec.sampling == "random":
        digest = hashlib.sha256(os.path.basename(name).encode()).digest()
        rng = np.random.default_rng([spec.seed, int.from_bytes(digest[:8], "little")])
        count = min(spec.clips_per_video, last + 1)
        return sorted(int(s) for s in rng.choice(last + 1, size=count, replace=False))
    starts = list(range(0, last + 1, spec.stride or spec.frames))
    return starts[: spec.clips_per_video or None]


def _too_short(info: VideoProbe, spec: ClipSpec, num_frames: int) -> VideoError:
    if len(info.times) == 1:
        return VideoError(f"{info.path}: a single {info.codec} frame (a still image, not a "
                          f"video); a clip needs {spec.frames} frames")
    rate = spec.fps or info.src_fps
    return VideoError(
        f"{info.path}: too short for one clip: {num_frames} frames at {rate:g} fps "
        f"({num_frames / rate:.2f} s) where a clip needs {spec.frames} frames "
        f"({spec.frames / rate:.2f} s)" + (f"; {info.note}" if info.note else ""))


# -- decoding --------------------------------------------------------------------------------
def _to_rgb(frame, resolution: int) -> np.ndarray:
    """A PyAV frame -> uint8 [R, R, 3]: shorter side to R (area filter), centre crop."""
    scale = resolution / min(frame.width, frame.height)
    w = max(resolution, round(frame.width * scale))
    h = max(resolution, round(frame.height * scale))
    rgb = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
    top, left = (h - resolution) // 2, (w - resolution) // 2
    return rgb[top:top + resolution, left:left + resolution]


def _source_frames(path: str) -> Iterator[tuple[float, object]]:
    """(time s, PyAV frame) of the first video stream in presentation order."""
    import av

    container = _open(path)
    with container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or 25)
        try:
            for n, frame in enumerate(container.decode(stream)):
                yield (frame.time if frame.time is not None else n / rate), frame
        except av.FFmpegError as e:
            raise VideoError(f"{path}: decoding failed ({_reason(e)})") from None


def iter_clips(info: VideoProbe, spec: ClipSpec, *, start: float | None = None,
               end: float | None = None) -> Iterator[Clip]:
    """The clips of a probed video, in time order (see the module docstring); `start` and
    `end` (seconds from the first frame) restrict them to a part of the video.

    Raises VideoError if the video is too short for one clip (before yielding anything), or
    after the last complete clip if decoding fails or the stream ends early.
    """
    times = output_times(info, spec.fps, start, end)  # [K]
    starts = clip_starts(len(times), spec, info.path)
    if not starts:
        raise _too_short(info, spec, len(times))
    windows = _Windows(starts, [float(times[s] - info.times[0]) for s in starts], spec.frames)
    needed = sorted({k for s in starts for k in range(s, s + spec.frames)})
    tol = _TIME_TOLERANCE * info.frame_duration
    p, prev, last_end = 0, None, -np.inf  # next entry of `needed` to fill; frame on screen
    try:
        for t, frame in _source_frames(info.path):
            # Every needed instant before this frame's time shows the previous frame.
            while p < len(needed) and times[needed[p]] + tol < t:
                windows.held[needed[p]], prev = _shown(prev, frame, spec.resolution)
                p += 1
            prev, last_end = (frame, None), t + info.frame_duration
            yield from windows.complete(needed[p] if p < len(needed) else None)
            if windows.done:
                return
        while p < len(needed) and times[needed[p]] < last_end:  # the last frame's screen time
            windows.held[needed[p]], prev = _shown(prev, None, spec.resolution)
            p += 1
        yield from windows.complete(needed[p] if p < len(needed) else None)
    except VideoError as e:
        raise VideoError(f"{e}; kept {windows.emitted} of {len(starts)} clips") from None
    if not windows.done:
        why = info.note or f"the stream ends at {last_end - info.times[0]:.2f} s"
        raise VideoError(f"{info.path}: {why}; kept {windows.emitted} of {len(starts)} clips")


def _shown(prev, frame, resolution: int):
    """The array on screen (the previous frame, or `frame` before the first one) and the
    updated `prev` with its array cached, so upsampling converts each frame once."""
    if prev is None:
        prev = (frame, None)
    if prev[1] is None:
        prev = (prev[0], _to_rgb(prev[0], resolution))
    return prev[1], prev


class _Windows:
    """Output frames of the windows in progress; yields each window once all are filled."""

    def __init__(self, starts: list[int], start_times: list[float], frames: int):
        self.starts, self.start_times, self.frames = starts, start_times, frames
        self.held: dict[int, np.ndarray] = {}  # output frame k -> [R, R, 3]
        self.emitted = 0

    @property
    def done(self) -> bool:
        return self.emitted == len(self.starts)

    def complete(self, first_unfilled: int | None) -> Iterator[Clip]:
        while not self.done:
            s = self.starts[self.emitted]
            if first_unfilled is not None and first_unfilled < s + self.frames:
                return  # some frame of this window is not decoded yet
            frames = np.stack([self.held[k] for k in range(s, s + self.frames)])
            yield Clip(self.emitted, self.start_times[self.emitted], frames)
            self.emitted += 1
            keep_from = self.starts[self.emitted] if not self.done else None
            for k in [k for k in self.held if keep_from is None or k < keep_from]:
                del self.held[k]  # no later window needs it


def read_video_clips(path: str, spec: ClipSpec, *, start: float | None = None,
                     end: float | None = None) -> tuple[VideoProbe, list[Clip]]:
    """Every clip of `path` in memory (for short files and tests); see `iter_clips`."""
    info = probe(path)
    return info, list(iter_clips(info, spec, start=start, end=end))


# -- simple helpers used by the tokenizer tools ----------------------------------------------
def list_videos(root: str) -> list[str]:
    """Video files under `root` (recursive, by extension, sorted)."""
    if not os.path.isdir(root):
        raise VideoError(f"{root} is not a directory of videos")
    found = []
    for folder, _, files in os.walk(root):
        found += [os.path.join(folder, f) for f in files if f.lower().endswith(VIDEO_EXTENSIONS)]
    return sorted(found)


def read_clips(path: str, *, frames: int, resolution: int, fps: float | None = None,
               stride: int | None = None, max_clips: int | None = None) -> np.ndarray:
    """uint8 [N, T, R, R, 3]: windows of `frames` frames every `stride` frames (all complete
    ones, at most `max_clips`). Raises VideoError when not even one clip can be read."""
    spec = ClipSpec(frames=frames, resolution=resolution, fps=fps, stride=stride,
                    clips_per_video=max_clips or 0)
    spec.check()
    info = probe(path)
    clips = []
    try:
        for clip in iter_clips(info, spec):
            clips.append(clip.frames)
    except VideoError:
        if not clips:
            raise
    return np.stack(clips)
