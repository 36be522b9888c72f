"""Turn video files into webdataset token shards for training (resumable, parallel).

    python tools/preprocess_video_shards.py --input DIR_OR_LIST --output DIR \\
        --tokenizer PATH_OR_PRESET [--fps F --frames 17 --resolution 128 --workers 2 ...]

Inputs: a folder tree (UCF-101: one sub-folder per class), a .csv/.tsv table (path, label,
caption, start, end, split; or Kinetics' youtube_id/time_start/time_end) or a list of paths.
Output: DIR/<split>/shard-CCCCCC-PPP.tar (+ DIR/raw/<split>/ with --raw), DIR/plan.json,
DIR/manifest.json. Re-running the same command resumes; finished shards are kept.

Exit codes: 0 clean; 1 unusable arguments/output; 2 some inputs skipped or partly read (see
manifest "skipped"); 3 some chunks failed (rerun to retry).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from nbp_mega.data.preprocess import EXIT_FATAL, PreprocessConfig, PreprocessError, run_preprocess
from nbp_mega.data.video import ClipSpec


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--input", required=True, help="folder tree, .csv/.tsv, or list of paths")
    io.add_argument("--output", required=True, help="output folder (new, or one to resume)")
    io.add_argument("--tokenizer", help="video tokenizer file or preset (e.g. tiny)")
    io.add_argument("--raw", action="store_true", help="also write raw uint8 frame shards")
    io.add_argument("--text-tokenizer", help="sentencepiece .model: store <key>.text.npy")
    io.add_argument("--root", help="folder relative paths of a list/table start from "
                                   "(default: the list's folder)")
    io.add_argument("--split", default="train", help="split of inputs that name none")
    io.add_argument("--layout", default="auto",
                    choices=["auto", "classes", "split-classes", "flat"],
                    help="folder tree layout (classes: first sub-folder is the class)")
    io.add_argument("--label-map", help="fixed class ids: a manifest.json, JSON {name: id}, "
                                        "or one class name per line")
    clips = p.add_argument_group("clips")
    clips.add_argument("--fps", type=float, default=0, help="output frame rate, resampled by "
                       "timestamps (0 = the source's frames)")
    clips.add_argument("--frames", type=int, default=17, help="frames per clip (1 + 4n)")
    clips.add_argument("--resolution", type=int, default=128,
                       help="shorter side resized to this, then centre crop (multiple of 8)")
    clips.add_argument("--sampling", default="stride", choices=["stride", "random"])
    clips.add_argument("--stride", type=int, default=0,
                       help="frames between clip starts (0 = --frames: no overlap)")
    clips.add_argument("--clips-per-video", type=int, default=0,
                       help="at most this many clips per video (0 = all; random: required)")
    clips.add_argument("--seed", type=int, default=0, help="seed of random windows")
    run = p.add_argument_group("sharding and workers")
    run.add_argument("--videos-per-chunk", type=int, default=64,
                     help="inputs per chunk: the unit of work and of resuming")
    run.add_argument("--max-shard-mb", type=float, default=1024, help="shard size cap (MB)")
    run.add_argument("--max-shard-clips", type=int, default=100_000, help="clips per shard cap")
    run.add_argument("--shuffle-seed", type=int, default=0,
                     help="inputs of a split are shuffled with this seed before chunking")
    run.add_argument("--no-shuffle", action="store_true", help="keep the listing order")
    run.add_argument("--batch-size", type=int, default=8, help="clips per tokenizer call")
    run.add_argument("--workers", type=int, default=2, help="processes (0 = in this one)")
    run.add_argument("--threads", type=int, default=0,
                     help="torch threads per worker (0 = cores / workers)")
    run.add_argument("--device", default="cpu", help="tokenizer device (cpu, cuda, cuda:1)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def config_from_args(args) -> PreprocessConfig:
    spec = ClipSpec(frames=args.frames, resolution=args.resolution, fps=args.fps or None,
                    stride=args.stride or None, clips_per_video=args.clips_per_video,
                    sampling=args.sampling, seed=args.seed)
    return PreprocessConfig(
        input=args.input, output=args.output, tokenizer=args.tokenizer, raw=args.raw,
        text_tokenizer=args.text_tokenizer, clips=spec, root=args.root, split=args.split,
        layout=args.layout, label_map=args.label_map,
        shuffle_seed=None if args.no_shuffle else args.shuffle_seed,
        videos_per_chunk=args.videos_per_chunk,
        max_shard_bytes=int(args.max_shard_mb * 2**20), max_shard_clips=args.max_shard_clips,
        batch_size=args.batch_size, workers=args.workers, threads=args.threads,
        device=args.device)


def report(manifest: dict, output: str) -> None:
    for split, c in sorted(manifest["counts"].items()):
        print(f"{split}: {c['clips']} clips from {c['videos_with_clips']}/{c['videos']} videos "
              f"in {c['shards']} shards" + (f" (+{c['raw_shards']} raw)" if c["raw_shards"]
                                            else ""), file=sys.stderr)
    run = manifest["run"]
    print(f"this run: {run['clips_now']} clips in {run['seconds']:.1f} s "
          f"({run['clips_per_s']:.2f} clips/s); {run['chunks_resumed']} chunks already done",
          file=sys.stderr)
    for item in manifest["skipped"][:20]:
        print(f"skipped: {item['reason']}", file=sys.stderr)
    if len(manifest["skipped"]) > 20:
        print(f"... {len(manifest['skipped']) - 20} more", file=sys.stderr)
    for name, why in manifest["failed_chunks"].items():
        print(f"FAILED chunk {name}: {why}", file=sys.stderr)
    hint = training_overrides(manifest, output)
    if hint:
        print(f"train on it with: python -m nbp_mega.train CONFIG {hint}", file=sys.stderr)
    print(json.dumps({"manifest": os.path.join(output, "manifest.json"),
                      "skipped": len(manifest["skipped"]),
                      "failed_chunks": len(manifest["failed_chunks"])}))


def training_overrides(manifest: dict, output: str) -> str:
    """The nbp_mega.train overrides that fit these token shards ('' without token shards)."""
    tok = manifest["options"].get("tokenizer")
    splits = manifest["shards"].get("tokens", {})
    if not tok or "train" not in splits:
        return ""
    grid = ",".join(str(g) for g in tok["grid"])
    parts = [f"data.shards={os.path.join(output, 'train')}", f"model.grid=[{grid}]",
             f"model.vocab_size={tok['codebook_size']}",
             f"model.num_classes={len(manifest['label_map'])}"]
    val = next((s for s in ("val", "validation", "test") if s in splits), None)
    if val:
        parts.append(f"data.val_shards={os.path.join(output, val)}")
    return " ".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        manifest, code = run_preprocess(config_from_args(args), progress=not args.quiet)
    except PreprocessError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130
    report(manifest, args.output)
    return code


if __name__ == "__main__":
    sys.exit(main())
