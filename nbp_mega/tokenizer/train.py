"""Training a video tokenizer: DeepSpeed data parallel (ZeRO-2 by default), L1 + optional
perceptual + optional PatchGAN losses, FSQ with straight-through rounding, exact resume.

Legend: G global batch (clips per step, all ranks); b = G / dp; T frames; R resolution.

    python tools/train_tokenizer.py configs/tokenizer/tiny.yaml [key.sub=value ...]

Run directory: config.yaml, metrics.jsonl (step, loss terms, psnr, lr), tensorboard/ (the
same plus reconstruction samples and SSIM), checkpoints/step_N/ (DeepSpeed state of the
autoencoder, discriminator.pt, trainer_state.json), checkpoints/latest, and tokenizer.pt (the
final weights in the format `load_video_tokenizer` reads).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import yaml

from nbp_mega.config_fields import ConfigError, check, deep_merge, merge, option, parse_overrides
from nbp_mega.parallel.collectives import all_reduce_mean_
from nbp_mega.tokenizer.magvit2 import PRESETS, Magvit2, Magvit2Config

log = logging.getLogger("nbp_mega.tokenizer")


@dataclass
class ModelSection:
    preset: str = option("tiny", "architecture preset", choices=sorted(PRESETS))
    channels: list[int] = option([], "encoder widths ([] = preset)")
    res_units: list[int] = option([], "residual units per stage ([] = preset)")
    norm_groups: int = option(0, "GroupNorm groups with norm=group (0 = preset)", min=0)
    norm: str = option("", "normalisation: group (published) or none ('' = preset)",
                       choices=["", "group", "none"])


@dataclass
class DataSection:
    videos: str = option("", "folder of video files (recursive)")
    shards: str = option("", "raw-clip shards (<key>.frames.npy uint8 [T, R, R, 3])")
    frames: int = option(17, "frames per clip (1 + 4n)", min=1)
    resolution: int = option(128, "clip height and width (multiple of 8)", min=8)
    fps: float = option(0.0, "resample videos to this rate (0 = as stored)", min=0)
    clips_per_video: int = option(8, "clips cut from each video", min=1)


@dataclass
class TrainSection:
    steps: int = option(1000, "optimizer steps", min=1)
    global_batch: int = option(8, "clips per step over all ranks", min=1)
    lr: float = option(1e-4, "autoencoder learning rate (AdamW)", min=0)
    warmup_steps: int = option(100, "linear warm-up steps", min=0)
    min_lr_ratio: float = option(1.0, "cosine decay from lr to this fraction of it at the "
                                 "last step (1 = constant after warm-up)", min=0)
    zero_stage: int = option(2, "DeepSpeed ZeRO stage over the data-parallel ranks",
                             choices=[0, 1, 2, 3])
    l1_weight: float = option(1.0, "weight of the L1 reconstruction loss", min=0)
    l2_weight: float = option(0.0, "weight of the mean squared reconstruction error (trains "
                              "small models from scratch faster than L1)", min=0)
    perceptual_weight: float = option(0.0, "weight of the VGG perceptual loss (needs "
                                      "vgg_weights)", min=0)
    vgg_weights: str = option("", "VGG-16 state dict file (torchvision keys features.N.*)")
    gan_weight: float = option(0.0, "weight of the PatchGAN generator loss (0 = no GAN)", min=0)
    gan_adaptive: bool = option(True, "scale the generator loss by ||grad rec|| / ||grad gan|| "
                                "(VQGAN's balance, measured at the reconstruction) before "
                                "gan_weight; a fixed weight swamps a small reconstruction loss")
    gan_start: int = option(0, "step at which the adversarial losses start", min=0)
    disc_lr: float = option(1e-4, "discriminator learning rate", min=0)
    save_every: int = option(500, "checkpoint every N steps (0 = at the end only)", min=0)
    image_every: int = option(100, "reconstruction samples to TensorBoard every N steps", min=1)
    stop_at: int = option(0, "leave after this step with a checkpoint (0 = run to steps)",
                          min=0)


@dataclass
class TokenizerRunConfig:
    run_dir: str = option("runs/tokenizer", "where logs, checkpoints and weights go")
    seed: int = option(0, "seed of the weights and of the clip order")
    model: ModelSection = option(default_factory=ModelSection)
    data: DataSection = option(default_factory=DataSection)
    train: TrainSection = option(default_factory=TrainSection)

    def validate(self) -> None:
        if bool(self.data.videos) == bool(self.data.shards):
            raise ConfigError("give exactly one of data.videos (a folder) and data.shards")
        if self.train.perceptual_weight and not self.train.vgg_weights:
            raise ConfigError("train.perceptual_weight > 0 needs train.vgg_weights = a VGG-16 "
                              "state dict file (nothing is downloaded)")


def load_run_config(path: str | None, overrides: list[str]) -> TokenizerRunConfig:
    updates = {}
    if path:
        with open(path) as f:
            updates = yaml.safe_load(f) or {}
    cfg = merge(TokenizerRunConfig(), deep_merge(updates, parse_overrides(overrides)))
    check(cfg)
    cfg.validate()
    return cfg


def model_config(section: ModelSection) -> Magvit2Config:
    base = PRESETS[section.preset]
    changes = {k: tuple(getattr(section, k)) for k in ("channels", "res_units")
               if getattr(section, k)}
    if section.norm_groups:
        changes["norm_groups"] = section.norm_groups
    if section.norm:
        changes["norm"] = section.norm
    try:
        cfg = dataclasses.replace(base, **changes)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    if section.norm_groups and cfg.norm != "group":
        raise ConfigError(f"model.norm_groups={section.norm_groups} needs model.norm=group; "
                          f"the model has norm={cfg.norm!r} (no GroupNorm layers)")
    return cfg


# -- data ------------------------------------------------------------------------------------
def load_clips(cfg: DataSection) -> np.ndarray:
    """uint8 [N, T, R, R, 3]: every training clip, in a fixed order (all ranks alike)."""
    if cfg.videos:
        from nbp_mega.data.video import VideoError, list_videos, read_clips

        clips = []
        for path in list_videos(cfg.videos):
            try:
                clips.append(read_clips(path, frames=cfg.frames, resolution=cfg.resolution,
                                        fps=cfg.fps or None, max_clips=cfg.clips_per_video))
            except VideoError as e:
                log.warning("skipping %s", e)
    else:
        clips = [_read_raw_shards(cfg)]
    if not clips or not sum(len(c) for c in clips):
        raise ConfigError(f"no training clip in {cfg.videos or cfg.shards}")
    return np.concatenate(clips)


def _read_raw_shards(cfg: DataSection) -> np.ndarray:
    import io

    import webdataset as wds

    from nbp_mega.data.shards import expand_shards

    clips = []
    for path in expand_shards(cfg.shards):
        for sample in wds.DataPipeline(wds.SimpleShardList([path]), wds.tarfile_to_samples()):
            frames = np.load(io.BytesIO(sample["frames.npy"]), allow_pickle=False)
            want = (cfg.frames, cfg.resolution, cfg.resolution, 3)
            if frames.dtype != np.uint8 or frames.shape != want:
                raise ConfigError(f"{path}: sample {sample['__key__']} frames are "
                                  f"{frames.dtype} {frames.shape}, expected uint8 {want}")
            clips.append(frames)
    return np.stack(clips) if clips else np.zeros((0,), np.uint8)


def batch_for_step(clips: np.ndarray, step: int, *, seed: int, global_batch: int, dp_rank: int,
                   dp: int) -> torch.Tensor:
    """This rank's slice of the clips of step `step` (0-based): float [b, 3, T, R, R]."""
    n, local = len(clips), global_batch // dp
    start = step * global_batch + dp_rank * local
    ids = [np.random.default_rng([seed, p // n]).permutation(n)[p % n]
           for p in range(start, start + local)]
    video = torch.from_numpy(clips[ids]).permute(0, 4, 1, 2, 3).float() / 255 - 0.5
    return video


# -- the run ---------------------------------------------------------------------------------
@dataclass
class Parts:
    engine: object  # DeepSpeed engine of the autoencoder
    disc: torch.nn.Module | None
    disc_opt: torch.optim.Optimizer | None
    perceptual: torch.nn.Module | None


def build_parts(cfg: TokenizerRunConfig, dims) -> Parts:
    from nbp_mega.parallel.deepspeed import build_plain_engine
    from nbp_mega.tokenizer.losses import PatchDiscriminator3D, VGGPerceptualLoss

    torch.manual_seed(cfg.seed)
    model = Magvit2(model_config(cfg.model))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, cfg=cfg.train))
    ds = {"train_batch_size": cfg.train.global_batch,
          "train_micro_batch_size_per_gpu": cfg.train.global_batch // dims.dp,
          "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": cfg.train.zero_stage},
          "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1}
    engine = build_plain_engine(model, opt, ds, dims, scheduler=sched)
    disc = disc_opt = perceptual = None
    if cfg.train.gan_weight:
        disc = PatchDiscriminator3D().to(dims.device)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.train.disc_lr, betas=(0.5, 0.9))
    if cfg.train.perceptual_weight:
        perceptual = VGGPerceptualLoss(cfg.train.vgg_weights).to(dims.device)
    return Parts(engine, disc, disc_opt, perceptual)


def lr_factor(step: int, cfg: TrainSection) -> float:
    """The learning rate of 0-based `step` over train.lr: linear warm-up over warmup_steps,
    then a cosine from 1 to min_lr_ratio at the last step."""
    warm = max(cfg.warmup_steps, 1)
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(cfg.steps - 1 - warm, 1))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adaptive_gan_scale(rec_loss: torch.Tensor, gan_loss: torch.Tensor, recon: torch.Tensor,
                       cap: float = 1e4) -> torch.Tensor:
    """||d rec_loss / d recon|| / ||d gan_loss / d recon||, detached and at most `cap`: the
    generator loss times this pulls on the reconstruction as hard as the reconstruction loss
    does. VQGAN takes the norms at the decoder's last weight; the decoder's output gives a
    like balance without touching parameters, which ZeRO-3 partitions. Each data-parallel
    rank takes it from its own clips, as VQGAN does under DDP."""
    g_rec, = torch.autograd.grad(rec_loss, recon, retain_graph=True)
    g_gan, = torch.autograd.grad(gan_loss, recon, retain_graph=True)
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(max=cap).detach()


def train_step(parts: Parts, video: torch.Tensor, step: int, cfg: TrainSection, dims) -> dict:
    """One step of the autoencoder (and of the discriminator once the GAN has started)."""
    from nbp_mega.tokenizer.losses import hinge_d_loss, hinge_g_loss
    from nbp_mega.tokenizer.metrics import psnr

    engine, gan_on = parts.engine, parts.disc is not None and step >= cfg.gan_start
    recon, _ = engine(video)
    # The losses run on a leaf copy of the reconstruction: the GAN balance differentiates them
    # there (a torch.autograd.grad into the engine's graph would fire DeepSpeed's backward
    # hooks), and the model gets d loss / d recon through one backward of the engine.
    out = recon.detach().requires_grad_()
    error = out - video
    terms = {"l1": error.abs().mean()}
    if cfg.l2_weight:
        terms["l2"] = error.square().mean()
    if parts.perceptual is not None:
        terms["perceptual"] = parts.perceptual(out, video)
    weights = {"l1": cfg.l1_weight, "l2": cfg.l2_weight, "perceptual": cfg.perceptual_weight}
    loss = sum(weights[k] * v for k, v in terms.items())
    record = {k: v.item() for k, v in terms.items()}
    if gan_on:
        parts.disc.requires_grad_(False)
        gan_g = hinge_g_loss(parts.disc(out))
        parts.disc.requires_grad_(True)
        scale = adaptive_gan_scale(loss, gan_g, out) if cfg.gan_adaptive else 1.0
        loss = loss + cfg.gan_weight * scale * gan_g
        record["gan_g"], record["gan_scale"] = gan_g.item(), float(scale)
    grad, = torch.autograd.grad(loss, out)
    engine.backward((recon * grad).sum())
    engine.step()
    if gan_on:
        parts.disc_opt.zero_grad(set_to_none=True)
        d_loss = hinge_d_loss(parts.disc(video), parts.disc(out.detach()))
        d_loss.backward()
        all_reduce_mean_([p.grad for p in parts.disc.parameters() if p.grad is not None],
                         dims.dp_group)
        parts.disc_opt.step()
        record["gan_d"] = d_loss.item()
    record["loss"], record["psnr"] = loss.item(), psnr(out.detach(), video).mean().item()
    return record


def save(parts: Parts, cfg: TokenizerRunConfig, dims, step: int) -> None:
    """checkpoints/step_N (written as .partial, renamed when every rank is done) + latest."""
    ckpt = os.path.join(cfg.run_dir, "checkpoints")
    name = f"step_{step:08d}"
    parts.engine.save_checkpoint(ckpt, tag=f"{name}.partial", save_latest=False)
    partial = os.path.join(ckpt, f"{name}.partial")
    if dims.is_main:
        extra = {"step": step, "rng": torch.get_rng_state()}
        if parts.disc is not None:
            extra["disc"], extra["disc_opt"] = parts.disc.state_dict(), parts.disc_opt.state_dict()
        torch.save(extra, os.path.join(partial, "trainer_state.pt"))
    dist.barrier()
    if dims.is_main:
        final = os.path.join(ckpt, name)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(partial, final)
        with open(os.path.join(ckpt, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(ckpt, "latest.tmp"), os.path.join(ckpt, "latest"))
    dist.barrier()


def resume(parts: Parts, cfg: TokenizerRunConfig) -> int:
    """The step to continue from (0 for a fresh run)."""
    ckpt = os.path.join(cfg.run_dir, "checkpoints")
    if not os.path.exists(os.path.join(ckpt, "latest")):
        return 0
    with open(os.path.join(ckpt, "latest")) as f:
        name = f.read().strip()
    path, _ = parts.engine.load_checkpoint(ckpt, tag=name)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {os.path.join(ckpt, name)}")
    extra = torch.load(os.path.join(ckpt, name, "trainer_state.pt"), weights_only=False)
    torch.set_rng_state(extra["rng"])
    if parts.disc is not None and "disc" in extra:
        parts.disc.load_state_dict(extra["disc"])
        parts.disc_opt.load_state_dict(extra["disc_opt"])
    log.info("resumed from %s", os.path.join(ckpt, name))
    return extra["step"]


def run(cfg: TokenizerRunConfig) -> dict:
    from nbp_mega.parallel.dims import (
        ParallelConfig,
        init_parallel,
        report_devices,
        shutdown_parallel,
    )
    from nbp_mega.tokenizer.video import save_video_tokenizer

    dims = init_parallel(ParallelConfig(tensor=1, zero_stage=cfg.train.zero_stage))
    report_devices(dims)
    if cfg.train.global_batch % dims.dp:
        raise ConfigError(f"train.global_batch={cfg.train.global_batch} is not a multiple of "
                          f"the {dims.dp} data-parallel ranks")
    os.makedirs(cfg.run_dir, exist_ok=True)
    if dims.is_main:
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    clips = load_clips(cfg.data)
    parts = build_parts(cfg, dims)
    step = resume(parts, cfg)
    last = cfg.train.stop_at or cfg.train.steps
    writer = _Writer(cfg.run_dir, start=step) if dims.is_main else None
    record = {}
    while step < last:
        video = batch_for_step(clips, step, seed=cfg.seed, global_batch=cfg.train.global_batch,
                               dp_rank=dims.dp_rank, dp=dims.dp).to(dims.device)
        start = time.perf_counter()
        record = train_step(parts, video, step, cfg.train, dims)
        step += 1
        record = {"step": step, **record, "lr": parts.engine.get_lr()[0],
                  "step_seconds": time.perf_counter() - start}
        if writer:
            writer.log(record, parts.engine.module, video if step % cfg.train.image_every == 0
                       or step == last else None)
        if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == last:
            save(parts, cfg, dims, step)
    if dims.is_main and step == cfg.train.steps:
        save_video_tokenizer(parts.engine.module, os.path.join(cfg.run_dir, "tokenizer.pt"),
                             meta={"steps": step, "seed": cfg.seed})
    if writer:
        writer.close()
    shutdown_parallel()
    return record


class _Writer:
    """metrics.jsonl (truncated to `start` on resume) and TensorBoard, rank 0 only."""

    def __init__(self, run_dir: str, start: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = os.path.join(run_dir, "metrics.jsonl")
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= start]
        with open(self.path, "w") as f:
            f.writelines(kept)
        self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start + 1)

    def log(self, record: dict, model, video) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step":
                self.tb.add_scalar(f"train/{key}", value, record["step"])
        if video is not None:
            self._samples(record["step"], model, video[:2])

    @torch.no_grad()
    def _samples(self, step: int, model, video) -> None:
        from nbp_mega.tokenizer.metrics import ssim

        model.eval()
        codes, _ = model.encode(video)
        recon = model.decode_codes(codes).clamp(-0.5, 0.5)
        model.train()
        self.tb.add_scalar("train/ssim", ssim(recon, video).mean().item(), step)
        both = torch.cat([video[0], recon[0]], dim=2) + 0.5  # [3, T, 2R, R]: input above recon
        self.tb.add_images("reconstruction", both.transpose(0, 1).float().cpu(), step)

    def close(self) -> None:
        self.tb.close()
