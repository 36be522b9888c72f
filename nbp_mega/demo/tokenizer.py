"""The demo's video tokenizer: `tiny-s4` with a 1,000-code FSQ (levels 8,5,5,5), shipped.

Why not the preset's 64,000 codes: the generator's embedding and output head have one row per
code, so on 2 CPU cores a 4-layer d=128 model spends most of a step on a 64,000-way softmax
(6 s per micro batch of 8 clips of 3x8x8 tokens, against 0.45 s with 1,024 rows; measured on
the shared development machine). The squares of the demo use a few hundred codes either way.

Why shipped: training it took 26 minutes on the 2 shared cores (1200 steps at a median 0.95
s/step with 1 thread while others' tests ran; about half that on quiet cores), more than the
whole demo's budget. The file (3.3 MB) is remade by

    python tools/demo.py tokenizer          # -> configs/tokenizer/demo_tiny_s4_k1000.pt

which writes its training videos (write_tokenizer_videos: random squares plus demo-class
clips, seeds apart from the demo's own) and runs nbp_mega's tokenizer trainer
(nbp_mega.tokenizer.train, configs/tokenizer/tiny_s4.yaml + TRAIN_OVERRIDES, FSQ_LEVELS)
with `fsq_levels`: the trainer's config has no option for the levels yet. The shipped file:
29.3 dB PSNR on its last training batch, 27.2 dB on 16 fresh demo clips (9x32x32), 220 codes
used. `load_demo_tokenizer` refuses a file whose sha256 is not TOKENIZER_SHA256.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from unittest import mock

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER_PATH = os.path.join(REPO, "configs", "tokenizer", "demo_tiny_s4_k1000.pt")
TOKENIZER_SHA256 = "5b65309938c2b52780066a8065df4cca5287e385084ddea21135f1e7ef2dd5f3"
FSQ_LEVELS = (8, 5, 5, 5)  # 1,000 codes
BASE_CONFIG = os.path.join(REPO, "configs", "tokenizer", "tiny_s4.yaml")
# Over BASE_CONFIG: clips of the demo's 9 frames, 2 per 20-frame random video (trained on the
# config's 5-frame clips, the third latent frame of a 9-frame clip decoded to coloured noise).
TRAIN_STEPS = 1200
TRAIN_OVERRIDES = ("data.frames=9", "data.clips_per_video=2", "train.save_every=300")


class TokenizerChecksumError(ValueError):
    """The shipped tokenizer file is missing or is not the recorded one."""


def load_demo_tokenizer(path: str = TOKENIZER_PATH, sha256: str = TOKENIZER_SHA256, **kwargs):
    """load_video_tokenizer(path) after checking the file's sha256 against the recorded one."""
    from nbp_mega.tokenizer.video import load_video_tokenizer

    if not os.path.isfile(path):
        raise TokenizerChecksumError(f"demo tokenizer {path} is missing: remake it with "
                                     "`python tools/demo.py tokenizer`")
    tok = load_video_tokenizer(path, **kwargs)
    if sha256 and tok.checksum() != sha256:
        raise TokenizerChecksumError(f"{path}: sha256 {tok.checksum()}, expected {sha256} (the "
                                     "file shipped with the demo); remake it with `python "
                                     "tools/demo.py tokenizer` and record the new sum")
    return tok


@contextmanager
def fsq_levels(levels: tuple[int, ...]):
    """Make nbp_mega's tokenizer trainer build its preset with these FSQ levels.

    The trainer's config has no `model.levels` option yet; this swaps its model_config for
    one that replaces the levels, for the duration of the block only."""
    from nbp_mega.tokenizer import train

    original = train.model_config

    def with_levels(section):
        return dataclasses.replace(original(section), levels=tuple(levels))

    with mock.patch.object(train, "model_config", with_levels):
        yield


def train_demo_tokenizer(videos: str, run_dir: str, overrides: list[str] = (),
                         levels: tuple[int, ...] = FSQ_LEVELS) -> str:
    """Train configs/tokenizer/tiny_s4.yaml on `videos` with `levels`; -> tokenizer.pt path."""
    from nbp_mega.tokenizer.train import load_run_config, run

    cfg = load_run_config(BASE_CONFIG, [f"data.videos={videos}", f"run_dir={run_dir}",
                                        *overrides])
    with fsq_levels(levels):
        run(cfg)
    return os.path.join(run_dir, "tokenizer.pt")


def write_tokenizer_videos(root: str) -> None:
    """The shipped tokenizer's training videos: 128 of 1-2 random squares (20 frames) and 32
    per demo class (9 frames), seeds apart from the demo's own clips."""
    from nbp_mega.demo.videos import write_class_videos, write_random_videos

    write_random_videos(os.path.join(root, "random"), count=128, frames=20, size=32, seed=100)
    write_class_videos(os.path.join(root, "classes"), {"tok": 32}, frames=9, size=32, seed=100)


def remake_demo_tokenizer(videos: str, run_dir: str, steps: int = TRAIN_STEPS,
                          dest: str = TOKENIZER_PATH) -> tuple[str, str]:
    """Write the videos, train, copy tokenizer.pt to `dest` -> (dest, its sha256). Floating
    point sums differ with the machine and thread count, so expect another sha256 than the
    recorded one: record the new one."""
    import hashlib
    import shutil

    for folder in (videos, run_dir):  # a run directory left over would be resumed
        shutil.rmtree(folder, ignore_errors=True)
    write_tokenizer_videos(videos)
    path = train_demo_tokenizer(videos, run_dir, [f"train.steps={steps}", *TRAIN_OVERRIDES])
    shutil.copyfile(path, dest)
    with open(dest, "rb") as f:
        return dest, hashlib.sha256(f.read()).hexdigest()
