"""Synthetic token videos with learnable structure, for the demo and tests.

    python -m nbp_mega.data.synthetic OUT_DIR [--num-train 2048] [--num-val 256]
        [--grid 5 16 16] [--vocab 64] [--classes 4] [--shard-size 256] [--seed 0]
        [--noise 0.02] [--text]

Legend: T, H, W latent grid; V vocabulary size; C classes.

A clip is a token grid [T, H, W] built like a tiny cartoon:
  - background: a smooth pattern in (h, w), the same in every frame, quantised to 3 token
    ids drawn per clip from the background half of the vocabulary, ids [0, V // 2);
  - 1-3 objects: k x k squares, each with its own id from the object half, ids [V // 2, V),
    moving by a constant step per frame (wrapping at the borders); the step is given by the
    class label (class 0 right, 1 down, 2 left, 3 up, then diagonals, then longer steps;
    with --classes 0 the clips are unlabelled (-1) and the direction is random);
  - noise: each token replaced by a uniformly random id with probability --noise.
So frame t+1 is mostly frame t with the objects shifted by the label's step: a model can learn
far more than the unigram statistics, whose entropy the manifest records to compare with.

With --text each sample also gets <key>.text.npy, int32 text ids of its class name as if a
tokenizer had one piece per character: ids 0..3 are special (unk, bos 1, eos 2, pad, as in
the models nbp_mega.tokenizer.text trains), a character c of TEXT_ALPHABET is 4 + its index.
So a text-conditional model learns the class from the text, and the lengths vary with the
class ("up" 2 ids, "right" 5, "down-right" 10): with a small model.text_len both texts that
fit and texts that are truncated occur. Train on them with model.text_len > 0,
model.text_vocab = TEXT_VOCAB (43), text_bos_id 1, text_eos_id 2 (the manifest says so too).
The JSON then also holds "text" (the class name).

Output (in the format of nbp_mega/data/shards.py):
    OUT_DIR/train/shard-000000.tar ...   --shard-size samples each
    OUT_DIR/val/shard-000000.tar ...
    OUT_DIR/manifest.json                 vocab_size, grid, num_classes, counts, dtype, seed,
                                          unigram_entropy_nats, id ranges, class steps,
                                          text (null, or its vocab, bos/eos ids, alphabet)
Existing shard-*.tar files in OUT_DIR/train and OUT_DIR/val are replaced. The output is
deterministic: the same arguments give byte-identical tar files (member mtimes are fixed to 0,
owner and mode are constant); each clip depends only on (seed, split, clip number).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import math
import os

import numpy as np
import webdataset as wds

BG_LEVELS = 3  # background token ids per clip
MAX_OBJECTS = 3  # objects per clip: 1..MAX_OBJECTS, each with its own id
_SPLITS = {"train": 0, "val": 1}  # split number in the per-clip seed
_DIRECTION_NAMES = {(0, 1): "right", (1, 0): "down", (0, -1): "left", (-1, 0): "up",
                    (1, 1): "down-right", (1, -1): "down-left", (-1, -1): "up-left",
                    (-1, 1): "up-right"}
# --text: one id per character of a class name (names are directions or "step dy,dx").
TEXT_ALPHABET = " abcdefghijklmnopqrstuvwxyz0123456789,-"
TEXT_FIRST_ID = 4  # ids 0..3: unk, bos, eos, pad
TEXT_VOCAB = TEXT_FIRST_ID + len(TEXT_ALPHABET)
TEXT_BOS_ID, TEXT_EOS_ID = 1, 2


def class_steps(num: int) -> list[tuple[int, int]]:
    """The (dy, dx) step per frame of classes 0..num-1: nearest first, axes before diagonals."""
    steps: list[tuple[int, int]] = []
    radius = 0
    while len(steps) < num:
        radius += 1
        ring = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
                if max(abs(dy), abs(dx)) == radius]
        ring.sort(key=lambda s: (s[0] != 0 and s[1] != 0, math.atan2(s[0], s[1]) % (2 * math.pi)))
        steps += ring
    return steps[:num]


def class_name(step: tuple[int, int]) -> str:
    """The label_name of the class moving by `step`: a direction, or "step dy,dx"."""
    return _DIRECTION_NAMES.get(step, f"step {step[0]},{step[1]}")


def class_text_ids(name: str) -> np.ndarray:
    """int32 [len(name)]: the synthetic text ids of a class name, one per character."""
    bad = sorted(set(name) - set(TEXT_ALPHABET))
    if bad:
        raise ValueError(f"class name {name!r} has characters {bad} outside the synthetic text "
                         f"alphabet {TEXT_ALPHABET!r}")
    return np.asarray([TEXT_FIRST_ID + TEXT_ALPHABET.index(c) for c in name], dtype=np.int32)


def token_dtype(vocab: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids 0..vocab-1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"vocab={vocab} does not fit in uint32 token ids")


# -- one clip ------------------------------------------------------------------------------
def _background(rng: np.random.Generator, height: int, width: int, num_ids: int) -> np.ndarray:
    """[H, W] ids: a sum of two random waves quantised to BG_LEVELS ids of [0, num_ids)."""
    freq = rng.uniform(0.5, 1.5, size=2)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    wave_h = np.sin(2 * np.pi * freq[0] * np.arange(height) / height + phase[0])  # [H]
    wave_w = np.sin(2 * np.pi * freq[1] * np.arange(width) / width + phase[1])  # [W]
    levels = np.digitize(wave_h[:, None] + wave_w[None, :], [-0.7, 0.7])  # [H, W] in 0..2
    palette = rng.choice(num_ids, size=BG_LEVELS, replace=False)
    return palette[levels]


def make_clip(rng: np.random.Generator, *, grid: tuple[int, int, int], vocab: int,
              step: tuple[int, int], noise: float) -> np.ndarray:
    """[T, H, W] int64 token ids of one clip whose objects move by `step` per frame."""
    frames, height, width = grid
    num_bg = vocab // 2
    video = np.repeat(_background(rng, height, width, num_bg)[None], frames, axis=0)
    num_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    object_ids = num_bg + rng.choice(vocab - num_bg, size=num_objects, replace=False)
    max_size = max(1, min(height, width) // 4)
    for object_id in object_ids:
        size = int(rng.integers(1, max_size + 1))
        y0, x0 = int(rng.integers(height)), int(rng.integers(width))
        for t in range(frames):
            rows = (y0 + t * step[0] + np.arange(size)) % height
            cols = (x0 + t * step[1] + np.arange(size)) % width
            video[t][np.ix_(rows, cols)] = object_id
    noisy = rng.random(video.shape) < noise
    video[noisy] = rng.integers(0, vocab, size=int(noisy.sum()))
    return video


def _sample(split: str, i: int, *, seed: int, grid, vocab: int, classes: int,
            noise: float) -> tuple[np.ndarray, dict]:
    """(tokens [T, H, W], meta) of clip i of a split: depends only on these arguments."""
    rng = np.random.default_rng([seed, _SPLITS[split], i])
    if classes:
        label = int(rng.integers(classes))
        step = class_steps(classes)[label]
    else:  # unlabelled: a random one of the four axis directions
        label = -1
        step = class_steps(4)[int(rng.integers(4))]
    tokens = make_clip(rng, grid=grid, vocab=vocab, step=step, noise=noise)
    meta = {"label": label, "source": f"synthetic seed={seed} {split} clip {i}"}
    if classes:
        meta["label_name"] = class_name(step)
    return tokens, meta


# -- writing -------------------------------------------------------------------------------
def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _encode(tokens: np.ndarray, meta: dict, dtype: np.dtype, text: bool) -> dict:
    """The sample's members (without __key__); with `text` also its class name's ids."""
    members = {"tokens.npy": _npy(tokens.astype(dtype))}
    if text:
        meta = {**meta, "text": meta["label_name"]}
        members["text.npy"] = _npy(class_text_ids(meta["label_name"]))
    members["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return members


def _write_split(out_dir: str, split: str, count: int, *, shard_size: int, dtype: np.dtype,
                 counts: np.ndarray | None, text: bool, **clip_args) -> int:
    """Write `count` clips as shards in out_dir/split; add their token counts to `counts`."""
    split_dir = os.path.join(out_dir, split)
    os.makedirs(split_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(split_dir, "shard-*.tar")):
        os.remove(stale)  # a smaller rerun must not leave old shards in the directory
    if count == 0:
        return 0
    pattern = os.path.join(split_dir, "shard-%06d.tar")
    writer = wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, encoder=False, mtime=0)
    try:
        for i in range(count):
            tokens, meta = _sample(split, i, **clip_args)
            if counts is not None:
                counts += np.bincount(tokens.ravel(), minlength=len(counts))
            writer.write({"__key__": f"clip{i:08d}", **_encode(tokens, meta, dtype, text)})
    finally:
        writer.close()
    return -(-count // shard_size)


def _entropy_nats(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _check_args(*, num_train, num_val, grid, vocab, classes, shard_size, noise, text) -> None:
    if num_train < 1 or num_val < 0:
        raise ValueError(f"num_train={num_train}, num_val={num_val}: expected num_train >= 1 "
                         f"and num_val >= 0")
    if len(grid) != 3 or any(int(g) < 1 for g in grid):
        raise ValueError(f"grid={list(grid)}: expected three positive sizes T H W")
    need = 2 * max(BG_LEVELS, MAX_OBJECTS)
    if vocab < need:
        raise ValueError(f"vocab={vocab} is too small: synthetic clips take {BG_LEVELS} "
                         f"background ids from [0, vocab // 2) and up to {MAX_OBJECTS} object "
                         f"ids from [vocab // 2, vocab), so vocab must be >= {need}")
    if classes < 0 or shard_size < 1 or not 0.0 <= noise <= 1.0:
        raise ValueError(f"classes={classes}, shard_size={shard_size}, noise={noise}: expected "
                         f"classes >= 0, shard_size >= 1, 0 <= noise <= 1")
    if text and not classes:
        raise ValueError("text=True needs classes >= 1: the synthetic text is the class name, "
                         "and unlabelled clips (classes=0) have none")


def write_synthetic_shards(out_dir: str, *, num_train: int = 2048, num_val: int = 256,
                           grid: tuple[int, int, int] = (5, 16, 16), vocab: int = 64,
                           classes: int = 4, shard_size: int = 256, seed: int = 0,
                           noise: float = 0.02, text: bool = False) -> dict:
    """Write train/ and val/ shards and manifest.json under out_dir; returns the manifest.

    `text`: also write <key>.text.npy, the class name's synthetic text ids (module docstring).
    """
    _check_args(num_train=num_train, num_val=num_val, grid=grid, vocab=vocab, classes=classes,
                shard_size=shard_size, noise=noise, text=text)
    grid = tuple(int(g) for g in grid)
    dtype = token_dtype(vocab)
    clip_args = dict(seed=seed, grid=grid, vocab=vocab, classes=classes, noise=noise)
    counts = np.zeros(vocab, dtype=np.int64)  # [V] token frequencies of the training split
    num_shards = {
        "train": _write_split(out_dir, "train", num_train, shard_size=shard_size, dtype=dtype,
                              counts=counts, text=text, **clip_args),
        "val": _write_split(out_dir, "val", num_val, shard_size=shard_size, dtype=dtype,
                            counts=None, text=text, **clip_args),
    }
    names = [class_name(step) for step in class_steps(classes)]
    manifest = {
        "format": "nbp_mega token shards: <key>.tokens.npy [T, H, W] + <key>.json"
                  + (" + <key>.text.npy [n]" if text else ""),
        "vocab_size": vocab, "grid": list(grid), "num_classes": classes,
        "counts": {"train": num_train, "val": num_val}, "num_shards": num_shards,
        "shard_size": shard_size, "dtype": dtype.name, "seed": seed, "noise": noise,
        "unigram_entropy_nats": _entropy_nats(counts),
        "background_ids": [0, vocab // 2], "object_ids": [vocab // 2, vocab],
        "class_steps": [list(s) for s in class_steps(classes)],
        "text": {"vocab": TEXT_VOCAB, "bos_id": TEXT_BOS_ID, "eos_id": TEXT_EOS_ID,
                 "first_id": TEXT_FIRST_ID, "alphabet": TEXT_ALPHABET,
                 "lengths": [len(n) for n in names]} if text else None,
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nbp_mega.data.synthetic",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="output directory (train/, val/, manifest.json)")
    parser.add_argument("--num-train", type=int, default=2048, help="training clips")
    parser.add_argument("--num-val", type=int, default=256, help="validation clips")
    parser.add_argument("--grid", type=int, nargs=3, default=[5, 16, 16], metavar=("T", "H", "W"),
                        help="latent token grid of a clip")
    parser.add_argument("--vocab", type=int, default=64, help="token vocabulary size")
    parser.add_argument("--classes", type=int, default=4, help="classes (0 = unlabelled)")
    parser.add_argument("--shard-size", type=int, default=256, help="clips per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of all clips")
    parser.add_argument("--noise", type=float, default=0.02, help="fraction of random tokens")
    parser.add_argument("--text", action="store_true",
                        help=f"also write <key>.text.npy: one id per character of the class "
                             f"name (text vocab {TEXT_VOCAB}, bos {TEXT_BOS_ID}, eos "
                             f"{TEXT_EOS_ID}), for text-conditional models")
    args = parser.parse_args(argv)
    try:
        manifest = write_synthetic_shards(
            args.out_dir, num_train=args.num_train, num_val=args.num_val, grid=tuple(args.grid),
            vocab=args.vocab, classes=args.classes, shard_size=args.shard_size, seed=args.seed,
            noise=args.noise, text=args.text)
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {manifest['counts']} clips of grid {manifest['grid']} to {args.out_dir}; "
          f"unigram entropy {manifest['unigram_entropy_nats']:.3f} nats "
          f"(log vocab = {math.log(args.vocab):.3f})")


if __name__ == "__main__":
    main()
