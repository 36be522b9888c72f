"""Pixels in and out of generation: decode token clips, write MP4 / GIF / PNG, read the video
or image a clip is conditioned on. PyAV only (no Pillow or matplotlib).

Legend: N clips; T frames; H, W pixels; t, h, w latent grid.

Videos are float [3, T, H, W] in [0, 1] (what `decode_tokens` gives); files are 8-bit RGB.

    video = decode_tokens(tokenizer, tokens)[0]       # tokens [N, t, h, w] -> [3, T, H, W]
    write_mp4("sample_000.mp4", video, fps=8)
    write_contact_sheet("sheet.png", [video, ...], frames_per_row=8)

Reading conditioning media (`read_video`, `read_image`) brings frames to the tokenizer's
resolution the way preprocessing does (tools/preprocess_video_shards.py through
nbp_mega.data.video): the shorter side is resized (area filter) to cover H x W, then the frame
is centre-cropped; for a square grid that is exactly the preprocessing's transform. Frames are
taken as the file stores them (no frame-rate resampling).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

from nbp_mega.data.synthetic_video import write_video
from nbp_mega.data.video import VideoError, probe
from nbp_mega.tokenizer.video import TokenizerError


# -- tokens <-> pixels -----------------------------------------------------------------------
def check_tokenizer(tokenizer, model_cfg) -> tuple[int, int]:
    """The pixel size (H, W) of the model's grid through `tokenizer`; refuses a tokenizer
    whose codebook is not the model's video vocabulary."""
    if tokenizer.codebook_size != model_cfg.vocab_size:
        raise TokenizerError(f"tokenizer {tokenizer.name} has a codebook of "
                             f"{tokenizer.codebook_size} codes, the model's video vocabulary "
                             f"is model.vocab_size={model_cfg.vocab_size}: expected the "
                             f"tokenizer the model's shards were made with")
    _, fh, fw = tokenizer.downsample
    return model_cfg.grid[1] * fh, model_cfg.grid[2] * fw


def decode_tokens(tokenizer, tokens: torch.Tensor) -> torch.Tensor:
    """token grids [N, t, h, w] -> float videos [N, 3, T, H, W] in [0, 1]."""
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= tokenizer.codebook_size):
        raise TokenizerError(f"token ids span [{int(tokens.min())}, {int(tokens.max())}]: "
                             f"expected [0, {tokenizer.codebook_size}), the codebook of "
                             f"tokenizer {tokenizer.name}")
    return (tokenizer.decode(tokens.long().cpu()) + 0.5).clamp(0, 1)


def encode_frames(tokenizer, frames: np.ndarray) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] (1 + ft*n of them) -> token grid [1, t, h, w]."""
    return tokenizer.encode(torch.from_numpy(np.ascontiguousarray(frames))[None])


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """float [3, T, H, W] in [0, 1] -> uint8 [T, H, W, 3]."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video of shape {tuple(video.shape)}: expected [3, T, H, W]")
    pixels = (video.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).cpu().numpy()


# -- writers ---------------------------------------------------------------------------------
def write_mp4(path, video: torch.Tensor, fps: int = 8) -> None:
    """H.264 (yuv420p, which needs even sizes: an odd last row/column is repeated)."""
    frames = to_uint8_frames(video)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    write_video(path, frames, fps=fps, codec="libx264", pix_fmt="yuv420p")


def write_gif(path, video: torch.Tensor, fps: int = 8) -> None:
    """An animated GIF in the fixed 3-3-2-bit palette (rgb8): a preview, not for metrics."""
    write_video(path, to_uint8_frames(video), fps=fps, codec="gif", pix_fmt="rgb8")


def write_png(path, image: np.ndarray) -> None:
    """uint8 RGB [H, W, 3] -> an 8-bit PNG (written with zlib)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image {image.dtype} {image.shape}: expected uint8 [H, W, 3]")
    height, width = image.shape[:2]
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, filter 0
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))


def contact_sheet(videos: list[torch.Tensor], frames_per_row: int = 8,
                  gap: int = 2) -> np.ndarray:
    """One row per video, min(frames_per_row, T) frames spread evenly over its T frames (first
    and last included), `gap` white pixels between cells -> uint8 [rows, cols, 3]."""
    if not videos or frames_per_row < 1:
        raise ValueError(f"contact sheet of {len(videos)} videos, {frames_per_row} frames per "
                         "row: expected at least one video and one frame per row")
    sizes = {tuple(v.shape[2:]) for v in videos}
    if len(sizes) != 1:
        raise ValueError(f"contact sheet: videos of frame sizes {sorted(sizes)}: expected one")
    (height, width), per_row = sizes.pop(), min(frames_per_row, max(v.shape[1] for v in videos))
    sheet = np.full((len(videos) * (height + gap) - gap, per_row * (width + gap) - gap, 3), 255,
                    np.uint8)
    for r, video in enumerate(videos):
        frames = to_uint8_frames(video)
        picks = np.linspace(0, len(frames) - 1, min(per_row, len(frames))).round().astype(int)
        for c, k in enumerate(picks):
            y, x = r * (height + gap), c * (width + gap)
            sheet[y:y + height, x:x + width] = frames[k]
    return sheet


def write_contact_sheet(path, videos: list[torch.Tensor], frames_per_row: int = 8) -> None:
    """PNG of `contact_sheet(videos, frames_per_row)`: row i is videos[i]."""
    write_png(path, contact_sheet(videos, frames_per_row))


# -- readers (conditioning) ------------------------------------------------------------------
def _cover_crop(frame, height: int, width: int) -> np.ndarray:
    """A PyAV frame -> uint8 [height, width, 3]: resized (area filter) to cover the target,
    centre-cropped."""
    scale = max(height / frame.height, width / frame.width)
    h, w = max(height, round(frame.height * scale)), max(width, round(frame.width * scale))
    rgb = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
    top, left = (h - height) // 2, (w - width) // 2
    return rgb[top:top + height, left:left + width]


def read_video(path: str, frames: int, height: int, width: int) -> np.ndarray:
    """The first `frames` frames of the file -> uint8 [frames, height, width, 3]."""
    import av

    probe(path)  # VideoError naming the problem: missing, empty, no container, no stream
    out = []
    try:
        with av.open(path) as container:
            for frame in container.decode(container.streams.video[0]):
                out.append(_cover_crop(frame, height, width))
                if len(out) == frames:
                    break
    except av.FFmpegError as e:
        raise VideoError(f"{path}: not a readable video or image (decoding failed after "
                         f"{len(out)} frames: {e})") from None
    if len(out) < frames:
        raise VideoError(f"{path} holds {len(out)} frames: expected at least {frames}")
    return np.stack(out)


def read_image(path: str, height: int, width: int) -> np.ndarray:
    """An image file (PNG, JPEG, ... anything FFmpeg reads) -> uint8 [1, height, width, 3]."""
    return read_video(path, 1, height, width)
