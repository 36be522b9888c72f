"""The FVD feature extractor: a TorchScript I3D from a file the user gives, pinned by checksum.

    detector = load_detector("i3d_torchscript.pt", sha256="...")  # refuses another file
    features = detector.features(prepare(videos, frames=16))      # [B, 400] float64

The published protocol uses StyleGAN-V's TorchScript I3D (Kinetics-400), called as
`detector(x, rescale=False, resize=False, return_features=True)` on float videos
x [B, 3, T, 224, 224] in [-1, 1]; it returns [B, 400]. Its own rescaling and resizing are off:
`prepare` does both here, so the protocol is this code's, not the detector's defaults.

Legend: B videos, C=3 colour channels, T frames, H/W frame height/width (pixels).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from nbp_mega.checksums import sha256_file

I3D_SIZE = 224  # the I3D's input frames: the short side resized to this, then centre-cropped


class DetectorError(ValueError):
    """A detector file that is missing, unreadable or not the pinned one."""


class Detector:
    """A loaded TorchScript feature extractor and the checksum of its file."""

    def __init__(self, module, path: str, sha256: str, device: torch.device):
        self.module, self.path, self.sha256, self.device = module, path, sha256, device

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, T, 224, 224] in [-1, 1] -> features [B, D] float64 on the CPU."""
        out = self.module(x.to(self.device, torch.float32), rescale=False, resize=False,
                          return_features=True)
        if not torch.is_tensor(out) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            got = list(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise DetectorError(f"{self.path} returned {got} for {x.shape[0]} videos: expected "
                                "features [B, D] (the I3D's return_features=True output)")
        return out.double().cpu()

    def describe(self) -> dict:
        return {"path": os.path.abspath(self.path), "sha256": self.sha256}


def load_detector(path: str, *, sha256: str | None = None, allow_other: bool = False,
                  device: str | torch.device = "cpu") -> Detector:
    """The TorchScript detector at `path`. With `sha256` (the pin), a file of another checksum
    is refused unless allow_other=True (then it is used, and its own checksum recorded)."""
    if not path:
        raise DetectorError("no FVD detector given: expected the path of StyleGAN-V's "
                            "i3d_torchscript.pt (nothing is downloaded)")
    if not os.path.isfile(path):
        raise DetectorError(f"FVD detector {path}: no such file (expected StyleGAN-V's "
                            "TorchScript I3D, i3d_torchscript.pt; nothing is downloaded)")
    actual = sha256_file(path)
    if sha256 and actual != sha256.lower() and not allow_other:
        raise DetectorError(f"FVD detector {path} has sha256 {actual}, the pin is {sha256}: "
                            "a different file gives incomparable FVDs. Expected the pinned "
                            "file; to use this one anyway set fvd.allow_other_detector=true "
                            "(or allow_other=True), or pin its checksum")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated; the published I3D is one
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(path, map_location=device).eval()
    except (RuntimeError, ValueError) as e:
        raise DetectorError(f"FVD detector {path} is not a TorchScript file torch.jit.load "
                            f"can read ({str(e).splitlines()[0]})") from None
    return Detector(module, path, actual, torch.device(device))


def prepare(videos: torch.Tensor, *, frames: int, resolution: int | None = None) -> torch.Tensor:
    """Videos [B, 3, T, H, W] in [0, 1] -> the detector's input [B, 3, frames, 224, 224] in
    [-1, 1]: the first `frames` frames, (resolution: each frame first resized to
    resolution x resolution, the protocol's evaluation size, bilinear with antialiasing), each
    frame's shorter side resized to 224 (bilinear), a centre crop, [0, 1] -> [-1, 1]."""
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos of shape {list(videos.shape)}: expected [B, 3, T, H, W]")
    B, _, T, H, W = videos.shape
    if T < frames:
        raise ValueError(f"videos of {T} frames: the protocol evaluates the first {frames}")
    if not videos.is_floating_point():
        raise ValueError(f"videos of dtype {videos.dtype}: expected floats in [0, 1] (uint8 "
                         "frames divided by 255)")
    lo, hi = float(videos.min()), float(videos.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"video values in [{lo:.3g}, {hi:.3g}]: expected [0, 1]")
    x = videos[:, :, :frames].float().permute(0, 2, 1, 3, 4).reshape(B * frames, 3, H, W)
    if resolution is not None and (H, W) != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear",
                          align_corners=False, antialias=True)
        H = W = resolution
    scale = I3D_SIZE / min(H, W)
    h, w = max(I3D_SIZE, round(H * scale)), max(I3D_SIZE, round(W * scale))
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    top, left = (h - I3D_SIZE) // 2, (w - I3D_SIZE) // 2
    x = x[:, :, top : top + I3D_SIZE, left : left + I3D_SIZE]
    x = x.clamp(0, 1) * 2 - 1
    return x.reshape(B, frames, 3, I3D_SIZE, I3D_SIZE).permute(0, 2, 1, 3, 4).contiguous()
