"""tools/sample.py on a tiny trained run: its tokens are generate()'s, any sample regenerates
alone, given frames survive, the media files decode back, a prefix video or image goes
through the tokenizer as the tokenizer itself would encode it, and bad input is explained.

One ZeRO-3 run (class-conditional, trained for guidance) and one script run as a subprocess;
the other cases call the script's main() in this process (the job stays the session's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import av
import numpy as np
import pytest
import torch

from nbp_mega.generate import SamplingConfig, generate, outputs
from nbp_mega.generate.load import load_trained_model
from nbp_mega.tokenizer.magvit2 import PRESETS, Magvit2
from nbp_mega.tokenizer.video import load_video_tokenizer, save_video_tokenizer
from tests.conftest import tiny_model_config
from tests.test_bench_tools import load_tool
from tests.test_train import ROOT, overrides, run, shards  # noqa: F401 (shards: a fixture)

pytestmark = pytest.mark.distributed
STEP = "step_00000002"
FRAMES, HEIGHT, WIDTH = 5, 32, 64  # pixels of the 2x4x8 grid through the tokenizer (4, 8, 8)


@pytest.fixture(scope="module")
def run_dir(shards, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("sample") / "run"
    run([sys.executable, "-m", "nbp_mega.train", f"{ROOT}/configs/tiny.yaml",
         *overrides(shards, out, "parallel.zero_stage=3", "train.steps=2",
                    "train.eval_every=0", "model.cond_dropout=0.5")], cwd=out.parent)
    return out


def write_tokenizer(path, levels) -> str:
    """A tiny tokenizer of prod(levels) codes; random weights nudged off the preset's zero
    residual branches (which map every clip to one code)."""
    torch.manual_seed(0)
    model = Magvit2(dataclasses.replace(PRESETS["tiny"], levels=levels, channels=(8, 8, 8, 8)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_video_tokenizer(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok") / "tok32.pt", (4, 4, 2))


@pytest.fixture(scope="module")
def model(run_dir, dims):
    return load_trained_model(str(run_dir), dims=dims)[0]


@pytest.fixture(scope="module")
def tool():
    return load_tool("sample")


@pytest.fixture(scope="module")
def cli_out(run_dir, tokenizer_file):
    """The script as users run it: 3 guided samples, batches of 2, media on."""
    out = run_dir.parent / "cli"
    run([sys.executable, f"{ROOT}/tools/sample.py", str(run_dir), "--out", str(out), "--num",
         "3", "--seed", "5", "--batch-size", "2", "--cfg-scale", "2", "--tokenizer",
         tokenizer_file], cwd=run_dir.parent)
    return out


def sample_in_process(tool, out, *args) -> tuple[np.ndarray, dict]:
    assert tool.main([*args, "--out", str(out)]) == 0
    return np.load(out / "tokens.npy"), json.loads((out / "samples.json").read_text())


def test_cli_tokens_are_generates(cli_out, model):
    tokens = np.load(cli_out / "tokens.npy")
    meta = json.loads((cli_out / "samples.json").read_text())
    expected = generate(model, seeds=[5, 6, 7], labels=torch.tensor([1, 2, 3]),
                        sampling=SamplingConfig(guidance_scale=2.0))
    assert tokens.dtype == np.int64 and np.array_equal(tokens, expected.numpy())
    assert meta["seeds"] == [5, 6, 7] and meta["labels"] == [1, 2, 3]  # (seed + i) mod 4
    assert meta["steps"] == model.layout.blocks.num_blocks == 8
    assert meta["checkpoint"]["name"] == STEP and meta["sampling"]["guidance_scale"] == 2.0
    assert set(meta["timings"]) == {"load_s", "generation_s", "decode_s"}
    assert meta["model"]["vocab_size"] == 32 and meta["model"]["zero_stage"] == 3


def test_a_sample_regenerates_alone(cli_out, run_dir, tool, tmp_path):
    """Sample 2 of the batch (seed 7) from a checkpoint folder given directly."""
    checkpoint = run_dir / "checkpoints" / STEP
    alone, meta = sample_in_process(tool, tmp_path, str(checkpoint), "--num", "1", "--seed",
                                    "7", "--cfg-scale", "2")
    assert np.array_equal(alone[0], np.load(cli_out / "tokens.npy")[2])
    assert meta["labels"] == [3] and meta["checkpoint"]["run_dir"] == str(run_dir)


def decoded_frames(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_media_files_decode_back(cli_out, tokenizer_file):
    tokens = torch.from_numpy(np.load(cli_out / "tokens.npy"))
    videos = outputs.decode_tokens(load_video_tokenizer(tokenizer_file), tokens)
    assert videos.shape == (3, 3, FRAMES, HEIGHT, WIDTH) and 0 <= videos.min() <= videos.max() <= 1
    for i in range(3):
        for ext in ("mp4", "gif"):
            frames = decoded_frames(cli_out / f"sample_{i:03d}.{ext}")
            assert len(frames) == FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3), ext
    (sheet,) = decoded_frames(cli_out / "contact_sheet.png")
    assert sheet.shape == (3 * (HEIGHT + 2) - 2, FRAMES * (WIDTH + 2) - 2, 3)
    last = outputs.to_uint8_frames(videos[2])[-1]  # row 2, column 4 (PNG is lossless)
    assert np.array_equal(sheet[2 * (HEIGHT + 2):, 4 * (WIDTH + 2):], last)


def test_given_frames_appear_unchanged(run_dir, model, tool, tmp_path):
    given = torch.randint(0, 32, (1, 2, 4, 8), generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "prefix.npy", given.numpy())
    tokens, meta = sample_in_process(tool, tmp_path, str(run_dir),
                                     "--num", "2", "--prefix-tokens",
                                     str(tmp_path / "prefix.npy"), "--prefix-frames", "1")
    assert np.array_equal(tokens[:, :1], given[:, :1].expand(2, -1, -1, -1).numpy())
    expected = generate(model, seeds=[0, 1], labels=torch.tensor([0, 1]),
                        context=given[:, :1].expand(2, -1, -1, -1))
    assert np.array_equal(tokens, expected.numpy())
    assert meta["steps"] == 4 and meta["prefix"]["frames"] == 1  # 8 blocks, 4 given


def random_clip(frames: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (frames, HEIGHT, WIDTH, 3), np.uint8)


def write_lossless(path, frames: np.ndarray) -> None:
    """FFV1 (lossless RGB) at twice the size: pixel 2x2 blocks, which the area filter brings
    back exactly to `frames`."""
    big = frames.repeat(2, axis=1).repeat(2, axis=2)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=8)
        stream.height, stream.width, stream.pix_fmt = *big.shape[1:3], "bgr0"
        for rgb in big:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())


@pytest.mark.parametrize("kind", ["video", "image"])
def test_prefix_pixels_are_tokenized_on_the_fly(run_dir, tool, tokenizer_file, tmp_path, kind):
    clip = random_clip(FRAMES)
    if kind == "video":
        write_lossless(tmp_path / "clip.mkv", clip)
        flag = ["--prefix-video", str(tmp_path / "clip.mkv")]
    else:
        outputs.write_png(tmp_path / "first.png", clip[0].repeat(2, 0).repeat(2, 1))
        flag = ["--image", str(tmp_path / "first.png")]
    tokens, meta = sample_in_process(tool, tmp_path, str(run_dir), "--num", "2", *flag,
                                     "--tokenizer", tokenizer_file)
    # the causal tokenizer: latent frame 0 is frame 0 alone, whatever follows it
    encoded = load_video_tokenizer(tokenizer_file).encode(torch.from_numpy(clip)[None])
    assert len(np.unique(encoded[:, 0])) > 1  # not a tokenizer that maps all to one code
    assert np.array_equal(tokens[:, :1], encoded[:, :1].expand(2, -1, -1, -1).numpy())
    assert meta["prefix"]["kind"] == kind and meta["steps"] == 4


def bad_inputs(tmp_path, tokenizer_file) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, what the error must say)."""
    prefix = {"shape": np.zeros((1, 2, 4, 7), np.int64), "vocab": np.full((1, 2, 4, 8), 32)}
    for name, array in prefix.items():
        np.save(tmp_path / f"{name}.npy", array)
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 64)
    (tmp_path / "junk.png").write_bytes(b"not an image at all" * 64)
    tok64 = write_tokenizer(tmp_path / "tok64.pt", (4, 4, 4))
    tok = ["--tokenizer", tokenizer_file]
    return {
        "label": (["--labels", "4"], "--labels 4: expected 1 or 3 class ids in [0, 4)"),
        "shape": (["--prefix-tokens", f"{tmp_path}/shape.npy"], "expected [3 or 1, >= 1, 4, 8]"),
        "vocab": (["--prefix-tokens", f"{tmp_path}/vocab.npy"],
                  "ids in [32, 32], expected the video vocabulary [0, 32)"),
        "frames": (["--prefix-tokens", f"{tmp_path}/vocab.npy", "--prefix-frames", "2"],
                   "--prefix-frames 2: expected a positive multiple of the block's 1 latent "
                   "frames, fewer than the grid's 2"),
        "codebook": (["--tokenizer", tok64], "codebook of 64 codes, the model's video "
                     "vocabulary is model.vocab_size=32"),
        "no_tokenizer": (["--prefix-video", f"{tmp_path}/junk.mp4"], "needs --tokenizer"),
        "video": (["--prefix-video", f"{tmp_path}/junk.mp4", *tok],
                  "junk.mp4: not a readable video container"),
        "image": (["--image", f"{tmp_path}/junk.png", *tok], "junk.png: not a readable video"),
        "missing": (["--image", f"{tmp_path}/none.png", *tok], "none.png: file not found"),
        "cuda_graph": (["--cuda-graph"], "parameters are on cpu; move the model to a CUDA"),
    }


def test_bad_input_is_explained(run_dir, tool, tokenizer_file, tmp_path, capsys):
    for name, (args, message) in bad_inputs(tmp_path, tokenizer_file).items():
        code = tool.main([str(run_dir), "--out", str(tmp_path / name), "--num", "3", *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (name, err[-2000:])
        assert not (tmp_path / name).exists(), name  # nothing written


def test_labels_for_an_unconditional_model_are_refused(tool):
    args = argparse.Namespace(labels=[1], num=2, seed=0)
    with pytest.raises(tool.UsageError, match="not class-conditional .model.num_classes=0."):
        tool.labels_for(args, tiny_model_config(num_classes=0))
    assert tool.labels_for(argparse.Namespace(labels=None, num=3, seed=5),
                           tiny_model_config(num_classes=4)).tolist() == [1, 2, 3]
