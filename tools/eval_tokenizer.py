"""Reconstruction quality of a video tokenizer on a folder of videos.

    python tools/eval_tokenizer.py --tokenizer magvit2_ucf.pt --videos DIR [--frames 17]

Prints JSON: clips, PSNR (dB, peak 1), SSIM, fraction of the codebook used and perplexity.
Files that cannot be decoded or are shorter than a clip are skipped and listed.
"""

from __future__ import annotations

import argparse
import json
import sys

from nbp_mega.data.video import VideoError, list_videos, read_clips
from nbp_mega.tokenizer import load_video_tokenizer
from nbp_mega.tokenizer.metrics import evaluate_tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--tokenizer", required=True, help="weights file or preset name")
    p.add_argument("--videos", required=True, help="folder of video files (searched recursively)")
    p.add_argument("--frames", type=int, default=17, help="frames per clip (1 + 4n)")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--fps", type=float, default=None, help="resample to this rate first")
    p.add_argument("--clips-per-video", type=int, default=1)
    p.add_argument("--max-videos", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    tok = load_video_tokenizer(args.tokenizer, device=args.device)
    tok.latent_shape(args.frames, args.resolution, args.resolution)  # fail before decoding
    skipped = []

    def clips():
        for path in list_videos(args.videos)[: args.max_videos]:
            try:
                yield read_clips(path, frames=args.frames, resolution=args.resolution,
                                 fps=args.fps, max_clips=args.clips_per_video)
            except VideoError as e:
                skipped.append(str(e))

    result = evaluate_tokenizer(tok, clips())
    print(json.dumps({"tokenizer": tok.name, **result, "skipped": skipped}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
