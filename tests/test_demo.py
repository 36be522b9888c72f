"""`make demo` at test scale: `tools/demo.py --quick` (the demo's own code path, tiny data,
model and step counts) and every artefact it leaves; the demo's pieces on their own."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from nbp_mega.demo import analysis
from nbp_mega.demo.pipeline import QUICK
from nbp_mega.demo.videos import CLASSES, class_clip
from tests.test_train import JOB_VARS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = len(CLASSES) * QUICK.samples_per_class  # generated clips per model


# -- the pieces ------------------------------------------------------------------------------
@pytest.mark.parametrize("k", range(len(CLASSES)))
def test_clip_stats_recognise_each_class(k):
    rng = np.random.default_rng(k)
    for _ in range(5):
        stats = analysis.clip_stats(class_clip(CLASSES[k], rng, frames=9, size=32))
        assert stats.nearest_class == k and stats.found == 1.0
        assert stats.direction == analysis.DIRECTIONS[CLASSES[k].direction]


def test_clip_stats_of_a_grey_or_still_clip():
    grey = np.full((9, 32, 32, 3), 120, np.uint8)
    assert analysis.clip_stats(grey).direction == "none"
    still = grey.copy()
    still[:, 10:18, 10:18] = CLASSES[2].colour
    stats = analysis.clip_stats(still)
    assert (stats.direction, stats.nearest_class, stats.area) == ("still", 2, 64.0)


def test_shipped_tokenizer_matches_its_checksum(tmp_path):
    from nbp_mega.demo.tokenizer import (
        FSQ_LEVELS,
        TOKENIZER_PATH,
        TOKENIZER_SHA256,
        TokenizerChecksumError,
        load_demo_tokenizer,
    )

    assert len(TOKENIZER_SHA256) == 64, "the shipped tokenizer's sha256 is not recorded"
    tok = load_demo_tokenizer()
    assert tok.checksum() == TOKENIZER_SHA256
    assert tok.codebook_size == int(np.prod(FSQ_LEVELS)) and tok.downsample == (4, 4, 4)
    assert os.path.getsize(TOKENIZER_PATH) < 10 * 2**20
    with pytest.raises(TokenizerChecksumError, match="expected 0000"):
        load_demo_tokenizer(sha256="0" * 64)
    with pytest.raises(TokenizerChecksumError, match="missing"):
        load_demo_tokenizer(str(tmp_path / "none.pt"))


def test_fsq_levels_patch_is_scoped():
    from nbp_mega.demo.tokenizer import fsq_levels
    from nbp_mega.tokenizer import train

    section = train.ModelSection(preset="tiny-s4")
    with fsq_levels((5, 5, 5)):
        assert train.model_config(section).levels == (5, 5, 5)
    assert train.model_config(section).levels == (8, 8, 8, 5, 5, 5)


# -- the whole demo at test scale ------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "out")
    # a job this test process joined (the session's `dims`) must not leak into the demo's
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARS}
    proc = subprocess.run([sys.executable, "tools/demo.py", "--quick", "--out", out], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def test_prints_stage_timings_and_the_report_path(demo):
    out, stdout = demo
    for stage in ("write videos", "preprocess", "train NBP", "train NTP", "sample NBP",
                  "sample NTP", "report"):
        assert re.search(rf"^\[demo\] {stage}.*: [\d.]+ s", stdout, re.M), stage
    last = stdout.strip().splitlines()[-1]
    assert last.endswith(os.path.join(out, "report", "report.md"))
    timings = json.loads(_read(os.path.join(out, "timings.json")))
    assert len(timings["stages"]) >= 8 and timings["total_seconds"] > 0


def test_videos_are_real_files_of_every_class(demo):
    from nbp_mega.data.video import probe

    out, _ = demo
    for split, count in (("train", QUICK.train_per_class), ("val", QUICK.val_per_class)):
        for cls in CLASSES:
            folder = os.path.join(out, "videos", split, cls.name)
            files = sorted(os.listdir(folder))
            assert len(files) == count and all(f.endswith(".mp4") for f in files)
            assert probe(os.path.join(folder, files[0])).width == QUICK.size


def test_shards_exist_and_decode(demo):
    from nbp_mega.data.shards import ShardIndex, expand_shards

    out, _ = demo
    manifest = json.loads(_read(os.path.join(out, "shards", "manifest.json")))
    assert manifest["label_map"] == {c.name: k for k, c in enumerate(CLASSES)}
    for split, count in (("train", QUICK.train_per_class), ("val", QUICK.val_per_class)):
        index = ShardIndex.build(expand_shards(os.path.join(out, "shards", split)))
        assert len(index) == count * len(CLASSES)
        samples = [index.read(i) for i in range(len(index))]
        index.close()
        assert {s.tokens.shape for s in samples} == {tuple(QUICK.grid)}
        assert max(int(s.tokens.max()) for s in samples) < 1000
        labels = [s.meta["label"] for s in samples]
        assert sorted(set(labels)) == list(range(len(CLASSES)))
    assert len(os.listdir(os.path.join(out, "shards", "train"))) > 1  # streams split over dp


@pytest.mark.parametrize("model,block", [("nbp", [1, 1, 8]), ("ntp", [1, 1, 1])])
def test_both_runs_trained_with_zero3_on_two_ranks(demo, model, block):
    import yaml

    from nbp_mega.metrics import read_metrics

    out, _ = demo
    run = os.path.join(out, model)
    cfg = yaml.safe_load(_read(os.path.join(run, "config.yaml")))
    assert cfg["model"]["block_shape"] == block and cfg["parallel"]["zero_stage"] == 3
    latest = _read(os.path.join(run, "checkpoints", "latest")).strip()
    state = json.loads(_read(os.path.join(run, "checkpoints", latest, "trainer_state.json")))
    assert state["layout"]["dp"] == 2 and state["step"] == QUICK.steps
    train, evals = read_metrics(os.path.join(run, "metrics.jsonl"))
    assert len(train) == QUICK.steps and len(evals) >= 2
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


@pytest.mark.parametrize("model", ["nbp", "ntp"])
def test_samples_tokens_and_videos(demo, model):
    import av

    out, _ = demo
    folder = os.path.join(out, "samples", model)
    tokens = np.load(os.path.join(folder, "tokens.npy"))
    assert tokens.shape == (NUM, *QUICK.grid) and tokens.dtype.kind in "iu"
    assert 0 <= tokens.min() and tokens.max() < 1000
    meta = json.loads(_read(os.path.join(folder, "samples.json")))
    assert meta["labels"] == [k for k in range(len(CLASSES))
                              for _ in range(QUICK.samples_per_class)]
    assert meta["steps"] == (24 if model == "nbp" else 192)
    for i in range(NUM):
        with av.open(os.path.join(folder, f"sample_{i:03d}.mp4")) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == QUICK.frames and frames[0].shape == (QUICK.size, QUICK.size, 3)


def test_report_references_images_that_exist(demo):
    from PIL import Image

    out, _ = demo
    report = os.path.join(out, "report", "report.md")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", _read(report))
    assert {"loss_curves.png", "per_block.png", "contact_sheet.png", "temporal.png"} \
        <= set(images)
    for name in images:
        with Image.open(os.path.join(os.path.dirname(report), name)) as img:
            assert img.format == "PNG" and min(img.size) > 200
    links = re.findall(r"\]\((\.\./samples/[^)]+)\)", _read(report))
    assert len(links) == 2 * NUM
    assert all(os.path.isfile(os.path.join(os.path.dirname(report), x)) for x in links)


def _speed_rows(report: str) -> dict[str, list[str]]:
    text = report.split("## Generation speed", 1)[1].split("##", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| N")]
    return {r[0]: r for r in rows}


def test_speed_table_comes_from_samples_json(demo):
    out, _ = demo
    rows = _speed_rows(_read(os.path.join(out, "report", "report.md")))
    assert set(rows) == {"NBP", "NTP"}
    seconds = {}
    for model, row in rows.items():
        meta = json.loads(_read(os.path.join(out, "samples", model.lower(), "samples.json")))
        seconds[model] = meta["timings"]["generation_s"]
        assert row[2] == str(meta["shape"][0]) and row[4] == str(meta["steps"])
        assert row[5] == f"{seconds[model]:.2f}"
        assert row[7] == f"{meta['shape'][0] * 192 / seconds[model]:,.0f}"
    assert rows["NBP"][-1] == f"{seconds['NTP'] / seconds['NBP']:.1f}x"


def test_report_measures_the_real_clips_correctly(demo):
    """The numbers beside the generated clips are only worth reading if the same measure
    recognises every real clip's class colour and motion."""
    out, _ = demo
    stats = json.loads(_read(os.path.join(out, "report", "stats.json")))["stats"]
    assert [c["class"] for c in stats["real"]] == [c.name for c in CLASSES]
    for c in stats["real"]:
        assert c["colour_match"] == c["direction_match"] == c["square_found"] == 1.0
    assert set(stats) == {"real", "real through the tokenizer", "NBP", "NTP"}


def test_report_has_scores_by_position_and_temporal_consistency(demo):
    """stats.json: per-row loss and accuracy of both models (the report's per_block.png) and
    the frame-change statistics of their samples against the same real clips."""
    out, _ = demo
    results = json.loads(_read(os.path.join(out, "report", "stats.json")))
    for model in ("nbp", "ntp"):
        scores = results["per_block"][model]
        assert len(scores["row"]["loss"]) == QUICK.grid[0] * QUICK.grid[1]
        assert results["loss_by_row"][model] == scores["row"]["loss"]
        assert 0 < scores["accuracy"] < 1
    real = [t["real"] for t in results["temporal"].values()]
    assert set(results["temporal"]) == {"NBP", "NTP"} and real[0] == real[1]
    for t in results["temporal"].values():
        assert t["generated"]["clips"] == real[0]["clips"] > 0
        assert len(t["profile_ratio"]) == QUICK.frames - 1
    report = _read(os.path.join(out, "report", "report.md"))
    nbp = results["temporal"]["NBP"]
    assert "## Temporal consistency" in report and f"{nbp['flicker_ratio']:.2f}x" in report
