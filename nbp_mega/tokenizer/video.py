"""`load_video_tokenizer`: the published NBP tokenizer file, our own format, or a preset.

Legend: B batch; T, H, W frames/height/width; t, h, w latent grid (t = 1 + (T-1)/4, h = H/8).

File formats read by `load_video_tokenizer(path)`:
  published  torch.save({"model_state_dict": {"module.<key>": tensor, ...}, ...}) of the
             `nbp-magvit2` architecture (magvit2_ucf.pt, magvit2_k600.pt)
  ours       torch.save({"format": "nbp_mega.video_tokenizer", "version": 1,
                         "config": Magvit2Config fields, "state_dict": {...}, "meta": {...}})
Both load strictly: a missing, unexpected or mis-shaped tensor is an error naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import torch

from nbp_mega.tokenizer.magvit2 import PRESETS, Magvit2, Magvit2Config

FORMAT = "nbp_mega.video_tokenizer"
VERSION = 1


class TokenizerError(ValueError):
    """A tokenizer file or an input that does not fit the tokenizer."""


class VideoTokenizer:
    """encode: video -> LongTensor [B, t, h, w]; decode: tokens -> video [B, 3, T, H, W]."""

    def __init__(self, model: Magvit2, *, name: str, checksum: str, batch_size: int = 4):
        self.model = model.eval()
        self.name, self._checksum, self.batch_size = name, checksum, batch_size

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

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        video = self._as_float_video(video)
        out = [self.model.encode(chunk.to(self._device()).float())[1].cpu()
               for chunk in video.split(self.batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 4:
            raise TokenizerError(f"tokens must be [B, t, h, w], got {tuple(tokens.shape)}")
        out = []
        for chunk in tokens.split(self.batch_size):
            codes = self.model.quantizer.indices_to_codes(chunk.to(self._device()))
            out.append(self.model.decode_codes(codes).clamp(-0.5, 0.5).cpu())
        return torch.cat(out)


# -- files -----------------------------------------------------------------------------------
def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_state(state: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
                         seed: int = 0) -> VideoTokenizer:
    """A tokenizer from a file (published or ours) or a preset name (fresh weights from seed)."""
    if path_or_preset in PRESETS:
        torch.manual_seed(seed)
        model = Magvit2(PRESETS[path_or_preset])
        checksum = _sha256_state(model.state_dict())
        name = path_or_preset
    elif os.path.isfile(path_or_preset):
        cfg, state = _read(path_or_preset)
        with torch.device("meta"):
            model = Magvit2(cfg)
        model = model.to_empty(device="cpu")
        model.quantizer = type(model.quantizer)(cfg.levels)  # buffers are not in the file
        _load_strict(model, state, path_or_preset)
        checksum, name = _sha256_file(path_or_preset), os.path.basename(path_or_preset)
    else:
        raise TokenizerError(f"{path_or_preset!r} is neither a tokenizer file nor a preset "
                             f"({', '.join(PRESETS)})")
    return VideoTokenizer(model.to(device), name=name, checksum=checksum, batch_size=batch_size)


def save_video_tokenizer(model: Magvit2, path: str, meta: dict | None = None) -> None:
    """Write `model` in nbp_mega's format (atomically: a crash leaves no half file)."""
    blob = {"format": FORMAT, "version": VERSION, "config": dataclasses.asdict(model.cfg),
            "state_dict": model.state_dict(), "meta": meta or {}}
    tmp = f"{path}.partial"
    torch.save(blob, tmp)
    os.replace(tmp, path)
