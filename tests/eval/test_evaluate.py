"""tools/evaluate.py end to end on tiny real parts: a class-conditional model (state-dict file),
a tokenizer, real video files, validation shards and the I3D stand-in. The command as users run
it, an interrupted evaluation resumed to the same numbers, frame-prediction contexts, bad input,
and --watch over a training run's checkpoints with TensorBoard scalars."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from nbp_mega.checksums import sha256_file, sha256_tensors
from nbp_mega.data.synthetic import write_synthetic_shards
from nbp_mega.eval.frechet import stats_distance
from nbp_mega.eval.fvd import load_stats
from nbp_mega.eval.sources import GeneratedClips, RealClips
from nbp_mega.export import write_state_dict
from nbp_mega.export.weights import Weights
from nbp_mega.generate import SamplingConfig
from nbp_mega.model import NBPTransformer
from nbp_mega.parallel.layers import TensorParallel
from nbp_mega.tokenizer import load_video_tokenizer
from tests.data.videos import write_video
from tests.eval.detector_standin import write_standin
from tests.generate.test_sample_cli import write_tokenizer
from tests.test_bench_tools import load_tool
from tests.test_train import JOB_VARS, ROOT, run
from tests.test_train_cli import TINY

FRAMES = 4  # of the 5 a 2-frame latent grid decodes to (tokenizer time downsample 4)


@pytest.fixture(scope="module")
def parts(tmp_path_factory, dims):
    """Every file an evaluation reads, and its config (YAML, as a user writes one)."""
    from nbp_mega.config import load_config

    tmp = tmp_path_factory.mktemp("evaluate")
    (tmp / "videos").mkdir()
    for i in range(5):  # 9..21 frames at 8 fps, 48 x 40: read as 32 x 32 clips of 5 frames
        write_video(str(tmp / "videos" / f"v{i}.mkv"), frames=9 + 3 * i, rate=8, width=48,
                    height=40)
    write_synthetic_shards(str(tmp / "shards"), num_train=8, num_val=8, grid=(2, 4, 4),
                           vocab=32, classes=4, shard_size=8)
    cfg = load_config(TINY, ["model.grid=[2,4,4]", "model.block_shape=[1,1,4]",
                             "model.vocab_size=32", "model.num_classes=4",
                             "model.layers=2", "model.hidden=32", "model.heads=4"])
    torch.manual_seed(0)
    model = NBPTransformer(cfg.model, TensorParallel(dims, init_std=cfg.model.init_std))
    write_state_dict(cfg, Weights.of_model(model), str(tmp / "model.pt"))
    write_tokenizer(tmp / "tok32.pt", (4, 4, 2))
    write_standin(tmp / "i3d_torchscript.pt", frames=FRAMES)
    config = {"run": str(tmp / "model.pt"), "tokenizer": str(tmp / "tok32.pt"),
              "videos": str(tmp / "videos"), "out": str(tmp / "out"),
              "fvd": {"detector": str(tmp / "i3d_torchscript.pt"), "frames": FRAMES,
                      "resolution": 32, "samples": 6, "folds": 2, "reference_clips": 7,
                      "batch_size": 2, "save_every": 1},
              "per_block": {"val_shards": str(tmp / "shards" / "val"), "batch_size": 4,
                            "max_batches": 2},
              "temporal": {"clips": 3}, "tokenizer_eval": {"clips": 3},
              "sampling": {"top_k": 0, "top_p": 1.0}}
    (tmp / "eval.yaml").write_text(yaml.safe_dump(config))
    return tmp


@contextlib.contextmanager
def one_thread():
    """As each rank of a job runs (OMP_NUM_THREADS=1): fp32 sums in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single(parts, dims) -> dict:
    """Every metric in this process (one rank): results.json."""
    with one_thread():
        assert load_tool("evaluate").main([str(parts / "eval.yaml"),
                                           f"out={parts / 'single'}"]) == 0
    return json.loads((parts / "single" / "results.json").read_text())


@pytest.mark.distributed
def test_the_command_on_two_ranks_writes_every_number_with_protocol_and_checksums(parts,
                                                                                  single):
    """torchrun, 2 ranks: every FVD set and the validation batches split between them, the
    numbers of one rank's run; the files record the protocol and the inputs' checksums."""
    out = parts / "cli"
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARS}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    f"{ROOT}/tools/evaluate.py", str(parts / "eval.yaml"), f"out={out}"],
                   check=True, cwd=parts, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    r = json.loads((out / "results.json").read_text())
    assert r["fvd"]["folds"] == pytest.approx(single["fvd"]["folds"], rel=1e-6)
    for view in ("row", "frame"):
        for key in ("loss", "accuracy"):
            assert r["per_block"][view][key] == pytest.approx(single["per_block"][view][key],
                                                              rel=1e-5)
    assert r["temporal"]["profile_ratio"] == pytest.approx(single["temporal"]["profile_ratio"])
    assert r["config"]["fvd"]["samples"] == 6 and r["config"]["fvd"]["protocol"] == "custom"
    assert r["fvd"]["detector"]["sha256"] == sha256_file(parts / "i3d_torchscript.pt")
    assert r["tokenizer"]["sha256"] == load_video_tokenizer(str(parts / "tok32.pt")).checksum()
    weights = torch.load(parts / "model.pt", weights_only=True)["state_dict"]
    assert r["model"]["weights_sha256"] == sha256_tensors(weights)
    # each fold's FVD is the distance of its statistics file to the reference set's
    reference, meta = load_stats(out / "stats" / "reference.npz")
    assert reference.count == 7 and meta["set"]["kind"] == "videos"
    for f in range(2):
        stats, meta = load_stats(out / "stats" / f"generated_fold{f}.npz")
        assert stats.count == 6 and meta["set"]["slice"] == [6 * f, 6 * (f + 1)]
        assert r["fvd"]["folds"][f] == pytest.approx(stats_distance(reference, stats), rel=1e-8)
    assert r["fvd"]["fvd"] == pytest.approx(np.mean(r["fvd"]["folds"])) and r["fvd"]["fvd"] > 0
    assert r["per_block"]["clips"] == 8 and len(r["per_block"]["frame"]["loss"]) == 2
    assert r["temporal"]["generated"]["clips"] == 3 and len(r["temporal"]["profile_ratio"]) == 4
    assert r["tokenizer_reconstruction"]["clips"] == 3 and r["tokenizer_reconstruction"]["psnr"] > 0
    summary = (out / "summary.md").read_text()
    assert f"| {r['fvd']['fvd']:.2f} |" in summary and "![per latent row](per_block.png)" in summary
    for png in ("per_block.png", "temporal.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in os.listdir(out / "stats") if "rank" in p]  # states cleaned up
    assert sorted(p for p in os.listdir(out / "stats")) == [
        "generated_fold0.npz", "generated_fold1.npz", "reference.npz"]


def test_an_interrupted_evaluation_resumes_to_the_same_numbers(parts, single, monkeypatch):
    """In process: generation stops at its 5th batch (fold 0 done, fold 1 half saved); the
    rerun generates only what no saved state holds and ends with the uninterrupted numbers."""
    tool = load_tool("evaluate")
    config = [str(parts / "eval.yaml"), "metrics=[fvd]"]
    calls = {"n": 0, "fail_at": 5}
    original = GeneratedClips.tokens

    def counted(self, lo, hi):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise KeyboardInterrupt("interrupted")
        return original(self, lo, hi)

    monkeypatch.setattr(GeneratedClips, "tokens", counted)
    with one_thread(), pytest.raises(KeyboardInterrupt):
        tool.main([*config, f"out={parts / 'cut'}"])
    calls.update(n=0, fail_at=None)
    with one_thread():
        assert tool.main([*config, f"out={parts / 'cut'}"]) == 0
    assert calls["n"] == 2  # fold 1's last two batches; fold 0 and the reference were saved
    cut = json.loads((parts / "cut" / "results.json").read_text())["fvd"]
    assert cut["folds"] == single["fvd"]["folds"]  # exact


def test_frame_prediction_continues_each_real_clip(parts, dims):
    """context_frames=1: clip i's first latent frame is the tokenizer's code of real clip i's
    first frame; the rest is generated."""
    from nbp_mega.generate.load import load_trained_model

    model, _ = load_trained_model(str(parts / "model.pt"), dims=dims)
    tok = load_video_tokenizer(str(parts / "tok32.pt"))
    real = RealClips(str(parts / "videos"), count=3, frames=5, resolution=32, seed=1)
    fake = GeneratedClips(model, tok, count=3, seed=0, sampling=SamplingConfig(), record={},
                          context=real, context_frames=1)
    tokens = fake.tokens(0, 3)
    first = tok.encode(real.videos(0, 3)[:, :, :1] - 0.5)
    assert torch.equal(tokens[:, :1], first[:, :1])
    with pytest.raises(ValueError, match="context_frames=2: expected 1 \\+ 4 k pixel frames"):
        GeneratedClips(model, tok, count=3, seed=0, sampling=SamplingConfig(), record={},
                       context=real, context_frames=2)


@pytest.mark.parametrize("override, message", [
    (["fvd.detector="], "fvd needs fvd.detector"),
    (["fvd.detector_sha256=" + "ab" * 32], "the pin is abab"),
    (["fvd.sample=3"], "unknown config key 'fvd.sample'"),
    (["metrics=[fid]"], "metrics=\\['fid'\\]: expected"),
    (["videos="], "need 'videos'"),
    (["fvd.resolution=64"], "set fvd.resolution=32"),
], ids=["no-detector", "pin", "key", "metric", "videos", "resolution"])
def test_bad_input_is_refused_naming_what_was_wrong(parts, capsys, override, message):
    tool = load_tool("evaluate")
    assert tool.main([str(parts / "eval.yaml"), f"out={parts / 'bad'}", "metrics=[fvd]",
                      *override]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.distributed
def test_training_evaluates_each_checkpoint_beside_it(parts, tmp_path, dims):
    """log.eval_config: the training job (ZeRO-3) starts `python -m nbp_mega.eval --watch`,
    which scores the checkpoints of steps 2 and 4 as they appear, into RUN/eval/ and
    RUN/tensorboard/eval at their steps; the job ends after the last one's evaluation. A
    second pass finds nothing new."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nbp_mega.eval import cli

    (tmp_path / "watch.yaml").write_text(yaml.safe_dump(
        {"metrics": ["per_block", "temporal"], "tokenizer": str(parts / "tok32.pt"),
         "videos": str(parts / "videos"), "temporal": {"clips": 2},
         "fvd": {"resolution": 32, "frames": FRAMES, "batch_size": 2},
         "per_block": {"batch_size": 4, "max_batches": 1}}))
    run_dir = tmp_path / "run"
    run([sys.executable, "-m", "nbp_mega.train", f"{ROOT}/configs/tiny.yaml",
         f"run_dir={run_dir}", "model.layers=2", "model.hidden=32", "model.heads=4",
         "model.grid=[2,4,4]", "model.block_shape=[1,1,4]", "model.vocab_size=32",
         "model.num_classes=4", "train.steps=4", "train.global_batch=4", "train.save_every=2",
         "train.eval_every=0", f"data.shards={parts}/shards/train",
         f"data.val_shards={parts}/shards/val", "data.num_workers=0", "log.peak_tflops=1",
         "log.progress=false", f"log.eval_config={tmp_path / 'watch.yaml'}",
         "log.eval_poll=0.5"], cwd=tmp_path)
    events = EventAccumulator(str(run_dir / "tensorboard" / "eval"))
    events.Reload()
    scored = {e.step: e.value for e in events.Scalars("eval/val_loss")}
    assert sorted(scored) == [2, 4]
    for step, loss in scored.items():
        r = json.loads((run_dir / "eval" / f"step_{step:08d}" / "results.json").read_text())
        assert r["per_block"]["loss"] == pytest.approx(loss)
        assert r["model"]["path"].endswith(f"step_{step:08d}") and r["temporal"]["real"]
    assert scored[4] != scored[2]  # two different checkpoints' weights
    assert "evaluated step_00000004" in (run_dir / "eval.log").read_text()
    cfg = cli.load_eval_config(str(tmp_path / "watch.yaml"), [f"run={run_dir}",
                                                             f"out={run_dir / 'eval'}"])
    assert cli.watch(cfg, dims, str(run_dir), once=True, poll=0) == 0


@pytest.mark.parametrize("name, protocol", [("ucf101", "ucf101"), ("k600", "k600"),
                                            ("quick", "custom")])
def test_shipped_eval_configs_load_with_their_protocols(name, protocol):
    from nbp_mega.eval.config import load_eval_config
    from nbp_mega.eval.fvd import PRESETS

    paths = ["run=r", "tokenizer=t", "videos=v", "fvd.detector=d"]
    cfg = load_eval_config(f"{ROOT}/configs/eval/{name}.yaml", paths)
    assert cfg.fvd.protocol == protocol
    for key, value in PRESETS.get(protocol, {}).items():
        assert getattr(cfg.fvd, key) == value, key
    with pytest.raises(ValueError, match="need 'run'"):
        load_eval_config(f"{ROOT}/configs/eval/{name}.yaml", paths[1:])


def test_a_folder_of_generated_videos_is_evaluated_without_a_model(parts, single, tmp_path):
    """generated=DIR (another model's samples): FVD and temporal consistency of its files'
    first frames, no model or tokenizer loaded, against the reference statistics the model's
    evaluation made (reused, not recomputed); a folder with fewer usable files than the
    protocol's clips is refused."""
    from nbp_mega.eval import cli

    out = tmp_path / "folder"
    reference = parts / "single" / "stats" / "reference.npz"
    made = reference.stat().st_mtime_ns
    base = [str(parts / "eval.yaml"), "run=", "tokenizer=", f"generated={parts / 'videos'}",
            "metrics=[fvd,temporal]", "fvd.samples=5", "fvd.folds=1", "temporal.clips=2",
            f"reference_stats={reference}"]
    assert cli.main([*base, f"out={out}"]) == 0
    assert reference.stat().st_mtime_ns == made
    r = json.loads((out / "results.json").read_text())
    assert r["fvd"]["reference_stats"] == str(reference)
    assert r["model"] is None and r["tokenizer"] is None and r["fvd"]["fvd"] > 0
    _, meta = load_stats(out / "stats" / "generated_fold0.npz")
    assert meta["set"]["first_frames"] and meta["set"]["videos"] == 5
    assert r["temporal"]["generated"]["clips"] == 2
    assert cli.main([*base, f"out={tmp_path / 'few'}", "fvd.samples=6"]) == 2


def test_evaluations_compared_side_by_side(parts, single, tmp_path):
    """--compare: one row per evaluation (the same model twice gets its folder's name), the
    plots of both; an FVD of another protocol is marked."""
    from nbp_mega.eval import cli

    other = tmp_path / "other"
    shutil.copytree(parts / "single", other)
    r = json.loads((other / "results.json").read_text())
    r["config"]["fvd"]["frames"] = 3
    (other / "results.json").write_text(json.dumps(r))
    out = tmp_path / "compared"
    assert cli.main(["--compare", str(parts / "single"), str(other), "--out", str(out)]) == 0
    table = (out / "comparison.md").read_text()
    assert f"| model.pt | {single['fvd']['fvd']:.2f} +- " in table
    assert "| model.pt (other) | " in table and "(other protocol)" in table
    assert (out / "per_block.png").exists() and (out / "temporal.png").exists()
    assert cli.main(["--compare", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_a_bad_eval_config_fails_the_training_at_start(tmp_path):
    """log.eval_config is loaded as the evaluation will load it, before the model is built."""
    from nbp_mega.config import load_config
    from nbp_mega.train import check_evaluation_config

    (tmp_path / "bad.yaml").write_text("metrics: [fid]\n")
    cfg = load_config(TINY, [f"log.eval_config={tmp_path / 'bad.yaml'}",
                             f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=r"metrics=\['fid'\]: expected"):
        check_evaluation_config(cfg)
    check_evaluation_config(load_config(TINY, []))  # none asked for: nothing to check
