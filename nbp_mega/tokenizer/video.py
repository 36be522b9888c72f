"""`load_video_tokenizer`: the published NBP tokenizer file, our own format, or a preset.

Legend: B batch; T, H, W frames/height/width; t, h, w latent grid (t = 1 + (T-1)/4, h = H/8).

File formats read by `load_video_tokenizer(path)`:
  published  torch.save({"model_state_dict": {"module.<key>": tensor, ...}, ...}) of the
             `nbp-magvit2` architecture (magvit2_ucf.pt, magvit2_k600.pt)
  ours       torch.save({"format": "nbp_mega.video_tokenizer", "version": 1,
                         "config": Magvit2Config fields, "state_dict": {...}, "meta": {...}})
Both load strictly: a missing, unexpected or mis-shaped tensor is an error naming it.

Long clips are processed in time chunks through `Magvit2.streaming()` (exactly, see
magvit2.py): frames_per_chunk = F (a multiple of the time downsample ft, default 16) splits
the frames as 1 + F, F, F, ... (the last may be shorter, still a multiple of ft) and the
latents as 1 + F/ft, F/ft, ..., so peak memory follows F, not T (nbp-magvit2, 257x128x128:
the largest activation is 0.27 GiB instead of 4 GiB). A clip that fits in the first chunk
takes the one-piece path.

dtype: the conv stacks run in fp32 or bf16 (default: bf16 on CUDA, fp32 elsewhere, as CPU
bf16 convolutions are slow without AVX-512 BF16 / AMX); FSQ always quantises in fp32. Measured
on the tiny preset with random weights (tests/tokenizer/test_streaming.py, 2x33x32x32 clips, 4
seeds): bf16 gives 92-94% of the fp32 indices (98.7-99.1% of their 6 digits, none off by more
than one level); decoding the same tokens differs from fp32 by 0.0037 mean absolute error
(1.3% of the output std), 0.035 at most.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext

import torch

from nbp_mega.checksums import sha256_file, sha256_tensors
from nbp_mega.tokenizer.magvit2 import PRESETS, Magvit2, Magvit2Config

FORMAT = "nbp_mega.video_tokenizer"
VERSION = 1


class TokenizerError(ValueError):
    """A tokenizer file or an input that does not fit the tokenizer."""


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16}


def _compute_dtype(dtype, device: torch.device) -> torch.dtype:
    """None -> bf16 on CUDA, fp32 elsewhere; else a torch dtype or one of _DTYPES' names."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = _DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.bfloat16):
        raise TokenizerError(f"tokenizer dtype {dtype!r}: expected torch.float32 or "
                             f"torch.bfloat16 (or one of {sorted(_DTYPES)}, or None for auto)")
    return resolved


def _chunk_sizes(length: int, step: int | None) -> list[int]:
    """1 + step, step, step, ... (the last possibly shorter) summing to length; [length] if
    step is None or the whole length fits in the first chunk."""
    if step is None or length <= 1 + step:
        return [length]
    rest = length - 1 - step
    return [1 + step] + [step] * (rest // step) + ([rest % step] if rest % step else [])


class VideoTokenizer:
    """encode: video -> LongTensor [B, t, h, w]; decode: tokens -> video [B, 3, T, H, W].

    batch_size clips at a time; frames_per_chunk (None: whole clips) frames at a time after the
    first 1 + frames_per_chunk; dtype of the conv stacks (see the module docstring).
    """

    def __init__(self, model: Magvit2, *, name: str, checksum: str, batch_size: int = 4,
                 frames_per_chunk: int | None = 16, dtype: torch.dtype | str | None = None):
        self.model = model.eval()
        self.name, self._checksum, self.batch_size = name, checksum, batch_size
        self.frames_per_chunk = self._check_chunk(frames_per_chunk)
        self.dtype = _compute_dtype(dtype, self._device())
        model.cast_layers(self.dtype)

    def _check_chunk(self, frames: int | None) -> int | None:
        ft = self.downsample[0]
        if frames is not None and (not isinstance(frames, int) or isinstance(frames, bool)
                                   or frames < ft or frames % ft):
            raise TokenizerError(f"frames_per_chunk={frames!r}: expected a positive multiple "
                                 f"of the time downsample {ft} (chunks of 1 + F frames, then F; "
                                 f"e.g. {4 * ft}), or None for whole clips")
        return frames

    @property
    def codebook_size(self) -> int:
        return self.model.quantizer.codebook_size

    @property
    def downsample(self) -> tuple[int, int, int]:
        return self.model.cfg.downsample

    def checksum(self) -> str:
        """sha256 of the weights file (of the state dict for a preset)."""
        return self._checksum

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        ft, fh, fw = self.downsample
        if frames < 1 or (frames - 1) % ft:
            raise TokenizerError(f"{frames} frames: the tokenizer needs 1 + {ft}n frames "
                                 f"(e.g. {1 + ft * 4})")
        if height % fh or width % fw or height < fh or width < fw:
            raise TokenizerError(f"resolution {height}x{width}: height and width must be "
                                 f"positive multiples of {fh} and {fw}")
        return 1 + (frames - 1) // ft, height // fh, width // fw

    def _as_float_video(self, video: torch.Tensor) -> torch.Tensor:
        """float [B, 3, T, H, W] in [-0.5, 0.5], or uint8 [B, T, H, W, 3] -> the float layout."""
        if video.dtype == torch.uint8:
            if video.dim() != 5 or video.shape[-1] != 3:
                raise TokenizerError(f"uint8 video must be [B, T, H, W, 3], got "
                                     f"{tuple(video.shape)}")
            video = video.permute(0, 4, 1, 2, 3).float() / 255 - 0.5
        elif video.dtype.is_floating_point:
            if video.dim() != 5 or video.shape[1] != 3:
                raise TokenizerError(f"float video must be [B, 3, T, H, W], got "
                                     f"{tuple(video.shape)}")
            lo, hi = float(video.min()), float(video.max())
            if lo < -0.5 - 1e-3 or hi > 0.5 + 1e-3:
                raise TokenizerError(f"float video values span [{lo:.3f}, {hi:.3f}], expected "
                                     f"[-0.5, 0.5] (x/255 - 0.5); pass uint8 frames as "
                                     f"[B, T, H, W, 3] to have them converted")
        else:
            raise TokenizerError(f"video dtype {video.dtype}: expected float in [-0.5, 0.5] "
                                 f"[B, 3, T, H, W] or uint8 [B, T, H, W, 3]")
        self.latent_shape(*video.shape[2:])
        return video

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _streaming(self, chunks: list[int]):
        return self.model.streaming() if len(chunks) > 1 else nullcontext()

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        video = self._as_float_video(video)
        return torch.cat([self._encode_clips(clips) for clips in video.split(self.batch_size)])

    def _encode_clips(self, video: torch.Tensor) -> torch.Tensor:
        """float [b, 3, T, H, W] -> indices [b, t, h, w] on the CPU, time chunk by chunk."""
        chunks = _chunk_sizes(video.shape[2], self.frames_per_chunk)
        with self._streaming(chunks):
            out = [self.model.encode(frames.to(self._device()).float())[1].cpu()
                   for frames in video.split(chunks, dim=2)]
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 4:
            raise TokenizerError(f"tokens must be [B, t, h, w], got {tuple(tokens.shape)}")
        return torch.cat([self._decode_clips(clips) for clips in tokens.split(self.batch_size)])

    def _decode_clips(self, tokens: torch.Tensor) -> torch.Tensor:
        """indices [b, t, h, w] -> float32 video [b, 3, T, H, W] on the CPU; a chunk of n
        latent frames gives ft*n frames (the first chunk 1 + ft*(n-1))."""
        frames = self.frames_per_chunk
        chunks = _chunk_sizes(tokens.shape[1], frames and frames // self.downsample[0])
        out = []
        with self._streaming(chunks):
            for piece in tokens.split(chunks, dim=1):
                codes = self.model.quantizer.indices_to_codes(piece.to(self._device()))
                out.append(self.model.decode_codes(codes).float().clamp(-0.5, 0.5).cpu())
        return torch.cat(out, dim=2)


# -- files -----------------------------------------------------------------------------------
def _load_strict(model: Magvit2, state: dict, path: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise TokenizerError(
            f"{path} is a checkpoint for another tokenizer architecture: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. "
            f"{unexpected[:3]}), {len(shapes)} of other shape (e.g. {shapes[:2]}); expected "
            f"{model.cfg}")
    model.load_state_dict(state)


def _read(path: str) -> tuple[Magvit2Config, dict]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise TokenizerError(f"{path} is not a readable torch file ({type(e).__name__}: {e}); "
                             f"expected a tokenizer checkpoint") from None
    if isinstance(blob, dict) and blob.get("format") == FORMAT:
        if blob.get("version") != VERSION:
            raise TokenizerError(f"{path}: tokenizer format version {blob.get('version')}, this "
                                 f"nbp_mega reads version {VERSION}")
        cfg = blob["config"]
        cfg = Magvit2Config(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v)
                               if isinstance(v, list) else v for k, v in cfg.items()})
        return cfg, blob["state_dict"]
    if isinstance(blob, dict) and isinstance(blob.get("model_state_dict"), dict):
        state = {k.removeprefix("module."): v for k, v in blob["model_state_dict"].items()}
        return PRESETS["nbp-magvit2"], state
    keys = sorted(blob)[:5] if isinstance(blob, dict) else type(blob).__name__
    raise TokenizerError(f"{path} is not a video tokenizer checkpoint (top level {keys}); "
                         f"expected the published format (key 'model_state_dict') or "
                         f"nbp_mega's (key 'format' = {FORMAT!r})")


def load_video_tokenizer(path_or_preset: str, *, device="cpu", batch_size: int = 4,
                         seed: int = 0, frames_per_chunk: int | None = 16,
                         dtype: torch.dtype | str | None = None) -> VideoTokenizer:
    """A tokenizer from a file (published or ours) or a preset name (fresh weights from seed).

    frames_per_chunk, dtype: see VideoTokenizer (None dtype: bf16 on CUDA, fp32 elsewhere).
    """
    if path_or_preset in PRESETS:
        torch.manual_seed(seed)
        model = Magvit2(PRESETS[path_or_preset])
        checksum = sha256_tensors(model.state_dict())
        name = path_or_preset
    elif os.path.isfile(path_or_preset):
        cfg, state = _read(path_or_preset)
        with torch.device("meta"):
            model = Magvit2(cfg)
        model = model.to_empty(device="cpu")
        model.quantizer = type(model.quantizer)(cfg.levels)  # buffers are not in the file
        _load_strict(model, state, path_or_preset)
        checksum, name = sha256_file(path_or_preset), os.path.basename(path_or_preset)
    else:
        raise TokenizerError(f"{path_or_preset!r} is neither a tokenizer file nor a preset "
                             f"({', '.join(PRESETS)})")
    return VideoTokenizer(model.to(device), name=name, checksum=checksum, batch_size=batch_size,
                          frames_per_chunk=frames_per_chunk, dtype=dtype)


def save_video_tokenizer(model: Magvit2, path: str, meta: dict | None = None) -> None:
    """Write `model` in nbp_mega's format (atomically: a crash leaves no half file)."""
    save_tokenizer_state(model.cfg, model.state_dict(), path, meta)


def save_tokenizer_state(cfg: Magvit2Config, state: dict, path: str,
                         meta: dict | None = None) -> None:
    """Write a Magvit2 state dict of architecture `cfg` in nbp_mega's format, atomically."""
    blob = {"format": FORMAT, "version": VERSION, "config": dataclasses.asdict(cfg),
            "state_dict": state, "meta": meta or {}}
    tmp = f"{path}.partial"
    torch.save(blob, tmp)
    os.replace(tmp, path)
