"""Sample clips from a trained run: one forward step per block (nbp_mega.generate).

    python tools/sample.py RUN_DIR_OR_CHECKPOINT --out DIR [--checkpoint NAME] [--num N]
        [--labels ...] [--prefix-tokens FILE.npy --prefix-frames K] [--prefix-video FILE]
        [--image FILE] [--greedy] [--seed S] [--top-k K] [--top-p P] [--temperature T]
        [--cfg-scale G] [--tokenizer PATH] [--batch-size B] [--fps F] [--cuda-graph]
        [--prompts TEXT [TEXT ...] --text-tokenizer FILE.model]
    torchrun --nproc-per-node 2 tools/sample.py ...   # tensor parallel over WORLD_SIZE ranks

RUN_DIR_OR_CHECKPOINT: a run directory (its latest checkpoint, or --checkpoint NAME), one
checkpoint folder inside it (RUN/checkpoints/step_00000300), any ZeRO stage and TP size, or a
state-dict file written by tools/convert_to_hf.py --state-dict.
Writes (rank 0 only; every rank generates):
  DIR/tokens.npy      int64 [N, T, H, W]: the whole clips, given frames included
  DIR/samples.json    settings, seeds, labels, steps, timings, checkpoint, model summary
  with --tokenizer:   DIR/sample_000.mp4 ..., DIR/sample_000.gif ..., DIR/contact_sheet.png
Sample i uses seed + i (and, by default, label (seed + i) mod num_classes), so any subset
can be regenerated alone: sample i of a run is `--seed S+i --num 1`.
Conditioning: --labels one id for all or one per sample (class-conditional models);
--prompts one text for all or one per sample (text-conditional models, model.text_len > 0),
through the sentencepiece model the shards were made with (--text-tokenizer), in the paper's
fixed form: bos + ids, truncated to model.text_len with no eos kept, padded with eos.
Frame prediction: the first K latent frames (--prefix-frames, a multiple of the block's
frames and fewer than the grid's T; default about half the clip, at least one block: the
paper's K600 setting 2 of 5) come from
  --prefix-tokens FILE.npy  token grids [N or 1, >= K, H, W]
  --prefix-video FILE       its first 1 + 4(K-1) frames, resized and centre-cropped to the
                            tokenizer's resolution and tokenized on the fly (--tokenizer)
  --image FILE              K = 1: the causal MAGVIT-v2 tokenizer encodes a clip's first frame
                            alone into latent frame 0, so a 1-frame clip gives that frame
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nbp_mega.generate import SamplingConfig, generate, outputs  # noqa: E402


class UsageError(ValueError):
    """Arguments that do not fit the model or each other."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--checkpoint", default=None, help="checkpoint name (default: latest)")
    p.add_argument("--num", type=int, default=8, help="clips to sample")
    p.add_argument("--seed", type=int, default=0, help="seed of sample 0 (sample i: seed + i)")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="class ids")
    p.add_argument("--prompts", nargs="+", default=None, help="texts (text-conditional)")
    p.add_argument("--text-tokenizer", default=None, help="sentencepiece .model of --prompts")
    p.add_argument("--prefix-tokens", default=None, help=".npy token grids [N or 1, >=K, H, W]")
    p.add_argument("--prefix-video", default=None, help="video file (needs --tokenizer)")
    p.add_argument("--image", default=None, help="image file: first-frame conditioning")
    p.add_argument("--prefix-frames", type=int, default=None, help="K given latent frames")
    p.add_argument("--greedy", action="store_true", help="the most likely token (temperature 0)")
    d = SamplingConfig()
    p.add_argument("--temperature", type=float, default=None, help=f"default {d.temperature}")
    p.add_argument("--top-k", type=int, default=d.top_k, help="0 = all tokens")
    p.add_argument("--top-p", type=float, default=d.top_p, help="1 = all tokens")
    p.add_argument("--cfg-scale", type=float, default=d.guidance_scale,
                   help="classifier-free guidance scale (models trained with cond_dropout)")
    p.add_argument("--tokenizer", default=None, help="video tokenizer file or preset")
    p.add_argument("--batch-size", type=int, default=8, help="clips per forward")
    p.add_argument("--fps", type=int, default=8, help="frame rate of the MP4 and GIF files")
    p.add_argument("--cuda-graph", action="store_true", help="replay each step from a CUDA "
                   "graph (on a GPU; captured in the first batch, reused by the others)")
    args = p.parse_args(argv)
    if args.num < 1 or args.batch_size < 1:
        p.error(f"--num {args.num}, --batch-size {args.batch_size}: expected both >= 1")
    if sum(x is not None for x in (args.prefix_tokens, args.prefix_video, args.image)) > 1:
        p.error("--prefix-tokens, --prefix-video and --image: expected at most one of them")
    return args


def sampling_from(args) -> SamplingConfig:
    if args.greedy and args.temperature not in (None, 0.0):
        raise UsageError(f"--greedy with --temperature {args.temperature}: greedy is "
                         "temperature 0; expected one of the two")
    sampling = SamplingConfig(top_k=args.top_k, top_p=args.top_p,
                              guidance_scale=args.cfg_scale)
    if args.greedy or args.temperature is not None:
        sampling.temperature = 0.0 if args.greedy else args.temperature
    sampling.validate()
    return sampling


def labels_for(args, model_cfg) -> torch.Tensor | None:
    """[N] class ids: --labels (one for all or one per sample), else (seed + i) mod C."""
    classes = model_cfg.num_classes
    if classes == 0:
        if args.labels:
            raise UsageError(f"--labels {' '.join(map(str, args.labels))}: the model is not "
                             "class-conditional (model.num_classes=0); expected no --labels")
        return None
    labels = args.labels or [(args.seed + i) % classes for i in range(args.num)]
    bad = [x for x in labels if not 0 <= x < classes]
    labels = labels * args.num if len(labels) == 1 else labels
    if len(labels) != args.num or bad:
        raise UsageError(f"--labels {' '.join(map(str, args.labels))}: expected 1 or "
                         f"{args.num} class ids in [0, {classes}) (model.num_classes="
                         f"{classes})" + (f"; {bad} are out of range" if bad else ""))
    return torch.tensor(labels)


def text_for(args, model_cfg) -> torch.Tensor | None:
    """[N, text_len] text ids of --prompts (one for all or one per sample)."""
    from nbp_mega.tokenizer.text import TextTokenizer

    if not model_cfg.text_len:
        if args.prompts:
            raise UsageError("--prompts given, but the model is not text-conditional "
                             "(model.text_len=0); expected no --prompts")
        return None
    prompts = args.prompts or []
    if len(prompts) not in (1, args.num) or not args.text_tokenizer:
        raise UsageError(f"the model is text-conditional (model.text_len={model_cfg.text_len}):"
                         f" expected --prompts with 1 or {args.num} texts and --text-tokenizer "
                         f"(got {len(prompts)} prompts, text tokenizer {args.text_tokenizer})")
    tok = TextTokenizer(args.text_tokenizer)
    have = (tok.vocab_size, tok.bos_id, tok.eos_id)
    want = (model_cfg.text_vocab, model_cfg.text_bos_id, model_cfg.text_eos_id)
    if have != want:
        raise UsageError(f"--text-tokenizer {args.text_tokenizer}: vocabulary/bos/eos {have}, "
                         f"the model was trained with {want} (model.text_vocab, text_bos_id, "
                         "text_eos_id)")
    ids = torch.from_numpy(tok.encode_fixed(prompts, model_cfg.text_len)).long()
    return ids.expand(args.num, -1) if len(prompts) == 1 else ids


def given_frames(args, model) -> int:
    """K: --prefix-frames (or the default), checked against the block and the grid."""
    T, bt = model.cfg.grid[0], model.layout.blocks.block[0]
    default = 1 if args.image else max(bt, (T - 1) // 2 // bt * bt)
    frames = default if args.prefix_frames is None else args.prefix_frames
    if args.image and frames != 1:
        raise UsageError(f"--image gives 1 latent frame, --prefix-frames says {frames}")
    if frames < 1 or frames % bt or frames >= T:
        raise UsageError(f"--prefix-frames {frames}: expected a positive multiple of the "
                         f"block's {bt} latent frames, fewer than the grid's {T}")
    return frames


def prefix_tokens(path: str, frames: int, num: int, model) -> torch.Tensor:
    """--prefix-tokens FILE.npy -> the first K latent frames [N or 1, K, H, W]."""
    _, H, W = model.cfg.grid
    try:
        tokens = np.load(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--prefix-tokens {path}: not a readable .npy file ({e})") from None
    want = f"[{num} or 1, >= {frames}, {H}, {W}] integer tokens"
    if tokens.ndim != 4 or tokens.shape[0] not in (1, num) or tokens.shape[1] < frames \
            or tokens.shape[2:] != (H, W) or tokens.dtype.kind not in "iu":
        raise UsageError(f"--prefix-tokens {path}: {tokens.dtype} {list(tokens.shape)}, "
                         f"expected {want}")
    tokens = torch.from_numpy(tokens[:, :frames].astype(np.int64))
    vocab = model.cfg.vocab_size
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise UsageError(f"--prefix-tokens {path}: ids in [{int(tokens.min())}, "
                         f"{int(tokens.max())}], expected the video vocabulary [0, {vocab})")
    return tokens


def prefix_from_pixels(args, frames: int, model, tokenizer) -> torch.Tensor:
    """--prefix-video / --image -> its first K latent frames [1, K, H, W]."""
    flag = "--image" if args.image else "--prefix-video"
    if tokenizer is None:
        raise UsageError(f"{flag} needs --tokenizer (the video tokenizer the model's shards "
                         "were made with) to turn pixels into tokens")
    height, width = outputs.check_tokenizer(tokenizer, model.cfg)
    if args.image:
        pixels = outputs.read_image(args.image, height, width)
    else:
        pixels = outputs.read_video(args.prefix_video, 1 + tokenizer.downsample[0] * (frames - 1),
                                    height, width)
    return outputs.encode_frames(tokenizer, pixels)[:, :frames]


def conditioning(args, model, tokenizer) -> tuple[dict, dict]:
    """(generate() keyword arguments with [N, ...] tensors, what to record of them)."""
    labels, text = labels_for(args, model.cfg), text_for(args, model.cfg)
    cond, record = {"labels": labels}, {"labels": None if labels is None else labels.tolist()}
    if text is not None:
        cond["text"] = text
        record["prompts"], record["text_ids"] = args.prompts, text.tolist()
    source = args.prefix_tokens or args.prefix_video or args.image
    if source is not None:
        frames = given_frames(args, model)
        if args.prefix_tokens:
            context = prefix_tokens(args.prefix_tokens, frames, args.num, model)
        else:
            context = prefix_from_pixels(args, frames, model, tokenizer)
        cond["context"] = context.expand(args.num, -1, -1, -1)
        kind = "tokens" if args.prefix_tokens else "video" if args.prefix_video else "image"
        record["prefix"] = {"kind": kind, "path": os.path.abspath(source), "frames": frames}
    return cond, record


def generate_clips(model, seeds: list[int], cond: dict, sampling, batch_size: int,
                   progress: bool, cuda_graph: bool = False) -> torch.Tensor:
    """Every clip, batch_size at a time -> token grids [N, T, H, W] on the CPU."""
    from tqdm import tqdm

    out, batches = [], range(0, len(seeds), batch_size)
    steps = generation_steps(model, cond)
    with tqdm(total=len(batches) * steps, unit="step", disable=not progress,
              desc=f"sampling {len(seeds)} clips") as bar:
        for lo in batches:
            rows = slice(lo, lo + batch_size)
            part = {k: v[rows] for k, v in cond.items() if v is not None}
            out.append(generate(model, seeds=seeds[rows], sampling=sampling,
                                on_step=lambda *_: bar.update(1), cuda_graph=cuda_graph,
                                **part).cpu())
    return torch.cat(out)


def generation_steps(model, cond: dict) -> int:
    """Forward steps per clip from its conditioning (one per block left to generate; block 0
    of the hybrid start token by token)."""
    context = cond.get("context")
    frames = 0 if context is None else context.shape[1]
    return len(model.layout.generation_windows(model.layout.given_targets(frames)))


def model_summary(model, cfg) -> dict:
    keys = ("family", "size", "layers", "hidden", "heads", "grid", "block_shape", "vocab_size",
            "num_classes", "text_len", "cond_dropout", "start_block", "position")
    fields = dataclasses.asdict(cfg.model)
    return {**{k: fields[k] for k in keys if k in fields},
            "parameters": sum(p.numel() for p in model.parameters()),
            "zero_stage": cfg.parallel.zero_stage, "trained_tensor": cfg.parallel.tensor}


def write_media(out: str, tokens: torch.Tensor, tokenizer, fps: int) -> list[str]:
    """MP4 + GIF per clip and the contact sheet -> the files' names."""
    videos, names = outputs.decode_tokens(tokenizer, tokens), []
    for i, video in enumerate(videos):
        names += [f"sample_{i:03d}.mp4", f"sample_{i:03d}.gif"]
        outputs.write_mp4(os.path.join(out, names[-2]), video, fps=fps)
        outputs.write_gif(os.path.join(out, names[-1]), video, fps=fps)
    outputs.write_contact_sheet(os.path.join(out, "contact_sheet.png"), list(videos))
    return names + ["contact_sheet.png"]


def load(args, dims):
    """(model, run config, checkpoint record, tokenizer or None), every check done."""
    from nbp_mega.generate.load import load_trained_model, resolve_checkpoint
    from nbp_mega.tokenizer.video import load_video_tokenizer

    if os.path.isfile(args.run):  # a state-dict file (tools/convert_to_hf.py --state-dict)
        run_dir, name, path = None, None, os.path.abspath(args.run)
        if args.checkpoint is not None:
            raise UsageError(f"{args.run} is a state-dict file: expected no --checkpoint")
        model, cfg = load_trained_model(path, dims=dims)
    else:
        _, path = resolve_checkpoint(os.path.abspath(args.run), args.checkpoint)
        run_dir, name = os.path.dirname(os.path.dirname(path)), os.path.basename(path)
        model, cfg = load_trained_model(path, dims=dims)
    tokenizer = None
    if args.tokenizer:  # every rank: the same checks everywhere, and the prefix needs it
        tokenizer = load_video_tokenizer(args.tokenizer, device=dims.device)
        outputs.check_tokenizer(tokenizer, cfg.model)
    record = {"run_dir": run_dir, "name": name, "path": path}
    return model, cfg, record, tokenizer


def sample(args, dims) -> dict:
    """Load, generate, and (rank 0) write DIR/tokens.npy, media, DIR/samples.json."""
    start = time.perf_counter()
    model, cfg, checkpoint, tokenizer = load(args, dims)
    sampling = sampling_from(args)
    cond, record = conditioning(args, model, tokenizer)
    seeds, loaded = [args.seed + i for i in range(args.num)], time.perf_counter()
    tokens = generate_clips(model, seeds, cond, sampling, args.batch_size, dims.rank == 0,
                            args.cuda_graph)
    if dims.device.type == "cuda":
        torch.cuda.synchronize()
    generated = time.perf_counter()
    meta = {"checkpoint": checkpoint, "model": model_summary(model, cfg),
            "settings": {k: v for k, v in vars(args).items()}, "sampling": vars(sampling),
            "seeds": seeds, **record, "steps": generation_steps(model, cond),
            "shape": list(tokens.shape), "tensor_parallel": dims.tp, "files": ["tokens.npy"]}
    if dims.rank == 0:
        os.makedirs(args.out, exist_ok=True)
        np.save(os.path.join(args.out, "tokens.npy"), tokens.numpy())
        if tokenizer is not None:
            meta["files"] += write_media(args.out, tokens, tokenizer, args.fps)
            meta["tokenizer"] = {"path": args.tokenizer, "name": tokenizer.name,
                                 "checksum": tokenizer.checksum()}
        meta["timings"] = {"load_s": loaded - start, "generation_s": generated - loaded,
                           "decode_s": time.perf_counter() - generated}
        with open(os.path.join(args.out, "samples.json"), "w") as f:
            json.dump(meta, f, indent=1)
    return meta


def main(argv=None) -> int:
    from nbp_mega.parallel.dims import ParallelConfig, init_parallel, shutdown_parallel

    args = parse_args(argv)
    joined = not torch.distributed.is_initialized()  # in-process callers keep their job
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    dims = init_parallel(ParallelConfig(tensor=world))
    try:
        meta = sample(args, dims)
    except (ValueError, FileNotFoundError) as e:  # bad input: UsageError, ConfigError, ...
        if dims.rank == 0:
            print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        if joined:
            shutdown_parallel()
    if dims.rank == 0:
        print(f"{args.out}: {meta['shape'][0]} clips of {meta['shape'][1:]} tokens in "
              f"{meta['timings']['generation_s']:.2f} s ({meta['steps']} steps each); "
              f"{len(meta['files'])} files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
