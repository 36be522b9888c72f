"""`make demo`: pixels -> tokens -> shards -> NBP and NTP models -> generated clips -> report.

    run_demo("runs/demo")                       # the full demo (tools/demo.py)
    run_demo(tmp, QUICK)                        # the same code path at test scale

Each stage runs what a user would run, as a subprocess: tools/preprocess_video_shards.py,
launch.sh with NPROC_PER_NODE=2 (ZeRO-3 over 2 CPU ranks), tools/sample.py; each is timed,
with the CPU time other processes took meanwhile (nbp_mega.machine_load), and logs to
OUT/logs/<stage>.log. Layout of OUT:

    videos/<split>/<class>/clipNNNN.mp4   the synthetic clips (nbp_mega/demo/videos.py)
    shards/{train,val}/*.tar              token shards (+ manifest.json)
    nbp/, ntp/                            run directories (configs/demo_{nbp,ntp}.yaml)
    samples/{nbp,ntp}/                    tokens.npy, samples.json, sample_XXX.mp4/.gif
    report/                               report.md, *.png, stats.json
    timings.json                          every stage's seconds and load
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from nbp_mega.demo.tokenizer import REPO, TOKENIZER_PATH, load_demo_tokenizer
from nbp_mega.demo.videos import CLASSES, write_class_videos

MODELS = {"nbp": "configs/demo_nbp.yaml", "ntp": "configs/demo_ntp.yaml"}


class DemoError(RuntimeError):
    """A stage failed (the message names it and its log)."""


@dataclass(frozen=True)
class DemoScale:
    """How big the demo is. The defaults are `make demo`;
    QUICK is the test's scale, through the same code."""

    train_per_class: int = 256  # training clips per class (one video file each)
    val_per_class: int = 16  # validation clips per class (4 x 16 = 4 batches of 16)
    frames: int = 9  # frames per clip (1 + 4n: the tokenizer's time stride is 4)
    size: int = 32  # pixels per side (a multiple of the tokenizer's 4)
    steps: int = 500  # optimizer steps of each model
    eval_every: int = 100  # validation every N steps
    samples_per_class: int = 4  # generated clips per class and model
    preprocess_workers: int = 2  # tokenizer processes of preprocessing
    train_overrides: tuple[str, ...] = ()  # extra key=value for both models (e.g. sizes)

    @property
    def grid(self) -> list[int]:
        return [1 + (self.frames - 1) // 4, self.size // 4, self.size // 4]

    @property
    def global_batch(self) -> int:
        return 16

    @property
    def eval_batches(self) -> int:
        return max(1, self.val_per_class * len(CLASSES) // self.global_batch)


QUICK = DemoScale(train_per_class=8, val_per_class=4, steps=8, eval_every=4,
                  samples_per_class=1, preprocess_workers=0,
                  train_overrides=("model.layers=1", "model.hidden=32", "model.heads=2",
                                   "optim.warmup_steps=2"))


@dataclass
class Stage:
    name: str
    seconds: float
    load: dict = field(default_factory=dict)  # nbp_mega.machine_load summary

    @property
    def busy(self) -> str:
        """Others' CPU share, e.g. "35%" (">100%": processes that ended meanwhile bring the
        CPU time of their reaped children, some of it from before the stage), and the 1-minute
        load average at the end."""
        others = self.load.get("others_fraction")
        load = self.load.get("load_average", [{}])[-1].get("load", [None])[0]
        share = "?" if others is None else ">100%" if others > 1 else f"{others:.0%}"
        return f"others {share} of the cores, load {load}"

    def line(self) -> str:
        return f"[demo] {self.name}: {self.seconds:.1f} s ({self.busy})"


class Timer:
    """Runs and times the stages; remembers them for timings.json and the report."""

    def __init__(self, out: str, echo: bool = True):
        self.out, self.echo, self.stages = out, echo, []
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)

    def call(self, name: str, fn, *args, **kwargs):
        from nbp_mega.machine_load import LoadWatch

        watch, start = LoadWatch(), time.perf_counter()
        result = fn(*args, **kwargs)
        self._done(name, start, watch)
        return result

    def run(self, name: str, argv: list[str], env: dict | None = None) -> None:
        """A subprocess from the repository root, its output in logs/<name>.log."""
        from nbp_mega.machine_load import LoadWatch

        watch, start = LoadWatch(), time.perf_counter()
        log = os.path.join(self.logs, f"{name}.log")
        with open(log, "w") as f:
            proc = subprocess.Popen(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})})
            while proc.poll() is None:
                watch.tick()  # sees the stage's own processes as its own, not as others
                time.sleep(0.5)
        if proc.returncode != 0:
            with open(log) as f:
                tail = f.read()[-3000:]
            raise DemoError(f"stage {name} failed (exit {proc.returncode}): {' '.join(argv)}"
                            f"\n--- last lines of {log} ---\n{tail}")
        self._done(name, start, watch)

    def _done(self, name: str, start: float, watch) -> None:
        stage = Stage(name, time.perf_counter() - start, watch.summary())
        self.stages.append(stage)
        if self.echo:
            print(stage.line(), flush=True)

    def write(self, total: float) -> str:
        path = os.path.join(self.out, "timings.json")
        with open(path, "w") as f:
            json.dump({"total_seconds": total,
                       "stages": [dataclasses.asdict(s) for s in self.stages]}, f, indent=1)
        return path


# -- stages ----------------------------------------------------------------------------------
def write_videos(out: str, scale: DemoScale) -> str:
    root = os.path.join(out, "videos")
    write_class_videos(root, {"train": scale.train_per_class, "val": scale.val_per_class},
                       frames=scale.frames, size=scale.size)
    return root


def preprocess_argv(out: str, scale: DemoScale, tokenizer: str) -> list[str]:
    return [sys.executable, "tools/preprocess_video_shards.py",
            "--input", os.path.join(out, "videos"), "--output", os.path.join(out, "shards"),
            "--tokenizer", tokenizer, "--frames", str(scale.frames),
            "--resolution", str(scale.size), "--layout", "split-classes",
            "--workers", str(scale.preprocess_workers), "--quiet",
            # about 16 training shards whatever the scale: 16 data streams split over 2 ranks
            "--videos-per-chunk", str(max(1, scale.train_per_class * len(CLASSES) // 16))]


def train_argv(out: str, scale: DemoScale, model: str) -> list[str]:
    shards = os.path.join(out, "shards")
    grid = ",".join(map(str, scale.grid))
    return ["bash", "launch.sh", MODELS[model], f"run_dir={os.path.join(out, model)}",
            f"data.shards={os.path.join(shards, 'train')}",
            f"data.val_shards={os.path.join(shards, 'val')}", f"model.grid=[{grid}]",
            f"model.num_classes={len(CLASSES)}", f"train.steps={scale.steps}",
            f"train.eval_every={scale.eval_every}", f"train.eval_batches={scale.eval_batches}",
            f"train.global_batch={scale.global_batch}", *scale.train_overrides]


def sample_labels(scale: DemoScale) -> list[int]:
    """Class ids of the generated clips: samples_per_class of each, class by class."""
    return [c for c in range(len(CLASSES)) for _ in range(scale.samples_per_class)]


def sample_argv(out: str, scale: DemoScale, model: str, tokenizer: str) -> list[str]:
    labels = sample_labels(scale)
    return [sys.executable, "tools/sample.py", os.path.join(out, model),
            "--out", os.path.join(out, "samples", model), "--num", str(len(labels)),
            "--labels", *map(str, labels), "--tokenizer", tokenizer, "--seed", "0",
            "--batch-size", str(len(labels))]


def _check_out(out: str) -> None:
    """Refuse to empty a folder that is neither empty nor an earlier demo's output."""
    if os.path.isdir(out) and os.listdir(out) and not os.path.isdir(os.path.join(out, "videos")):
        raise DemoError(f"{out} holds files but no videos/ of an earlier demo: the demo empties "
                        "its output folder first, so give a new or empty folder (--out)")


def run_demo(out: str = "runs/demo", scale: DemoScale = DemoScale(), *,
             tokenizer: str = TOKENIZER_PATH, tokenizer_sha256: str | None = None,
             echo: bool = True) -> str:
    """Every stage into `out` (emptied first); -> the report's path."""
    import shutil

    from nbp_mega.demo.markdown import write_markdown
    from nbp_mega.demo.report import analyse

    start = time.perf_counter()
    out = os.path.abspath(out)
    _check_out(out)
    shutil.rmtree(out, ignore_errors=True)
    timer = Timer(out, echo)
    timer.call("write videos", write_videos, out, scale)
    kwargs = {} if tokenizer_sha256 is None else {"sha256": tokenizer_sha256}
    timer.call("check tokenizer (sha256)", load_demo_tokenizer, tokenizer, **kwargs)
    timer.run("preprocess (tokenize into shards)", preprocess_argv(out, scale, tokenizer))
    env = {"PYTHON": sys.executable, "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"}
    for model in MODELS:
        timer.run(f"train {model.upper()} (ZeRO-3, 2 ranks)", train_argv(out, scale, model), env)
    for model in MODELS:
        timer.run(f"sample {model.upper()}", sample_argv(out, scale, model, tokenizer))
    results = timer.call("report: plots and numbers", analyse, out, scale, tokenizer)
    total = time.perf_counter() - start
    report = write_markdown(out, scale, results, timer.stages, total)
    timer.write(total)
    if echo:
        print(f"[demo] total: {total / 60:.1f} min; report: {report}", flush=True)
    return report
