"""Checkpoints survive a crash mid-save; `latest` and keep-last-N; the LR schedule; metrics."""

from __future__ import annotations

import json
import os

import pytest
import torch

from nbp_mega.checkpoint import Checkpointer
from nbp_mega.metrics import read_metrics, truncate_jsonl
from nbp_mega.optim import OptimConfig, lr_factor


class FakeEngine:
    """Writes one file per save, like DeepSpeed's save_checkpoint(dir, tag); can crash."""

    def __init__(self):
        self.crash = False
        self.loaded = self.client_state = None

    def save_checkpoint(self, save_dir, tag, save_latest, client_state):
        assert not save_latest
        self.client_state = client_state  # DeepSpeed stores it in its model-states files
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, tag, "model.pt"), "w") as f:
            f.write(tag)
        if self.crash:
            raise RuntimeError("node lost during save")

    def load_checkpoint(self, load_dir, tag, **kwargs):
        self.loaded = tag
        return os.path.join(load_dir, tag), {}


def test_crash_during_save_keeps_last_good_checkpoint(dims, tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep_last=2, rank=0)
    ckpt.client_state = {"universal_checkpoint_info": {"tp_replicated_parameter_patterns": []}}
    engine = FakeEngine()
    assert ckpt.latest() is None
    ckpt.save(engine, 10, {"step": 10})
    assert engine.client_state == ckpt.client_state  # the TP layout goes with DeepSpeed's files
    engine.crash = True
    with pytest.raises(RuntimeError, match="node lost"):
        ckpt.save(engine, 20, {"step": 20})
    assert ckpt.latest() == "step_00000010"
    assert os.path.isdir(tmp_path / "checkpoints" / "step_00000020.partial")
    state = ckpt.load(engine, ckpt.latest())
    assert state == {"step": 10} and engine.loaded == "step_00000010"
    engine.crash = False
    for step in (20, 30, 40):
        ckpt.save(engine, step, {"step": step})
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["latest", "step_00000030", "step_00000040"]
    assert ckpt.latest() == "step_00000040"


def test_rng_restored_on_load(dims, tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep_last=1, rank=0)
    torch.manual_seed(5)
    ckpt.save(FakeEngine(), 1, {"step": 1})
    expected = torch.rand(3)
    torch.manual_seed(99)
    ckpt.load(FakeEngine(), "step_00000001")
    assert torch.equal(torch.rand(3), expected)


def test_latest_pointing_nowhere_is_an_error(tmp_path):
    os.makedirs(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000007")
    with pytest.raises(RuntimeError, match="not a complete checkpoint"):
        Checkpointer(str(tmp_path), keep_last=1, rank=0).latest()


def test_warmup_then_cosine():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg, 110) for s in range(120)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.55)  # half way down the cosine
    assert factors[110] == pytest.approx(0.1) and factors[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))


def test_metrics_truncated_to_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "val_loss": 2.5},
             {"step": 3, "loss": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    truncate_jsonl(str(path), 2)
    train, evals = read_metrics(str(path))
    assert [r["step"] for r in train] == [1, 2] and evals == [{"step": 2, "val_loss": 2.5}]


def _slow_convert(src, dst, seconds, fail):
    import time

    time.sleep(seconds)
    if fail:
        raise ValueError("shard 3 is truncated")
    os.makedirs(dst)
    with open(os.path.join(dst, "converted"), "w") as f:
        f.write(src)


def _universal_worker(run_dir, seconds, fail):
    import datetime
    import functools

    import torch.distributed as dist

    # A collective timeout far shorter than the conversion: waiting in a barrier would fail.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))
    ckpt = Checkpointer(run_dir, keep_last=2, rank=dist.get_rank())
    os.makedirs(os.path.join(ckpt.dir, "step_00000003"), exist_ok=True)
    convert = functools.partial(_slow_convert, seconds=seconds, fail=fail)
    try:
        ckpt.make_universal("step_00000003", convert, poll_seconds=0.2, report_every=1.0)
        with open(os.path.join(ckpt.dir, "step_00000003", "universal", "converted")) as f:
            return f.read()
    except Exception as error:  # noqa: BLE001 - the test compares what each rank saw
        return f"{type(error).__name__}: {error}"
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_universal_conversion_outlasts_the_collective_timeout(tmp_path):
    from tests.spawn import run_distributed

    src = os.path.join(str(tmp_path), "checkpoints", "step_00000003")
    assert run_distributed(_universal_worker, 2, (str(tmp_path), 5.0, False)) == [src, src]
    assert not os.path.exists(os.path.join(src, "universal.partial"))


@pytest.mark.distributed
def test_universal_conversion_failure_reaches_every_rank(tmp_path):
    from tests.spawn import run_distributed

    rank0, rank1 = run_distributed(_universal_worker, 2, (str(tmp_path), 0.5, True))
    assert rank0 == "ValueError: shard 3 is truncated"
    assert rank1.startswith("RuntimeError: rank 0 failed to convert") and "truncated" in rank1
