"""Reconstruction quality and codebook use of a video tokenizer.

Legend: B batch; C channels; T frames; H, W pixels; K codebook size.
Videos are float [B, 3, T, H, W] in [-0.5, 0.5] (a peak-to-peak range of 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B] PSNR in dB of each clip (peak 1, the range of [-0.5, 0.5])."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size) - size // 2).float() ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, size, size)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B] mean SSIM over frames and channels (Gaussian window 11, sigma 1.5, peak 1)."""
    b, c, t, h, w = x.shape
    frames = lambda v: v.float().transpose(1, 2).reshape(b * t * c, 1, h, w)  # noqa: E731
    x, y = frames(x), frames(y)
    win = _gaussian_window().to(x.device)
    size = win.shape[-1]
    if h < size or w < size:
        raise ValueError(f"SSIM needs frames of at least {size}x{size}, got {h}x{w}")
    mu_x, mu_y = F.conv2d(x, win), F.conv2d(y, win)
    var_x = F.conv2d(x * x, win) - mu_x**2
    var_y = F.conv2d(y * y, win) - mu_y**2
    cov = F.conv2d(x * y, win) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1)
                                                     * (var_x + var_y + c2))
    return s.view(b, -1).mean(1)


class CodebookUsage:
    """Counts of code indices seen: fraction of the codebook used and perplexity."""

    def __init__(self, codebook_size: int):
        self.counts = torch.zeros(codebook_size, dtype=torch.float64)

    def update(self, indices: torch.Tensor) -> None:
        self.counts += torch.bincount(indices.flatten().cpu(),
                                      minlength=len(self.counts)).double()

    def summary(self) -> dict:
        total = self.counts.sum()
        p = self.counts[self.counts > 0] / total.clamp_min(1)
        return {"codes_used_fraction": float((self.counts > 0).double().mean()),
                "perplexity": float(torch.exp(-(p * p.log()).sum())) if total else 0.0}


@torch.no_grad()
def evaluate_tokenizer(tokenizer, clips) -> dict:
    """PSNR, SSIM and codebook use of `tokenizer` over an iterable of uint8 [N, T, H, W, 3]."""
    usage = CodebookUsage(tokenizer.codebook_size)
    psnrs, ssims = [], []
    for batch in clips:
        batch = torch.as_tensor(batch)
        video = batch.permute(0, 4, 1, 2, 3).float() / 255 - 0.5  # [N, 3, T, H, W]
        tokens = tokenizer.encode(video)
        recon = tokenizer.decode(tokens)
        usage.update(tokens)
        psnrs.append(psnr(recon, video))
        ssims.append(ssim(recon, video))
    if not psnrs:
        raise ValueError("no clip to evaluate")
    psnrs, ssims = torch.cat(psnrs), torch.cat(ssims)
    return {"clips": len(psnrs), "psnr": float(psnrs.mean()), "ssim": float(ssims.mean()),
            **usage.summary()}
