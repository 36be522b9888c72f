"""nbp_mega.data.video: containers/codecs, timestamp resampling, windows, crop, bad files."""

from __future__ import annotations

import os

import numpy as np
import pytest

from nbp_mega.data.video import (
    ClipSpec,
    VideoError,
    clip_starts,
    iter_clips,
    list_videos,
    probe,
    read_clips,
    read_video_clips,
)
from tests.data.videos import (
    FORMATS,
    frame_number,
    write_broken_files,
    write_truncated_mjpeg,
    write_video,
)


def numbers(clips) -> list[list[int]]:
    """The source frame number at every position of every clip."""
    return [[frame_number(f) for f in c.frames] for c in clips]


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_every_container_and_codec_gives_the_source_frames_in_order(tmp_path, kind):
    path = write_video(str(tmp_path / f"v{FORMATS[kind][0]}"), kind, frames=23)
    info, clips = read_video_clips(path, ClipSpec(frames=5, resolution=16))
    assert info.src_fps == pytest.approx(30) and (info.height, info.width) == (48, 64)
    assert numbers(clips) == [list(range(s, s + 5)) for s in (0, 5, 10, 15)]  # 20..22 left over
    assert all(c.frames.dtype == np.uint8 and c.frames.shape == (5, 16, 16, 3) for c in clips)
    # (mkv/webm store times in whole milliseconds)
    assert [c.start_time for c in clips] == pytest.approx([0, 5 / 30, 10 / 30, 15 / 30],
                                                          abs=1e-3)


@pytest.mark.parametrize("fps, expected", [
    (10, lambda k: 3 * k),  # 30 -> 10 fps: every third source frame
    (12, lambda k: int(k * 2.5)),  # not an integer ratio: the frame on screen at k / 12 s
    (60, lambda k: k // 2),  # upsampling repeats frames
])
def test_resampling_picks_the_frame_on_screen_at_each_instant(tmp_path, fps, expected):
    # webm stores times in whole milliseconds: k / fps and the frame's time differ slightly
    path = write_video(str(tmp_path / "v.webm"), "webm-vp9", frames=45)
    _, clips = read_video_clips(path, ClipSpec(frames=9, resolution=16, fps=fps, stride=9))
    flat = [n for clip in numbers(clips) for n in clip]
    assert flat == [expected(k) for k in range(len(flat))]
    assert len(flat) == 9 * (int(1.5 * fps) // 9)  # 1.5 s of video


def test_variable_frame_rate_is_resampled_by_timestamps_not_frame_index(tmp_path):
    times = [0, 10, 50, 60, 200, 210, 400, 500, 510, 700]  # ms
    path = write_video(str(tmp_path / "vfr.mkv"), frames=10, times_ms=times)
    _, clips = read_video_clips(path, ClipSpec(frames=8, resolution=16, fps=10))
    # at 0.0, 0.1, ..., 0.7 s the frames shown are those with the last time <= t
    assert numbers(clips) == [[0, 3, 4, 5, 6, 7, 8, 9]]


def test_stride_overlap_limit_and_trim(tmp_path):
    path = write_video(str(tmp_path / "v.mkv"), frames=30)
    _, clips = read_video_clips(path, ClipSpec(frames=5, resolution=16, stride=2,
                                               clips_per_video=3))
    assert numbers(clips) == [[0, 1, 2, 3, 4], [2, 3, 4, 5, 6], [4, 5, 6, 7, 8]]
    _, clips = read_video_clips(path, ClipSpec(frames=5, resolution=16), start=0.5, end=0.9)
    assert numbers(clips) == [[15, 16, 17, 18, 19], [20, 21, 22, 23, 24]]
    assert clips[0].start_time == pytest.approx(0.5)


def test_random_windows_follow_the_seed_and_the_file_name(tmp_path):
    spec = ClipSpec(frames=5, sampling="random", clips_per_video=4, seed=1)
    a = clip_starts(100, spec, "/data/a.mp4")
    assert a == clip_starts(100, spec, "/elsewhere/a.mp4") == sorted(set(a))  # name, not dir
    assert len(a) == 4 and all(0 <= s <= 95 for s in a)
    assert a != clip_starts(100, ClipSpec(**{**spec.__dict__, "seed": 2}), "/data/a.mp4")
    assert clip_starts(6, spec, "a.mp4") == [0, 1]  # fewer possible windows than asked
    assert clip_starts(4, spec, "a.mp4") == []
    path = write_video(str(tmp_path / "v.mkv"), frames=30)
    _, clips = read_video_clips(path, ClipSpec(frames=5, resolution=16, sampling="random",
                                               clips_per_video=3, seed=7))
    starts = clip_starts(30, ClipSpec(frames=5, sampling="random", clips_per_video=3, seed=7),
                         path)
    assert numbers(clips) == [list(range(s, s + 5)) for s in starts]


def test_resize_shorter_side_then_centre_crop(tmp_path):
    import av

    path = str(tmp_path / "wide.mkv")
    with av.open(path, "w") as container:  # 96x48, white in columns 36..59
        stream = container.add_stream("ffv1", rate=30)
        stream.width, stream.height, stream.pix_fmt = 96, 48, "yuv444p"
        img = np.zeros((48, 96, 3), np.uint8)
        img[:, 36:60] = 255
        for _ in range(5):
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    _, clips = read_video_clips(path, ClipSpec(frames=5, resolution=24))
    # 48x96 -> 24x48 (white 18..29), keep the middle 24 columns 12..35 (white 6..17);
    # squeezing the whole width into 24 would put the white at 9..14 instead
    frame = clips[0].frames[0].astype(int)
    assert frame.shape == (24, 24, 3)
    assert frame[:, 7:17].min() > 200 and frame[:, :5].max() < 30 and frame[:, 19:].max() < 30


@pytest.mark.parametrize("name", ["zero.mp4", "garbage.mp4", "notes.avi", "photo.mp4",
                                  "cut.mp4", "short.mkv"])
def test_bad_files_raise_a_video_error_that_says_why(tmp_path, name):
    expected = write_broken_files(str(tmp_path))
    with pytest.raises(VideoError, match=expected[name]):
        read_video_clips(str(tmp_path / name), ClipSpec(frames=5, resolution=16))
    with pytest.raises(VideoError, match="file not found"):
        probe(str(tmp_path / "missing.mp4"))


def test_a_truncated_file_keeps_its_readable_clips_and_says_it_was_cut(tmp_path):
    path = write_truncated_mjpeg(str(tmp_path / "cut.avi"), frames=30)
    info = probe(path)
    assert info.note is not None and "truncated" in info.note and "of the 30 frames" in info.note
    clips = []
    with pytest.raises(VideoError, match=r"kept \d+ of \d+ clips"):  # a damaged last frame
        for clip in iter_clips(info, ClipSpec(frames=5, resolution=16)):
            clips.append(clip)
    assert 1 <= len(clips) < 6
    assert numbers(clips) == [list(range(s, s + 5)) for s in range(0, 5 * len(clips), 5)]


def test_read_clips_and_list_videos_helpers(tmp_path):
    os.makedirs(tmp_path / "b")
    write_video(str(tmp_path / "b" / "x.mkv"), frames=12)
    write_video(str(tmp_path / "a.webm"), "webm-vp9", frames=12)
    (tmp_path / "readme.txt").write_text("not a video")
    assert list_videos(str(tmp_path)) == [str(tmp_path / "a.webm"), str(tmp_path / "b" / "x.mkv")]
    clips = read_clips(str(tmp_path / "a.webm"), frames=5, resolution=16, max_clips=1)
    assert clips.shape == (1, 5, 16, 16, 3) and clips.dtype == np.uint8
    with pytest.raises(VideoError, match="too short"):
        read_clips(str(tmp_path / "a.webm"), frames=13, resolution=16)
    with pytest.raises(VideoError, match="not a directory"):
        list_videos(str(tmp_path / "readme.txt"))


def test_clip_spec_rejects_bad_values():
    for bad in (dict(frames=0), dict(fps=-1.0), dict(stride=0), dict(sampling="every"),
                dict(sampling="random")):
        with pytest.raises(VideoError):
            ClipSpec(**bad).check()
