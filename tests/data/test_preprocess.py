"""tools/preprocess_video_shards.py and nbp_mega/data/preprocess.py: videos -> token shards.

One UCF-style tree of tiny videos (9-frame clips at 32x32, the tiny random tokenizer) in five
containers/codecs, with broken files among them, is preprocessed once (`reference`); the other
tests compare against it: resuming after an interruption, the CLI with a worker process, what
webdataset, tarfile, the training loader and the tokenizer trainer read from it.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from nbp_mega.data.chunk_writer import ChunkRun
from nbp_mega.data.inputs import list_inputs
from nbp_mega.data.preprocess import PreprocessConfig, PreprocessError, run_preprocess
from nbp_mega.data.video import ClipSpec, clip_starts, iter_clips, probe
from tests.data.videos import frame_number, write_broken_files, write_truncated_mjpeg, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = ClipSpec(frames=9, resolution=32)
# class -> [(file, container/codec, frames)]: 20 frames give 2 clips of 9, 9 frames give 1.
GOOD = {"ApplyEyeMakeup": [("v_ApplyEyeMakeup_g01_c01.mp4", "mp4-h264", 20),
                           ("v_ApplyEyeMakeup_g01_c02.avi", "avi-mpeg4", 20)],
        "YoYo": [("v_YoYo_g01_c01.webm", "webm-vp9", 20), ("v_YoYo_g01_c02.avi", "avi-mjpeg", 20),
                 ("v_YoYo_g01_c03.mkv", "mkv-ffv1", 9)]}
GOOD_CLIPS = {"ApplyEyeMakeup": 4, "YoYo": 5}
TRUNCATED = "v_YoYo_g02_c01.avi"  # an MJPEG AVI cut in half: its readable clips are kept


def config(inp, out, **changes) -> PreprocessConfig:
    base = dict(input=str(inp), output=str(out), tokenizer="tiny", raw=True, clips=SPEC,
                videos_per_chunk=4, batch_size=4, workers=0)
    return PreprocessConfig(**{**base, **changes})


def shard_files(out) -> list[str]:
    """Every shard file under `out` (token and raw), relative, sorted."""
    found = glob.glob(os.path.join(str(out), "**", "*.tar"), recursive=True)
    return sorted(os.path.relpath(p, str(out)) for p in found)


def file_bytes(out) -> dict[str, bytes]:
    return {name: open(os.path.join(str(out), name), "rb").read() for name in shard_files(out)}


def read_tar(path: str) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of a shard, read with the standard library only."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def samples_of(out, kind="train") -> dict[str, dict[str, bytes]]:
    """All samples of OUT/<kind>/*.tar, keys checked unique across shards."""
    found: dict[str, dict[str, bytes]] = {}
    for path in sorted(glob.glob(os.path.join(str(out), kind, "*.tar"))):
        for key, sample in read_tar(path).items():
            assert key not in found, f"{key} is in two shards"
            found[key] = sample
    return found


def npy(raw: bytes) -> np.ndarray:
    return np.load(io.BytesIO(raw), allow_pickle=False)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("ucf")
    for cls, files in GOOD.items():
        os.makedirs(root / cls)
        for name, kind, frames in files:
            write_video(str(root / cls / name), kind, frames=frames)
    broken = write_broken_files(str(root / "YoYo"))
    truncated = write_truncated_mjpeg(str(root / "YoYo" / TRUNCATED), frames=30)
    kept = 0
    try:
        for _ in iter_clips(probe(truncated), SPEC):
            kept += 1
    except Exception:  # noqa: BLE001 - the oracle: what the decoder alone keeps
        pass
    assert kept >= 1
    return root, broken, kept


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory):
    root, _, _ = tree
    out = tmp_path_factory.mktemp("ref") / "out"
    manifest, code = run_preprocess(config(root, out))
    return out, manifest, code


# -- what a run writes -----------------------------------------------------------------------
def test_tree_counts_labels_and_every_skipped_file_with_its_reason(tree, reference):
    _, broken, kept = tree
    out, manifest, code = reference
    assert code == 2  # something was skipped
    assert manifest["label_map"] == {"ApplyEyeMakeup": 0, "YoYo": 1}
    assert manifest["counts"]["train"]["clips"] == sum(GOOD_CLIPS.values()) + kept
    assert manifest["counts"]["train"]["videos"] == 5 + len(broken) + 1
    assert manifest["clips_per_class"]["train"] == {"ApplyEyeMakeup": 4, "YoYo": 5 + kept}
    reasons = {os.path.basename(s["source"]): s for s in manifest["skipped"]}
    assert set(reasons) == set(broken) | {TRUNCATED}
    for name, fragment in broken.items():
        assert fragment in reasons[name]["reason"] and reasons[name]["clips_kept"] == 0
    assert "truncated" in reasons[TRUNCATED]["reason"]
    assert reasons[TRUNCATED]["clips_kept"] == kept
    with open(out / "manifest.json") as f:
        on_disk = json.load(f)
    assert on_disk["skipped"] == manifest["skipped"] and on_disk["complete"]
    assert on_disk["options"]["tokenizer"]["grid"] == [3, 4, 4]


def test_webdataset_and_tarfile_read_the_shards_without_duplicates(reference):
    import webdataset as wds

    out, manifest, _ = reference
    paths = [os.path.join(str(out), p) for p in manifest["shards"]["tokens"]["train"]]
    by_wds = {s["__key__"]: s for s in wds.WebDataset(paths, shardshuffle=False)}
    by_tar = samples_of(out)
    assert set(by_wds) == set(by_tar) and len(by_tar) == manifest["counts"]["train"]["clips"]
    for key, sample in by_tar.items():
        assert set(sample) == {"tokens.npy", "json"}
        assert by_wds[key]["tokens.npy"] == sample["tokens.npy"]
    assert len(samples_of(out, "raw/train")) == len(by_tar)
    if shutil.which("tar"):  # the tar program too
        listed = subprocess.run(["tar", "-tf", paths[0]], capture_output=True, text=True,
                                check=True).stdout.split()
        assert listed == [m.name for m in tarfile.open(paths[0]).getmembers()]
        assert {name.split(".", 1)[1] for name in listed} == {"tokens.npy", "json"}


def test_metadata_fields_and_token_dtype(tree, reference):
    from nbp_mega.tokenizer import load_video_tokenizer

    root, _, _ = tree
    out, _, _ = reference
    tok = load_video_tokenizer("tiny")
    raw = samples_of(out, "raw/train")
    encoded = 0
    for key, sample in sorted(samples_of(out).items()):
        meta = json.loads(sample["json"])
        assert os.path.isfile(root / meta["source"])
        cls = meta["source"].split("/")[0]
        assert (meta["label"], meta["label_name"]) == ({"ApplyEyeMakeup": 0, "YoYo": 1}[cls], cls)
        assert meta["text"] == {"ApplyEyeMakeup": "apply eye makeup", "YoYo": "yo yo"}[cls]
        assert meta["clip_start"] == pytest.approx(9 / 30 * meta["clip_index"], abs=2e-3)
        assert (meta["fps"], meta["frames"], meta["resolution"]) == (30, 9, [32, 32])
        assert (meta["tokenizer"], meta["tokenizer_checksum"]) == ("tiny", tok.checksum())
        tokens = npy(sample["tokens.npy"])
        assert tokens.dtype == np.uint16 and tokens.shape == (3, 4, 4)  # 64000 codes
        # The tokens are those of this sample's own frames (batching kept the order).
        frames = npy(raw[key]["frames.npy"])
        assert frames.dtype == np.uint8 and frames.shape == (9, 32, 32, 3)
        assert json.loads(raw[key]["json"]) == meta
        if meta["clip_index"] == 1 and encoded < 2:  # (the tokenizer is slow on a CPU)
            encoded += 1
            assert np.array_equal(tok.encode(torch.from_numpy(frames[None]))[0].numpy(), tokens)
    assert encoded == 2


def test_token_shards_train(dims, reference):
    """What the training loader reads (configs: model.grid / vocab_size from the manifest)."""
    from nbp_mega.data.loader import DataConfig, build_loaders
    from nbp_mega.model import NBPTransformer
    from nbp_mega.parallel.layers import TensorParallel
    from tests.conftest import tiny_model_config

    out, manifest, _ = reference
    info = manifest["options"]["tokenizer"]
    loader, _ = build_loaders(DataConfig(shards=str(out / "train"), num_workers=0,
                                         shuffle_buffer=8), seed=0, global_batch=2, dp_rank=0,
                              dp_size=1, grid=tuple(info["grid"]),
                              vocab_size=info["codebook_size"])
    torch.manual_seed(0)
    cfg = tiny_model_config(grid=info["grid"], block_shape=[1, 4, 4],
                            vocab_size=info["codebook_size"],
                            num_classes=len(manifest["label_map"]))
    model = NBPTransformer(cfg, TensorParallel(dims, init_std=cfg.init_std))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        batch = loader.next_batch()
        assert batch.tokens.shape == (2, 3, 4, 4) and batch.labels.min() >= 0
        input_ids, targets = model.layout.build(batch.tokens, batch.labels)
        loss = model(input_ids, targets).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()


def test_raw_shards_are_what_tokenizer_training_reads(reference):
    from nbp_mega.tokenizer.train import DataSection, load_clips

    out, manifest, _ = reference
    clips = load_clips(DataSection(shards=str(out / "raw" / "train"), frames=9, resolution=32))
    assert clips.shape == (manifest["counts"]["train"]["clips"], 9, 32, 32, 3)
    assert clips.dtype == np.uint8


# -- resuming --------------------------------------------------------------------------------
def test_rerun_after_an_interruption_gives_the_same_shards(tree, reference, tmp_path,
                                                           monkeypatch):
    root, _, _ = tree
    ref_out, ref_manifest, _ = reference
    out = tmp_path / "out"
    one_input = ChunkRun._one_input
    calls = []

    def interrupted(self, item):
        calls.append(item["id"])
        if len(calls) == 6:  # chunk 0 is published; chunk 1 has written part of its work
            raise KeyboardInterrupt
        return one_input(self, item)

    monkeypatch.setattr(ChunkRun, "_one_input", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(config(root, out))
    monkeypatch.setattr(ChunkRun, "_one_input", one_input)
    assert os.listdir(out / ".partial")  # the interrupted chunk's work in progress
    manifest, code = run_preprocess(config(root, out))
    assert manifest["run"]["chunks_resumed"] == 1 and code == 2
    assert file_bytes(out) == file_bytes(ref_out)
    assert manifest["skipped"] == ref_manifest["skipped"]

    # A lost shard, a half-written one, a stale work folder: only those chunks are redone.
    tokens = sorted(glob.glob(str(out / "train" / "*.tar")))
    os.remove(tokens[-1])
    raw = sorted(glob.glob(str(out / "raw" / "train" / "*.tar")))
    with open(raw[0], "r+b") as f:
        f.truncate(os.path.getsize(raw[0]) // 2)
    os.makedirs(out / ".partial" / "train-000001")
    (out / ".partial" / "train-000001" / "tokens-000.tar").write_bytes(b"junk")
    manifest, _ = run_preprocess(config(root, out))
    assert manifest["run"]["chunks_resumed"] == len(ref_manifest["shards"]["tokens"]["train"]) - 2
    assert file_bytes(out) == file_bytes(ref_out)
    assert not os.path.exists(out / ".partial")

    # Nothing left to do: nothing is rewritten.
    manifest, _ = run_preprocess(config(root, out))
    assert manifest["run"]["chunks_done_now"] == 0 and manifest["run"]["clips_now"] == 0


def test_a_rerun_with_other_options_or_a_foreign_folder_is_refused(tree, reference, tmp_path):
    root, _, _ = tree
    ref_out, _, _ = reference
    with pytest.raises(PreprocessError, match="other arguments.*resolution 32 -> 16"):
        run_preprocess(config(root, ref_out, clips=ClipSpec(frames=9, resolution=16)))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(PreprocessError, match="not empty"):
        run_preprocess(config(root, tmp_path / "foreign"))


@pytest.mark.parametrize("changes, expected", [
    (dict(clips=ClipSpec(frames=8, resolution=32)), "1 \\+ 4n"),
    (dict(clips=ClipSpec(frames=9, resolution=30)), "does not fit the tokenizer"),
    (dict(tokenizer=None, raw=False), "nothing to write"),
    (dict(tokenizer="no-such-preset"), "cannot load a tokenizer"),
    (dict(input="/no/such/folder"), "does not exist"),
])
def test_unusable_arguments_fail_before_any_work(tree, tmp_path, changes, expected):
    root, _, _ = tree
    with pytest.raises(PreprocessError, match=expected):
        run_preprocess(config(root, tmp_path / "out", **changes))
    assert not os.path.exists(tmp_path / "out" / "plan.json")


# -- the command line ------------------------------------------------------------------------
def test_cli_with_a_worker_process_writes_the_same_shards(tree, reference, tmp_path):
    root, broken, _ = tree
    ref_out, ref_manifest, _ = reference
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_video_shards.py"),
           "--input", str(root), "--output", str(out), "--tokenizer", "tiny", "--raw",
           "--frames", "9", "--resolution", "32", "--videos-per-chunk", "4", "--batch-size",
           "4", "--workers", "1", "--threads", str(torch.get_num_threads())]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == len(broken) + 1 and summary["failed_chunks"] == 0
    assert "clips_per_s" in proc.stderr  # the progress bar
    clips = ref_manifest["counts"]["train"]["clips"]
    assert f"train: {clips} clips from 6/{5 + len(broken) + 1} videos" in proc.stderr
    assert "model.grid=[3,4,4]" in proc.stderr  # how to train on it
    assert file_bytes(out) == file_bytes(ref_out)
    with open(out / "manifest.json") as f:
        assert json.load(f)["counts"] == ref_manifest["counts"]


# -- other inputs ----------------------------------------------------------------------------
def test_clean_list_exits_zero_with_labels_from_folders(tree, tmp_path):
    root, _, _ = tree
    lines = [f"{cls}/{name} {k + 1}" for k, cls in enumerate(GOOD) for name, _, _ in GOOD[cls]]
    (tmp_path / "trainlist01.txt").write_text("# UCF-101 style\n" + "\n".join(lines) + "\n")
    manifest, code = run_preprocess(config(tmp_path / "trainlist01.txt", tmp_path / "out",
                                           root=str(root), tokenizer=None))
    assert code == 0 and manifest["skipped"] == [] and not manifest["failed_chunks"]
    assert manifest["clips_per_class"]["train"] == GOOD_CLIPS
    assert sorted(os.listdir(tmp_path / "out")) == [".lock", ".state", "manifest.json",
                                                    "plan.json", "raw"]


def test_csv_with_labels_captions_times_splits_and_text_ids(tmp_path):
    from nbp_mega.tokenizer.text import TextTokenizer, train_text_tokenizer

    os.makedirs(tmp_path / "clips")
    write_video(str(tmp_path / "clips" / "a.mp4"), "mp4-h264", frames=40)
    write_video(str(tmp_path / "clips" / "b.mkv"), frames=30)
    (tmp_path / "list.csv").write_text(
        "\ufeffpath,label,caption,start,end,split\n"  # a BOM, as spreadsheets write
        "clips/a.mp4,ApplyEyeMakeup,a person applies eye makeup,0.5,1.2,train\n"
        'clips/b.mkv,YoYo,"a kid, playing yo-yo",,,val\n'
        "clips/missing.mp4,YoYo,,,,train\n"
        "clips/b.mkv,YoYo,,-1,,train\n"
        ",YoYo,,,,train\n")
    captions = ["a person applies eye makeup", "a kid, playing yo-yo"]
    text_model = str(tmp_path / "text.model")
    train_text_tokenizer(captions + ["apply eye makeup", "yo yo"], text_model, vocab_size=64)
    manifest, code = run_preprocess(config(tmp_path / "list.csv", tmp_path / "out", raw=False,
                                           text_tokenizer=text_model))
    assert code == 2
    assert {s: c["clips"] for s, c in manifest["counts"].items()} == {"train": 2, "val": 3}
    reasons = sorted(s["reason"] for s in manifest["skipped"])
    assert len(reasons) == 3
    assert "file not found" in reasons[0] and "negative" in reasons[1] and "no path" in reasons[2]
    text = TextTokenizer(text_model)
    train = [json.loads(s["json"]) | {"ids": npy(s["text.npy"])}
             for s in samples_of(tmp_path / "out").values()]
    assert sorted(m["clip_start"] for m in train) == pytest.approx([0.5, 0.8], abs=2e-3)
    for meta in train:
        assert (meta["label_name"], meta["caption"]) == ("ApplyEyeMakeup", captions[0])
        assert meta["ids"].dtype == np.int32 and text.decode([meta["ids"]]) == [captions[0]]
        assert meta["text_tokenizer_checksum"] == text.checksum()
    val = [json.loads(s["json"]) for s in samples_of(tmp_path / "out", "val").values()]
    assert [m["caption"] for m in val] == [captions[1]] * 3 and val[0]["label"] == 1


def test_fps_resampling_random_windows_and_shard_caps_in_raw_shards(tmp_path):
    os.makedirs(tmp_path / "v")
    video = write_video(str(tmp_path / "v" / "long.mkv"), frames=60)
    spec = ClipSpec(frames=9, resolution=32, fps=15, sampling="random", clips_per_video=3,
                    seed=3)
    manifest, code = run_preprocess(config(tmp_path / "v", tmp_path / "out", tokenizer=None,
                                           clips=spec, max_shard_clips=2))
    assert code == 0 and manifest["counts"]["train"]["clips"] == 3
    assert manifest["counts"]["train"]["raw_shards"] == 2  # 2 + 1 clips: the cap splits
    samples = sorted(samples_of(tmp_path / "out", "raw/train").values(),
                     key=lambda s: json.loads(s["json"])["clip_index"])
    starts = clip_starts(30, spec, video)  # 60 frames at 30 fps = 2 s = 30 frames at 15 fps
    for start, sample in zip(starts, samples, strict=True):
        meta = json.loads(sample["json"])
        assert meta["fps"] == 15 and meta["clip_start"] == pytest.approx(start / 15, abs=1e-5)
        numbers = [frame_number(f) for f in npy(sample["frames.npy"])]
        assert numbers == [2 * (start + k) for k in range(9)]  # every other 30 fps frame


def test_size_cap_splits_a_chunk_into_parts(tree, tmp_path):
    root, _, _ = tree
    cap = 60_000  # about two raw clips (9 x 32 x 32 x 3 bytes each)
    manifest, _ = run_preprocess(config(root, tmp_path / "out", tokenizer=None,
                                        videos_per_chunk=100, max_shard_bytes=cap))
    parts = manifest["shards"]["raw"]["train"]
    assert len(parts) >= 4 and all("shard-000000-" in p for p in parts)
    # ShardWriter closes a shard once its samples reach the cap: it may pass it by one sample
    # (plus the tar headers and the final 10 KiB record padding).
    one_sample = 9 * 32 * 32 * 3 + 2048
    assert all(os.path.getsize(tmp_path / "out" / p) <= cap + one_sample + 10240 for p in parts)


def test_list_inputs_tables_and_layouts(tmp_path):
    (tmp_path / "k.tsv").write_text("youtube_id\ttime_start\ttime_end\tlabel\tsplit\n"
                                    "abc\t10\t20\tthree-legged race\tval\n"
                                    "xyz\t\t20\tabseiling\tval\n")
    found, rejected = list_inputs(str(tmp_path / "k.tsv"))
    assert [os.path.basename(i.path) for i in found] == ["abc_000010_000020.mp4"]
    assert (found[0].split, found[0].label_name) == ("val", "three-legged race")
    assert "time_start and time_end" in rejected[0].reason
    for name in ("train/abseiling/a.mp4", "val/abseiling/b.mp4", "val/zumba/c.mp4"):
        os.makedirs(tmp_path / "k600" / os.path.dirname(name), exist_ok=True)
        (tmp_path / "k600" / name).write_bytes(b"")
    found, _ = list_inputs(str(tmp_path / "k600"))
    assert [(i.split, i.label_name) for i in found] == [("train", "abseiling"),
                                                         ("val", "abseiling"), ("val", "zumba")]
    (tmp_path / "k600.txt").write_text("train/abseiling/a.mp4\nval/zumba/c.mp4\n"
                                       "train/abseiling/a.mp4\n")
    found, rejected = list_inputs(str(tmp_path / "k600.txt"), root=str(tmp_path / "k600"))
    assert [(i.split, i.label_name) for i in found] == [("train", "abseiling"), ("val", "zumba")]
    assert rejected[0].reason.startswith("listed twice")


def test_tokenizer_runs_in_fp32_on_every_device(monkeypatch):
    """Shards hold the codes the tokenizer defines: preprocessing never takes the bf16 path
    that load_video_tokenizer picks by default on a GPU (it changes ~7% of the codes)."""
    import nbp_mega.tokenizer as tokenizer_pkg
    from nbp_mega.data.preprocess import PreprocessConfig, load_encoders

    seen = {}
    real = tokenizer_pkg.load_video_tokenizer

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **{**kwargs, "device": "cpu"})

    monkeypatch.setattr(tokenizer_pkg, "load_video_tokenizer", spy)
    enc = load_encoders(PreprocessConfig(input="unused", output="unused", tokenizer="tiny",
                                         device="cuda"))
    assert seen["device"] == "cuda" and seen["dtype"] == "fp32"
    assert next(enc.video.model.parameters()).dtype == torch.float32
