"""Tokenizer training end to end: runs, resumes exactly, exports weights that load, evaluates."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nbp_mega.data.synthetic_video import write_synthetic_videos
from nbp_mega.tokenizer import load_video_tokenizer
from nbp_mega.tokenizer.train import load_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.distributed


def train(run_dir, videos, *extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, f"{ROOT}/tools/train_tokenizer.py", f"{ROOT}/configs/tokenizer/tiny.yaml",
         f"run_dir={run_dir}", f"data.videos={videos}", "data.resolution=16",
         "train.steps=4", "train.save_every=0", "train.gan_weight=0.1", "train.gan_start=2",
         "train.image_every=2", *extra],
        env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = f.read().splitlines()
    return [json.loads(line) for line in lines], lines, proc.stderr


def test_train_resume_export_and_evaluate(tmp_path):
    videos = tmp_path / "videos"
    write_synthetic_videos(str(videos), count=3, frames=12, size=24)
    full, _, _ = train(tmp_path / "full", videos)
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    assert "gan_d" in full[2] and "gan_d" not in full[1]  # the GAN starts at train.gan_start
    assert full[2]["gan_scale"] > 0  # the adaptive weight (train.gan_adaptive, on by default)
    _, before, _ = train(tmp_path / "resumed", videos, "train.stop_at=2")
    resumed, after, log = train(tmp_path / "resumed", videos)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    # It resumed rather than started over: rows 1-2 untouched, timings included (a rerun
    # recomputes the same losses, never the same step_seconds), and the log names the step.
    assert after[:2] == before and len(before) == 2
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step_00000002"
    assert f"resumed from {checkpoint}" in log
    for a, b in zip(full, resumed, strict=True):
        for key in ("loss", "l1", "psnr"):
            assert a[key] == b[key], (a["step"], key)
    tok = load_video_tokenizer(str(tmp_path / "full" / "tokenizer.pt"))
    assert tok.model.cfg.channels == (16, 32, 32, 32)
    assert os.listdir(tmp_path / "full" / "tensorboard")
    out = subprocess.run([sys.executable, f"{ROOT}/tools/eval_tokenizer.py", "--tokenizer",
                          str(tmp_path / "full" / "tokenizer.pt"), "--videos", str(videos),
                          "--frames", "5", "--resolution", "16"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["clips"] == 3 and 0 < report["codes_used_fraction"] <= 1
    assert report["psnr"] > 0 and -1 <= report["ssim"] <= 1 and report["perplexity"] >= 1


def test_run_config_errors():
    with pytest.raises(ValueError, match="exactly one of data.videos"):
        load_run_config(None, [])
    with pytest.raises(ValueError, match="needs train.vgg_weights"):
        load_run_config(None, ["data.videos=x", "train.perceptual_weight=1"])
    with pytest.raises(ValueError, match="model.preset"):
        load_run_config(None, ["data.videos=x", "model.preset=huge"])


def test_adaptive_gan_scale_balances_the_gradients_at_the_reconstruction():
    import torch

    from nbp_mega.tokenizer.train import adaptive_gan_scale

    torch.manual_seed(0)
    recon = torch.randn(2, 3, 5, 8, 8, requires_grad=True)
    target = torch.randn(2, 3, 5, 8, 8)
    rec = (recon - target).square().mean()
    gan = -(recon * torch.randn_like(recon)).sum()  # a much steeper loss than rec
    scale = adaptive_gan_scale(rec, gan, recon)
    g_rec, = torch.autograd.grad(rec, recon, retain_graph=True)
    g_gan, = torch.autograd.grad(scale * gan, recon, retain_graph=True)
    assert scale.item() < 0.01 and not scale.requires_grad
    assert g_gan.norm().item() == pytest.approx(g_rec.norm().item(), rel=1e-3)
    assert adaptive_gan_scale(1e6 * rec, gan, recon, cap=5.0).item() == 5.0


def test_lr_warms_up_then_follows_a_cosine_to_the_floor():
    from nbp_mega.tokenizer.train import TrainSection, lr_factor

    cfg = TrainSection(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(cfg.steps)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1)  # the floor at the last step
    assert factors[60] == pytest.approx(0.55, abs=0.01)  # half way: the middle of 1 and 0.1
    decay = factors[10:]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    constant = TrainSection(steps=110, warmup_steps=10)  # min_lr_ratio 1: the old schedule
    assert [lr_factor(s, constant) for s in range(10, 110)] == [1.0] * 100
