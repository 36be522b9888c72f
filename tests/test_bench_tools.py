"""The benchmark tools' arithmetic: what they report must follow from what they measured.

tools/bench_attention.py runs end to end on its tiny shape; tools/bench_train.py's summary
(median step time including the data wait) and MFU/targets are checked on made-up runs (the
real runs take minutes: `python tools/bench_train.py --json`).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

from nbp_mega.ops import fused

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not fused.AVAILABLE, reason="nbp_mega._C is not built")
def test_bench_attention_tiny_shape_records_and_targets(capsys):
    bench = load_tool("bench_attention")
    assert bench.main(["--shapes", "tiny", "--repeats", "1", "--threads", "1", "--json"]) == 0
    machine, *rows, targets = json.loads(capsys.readouterr().out)
    assert machine["threads"] == 1
    got = {(r["impl"], r["pass"]) for r in rows}
    assert got == {(i, p) for i in bench.IMPLS for p in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["shape"] == "tiny" and r["seconds"] > 0
        fused_s = next(x["seconds"] for x in rows
                       if x["impl"] == "fused" and x["pass"] == r["pass"])
        # seconds are rounded to 10 us: loose on this tiny shape
        assert r["vs_fused"] == pytest.approx(r["seconds"] / fused_s, rel=0.1)
    # the targets concern the paper and long shapes only
    assert targets == {"shape": "targets", "all_met": True, "targets": []}


def test_bench_attention_targets_ratio_against_the_fastest_baseline():
    bench = load_tool("bench_attention")

    def row(shape, impl, seconds):
        return {"shape": shape, "impl": impl, "pass": "fwd+bwd", "seconds": seconds}

    records = [row("paper", "fused", 0.6), row("paper", "dense_mask", 1.2),
               row("paper", "block_loop", 1.0), row("paper", "sdpa_causal", 0.5)]
    result = bench.targets_record(records)
    by_limit = {t["limit"]: t for t in result["targets"]}
    assert by_limit[0.7]["ratio"] == pytest.approx(0.6) and by_limit[0.7]["met"]
    assert by_limit[1.1]["ratio"] == pytest.approx(1.2) and not by_limit[1.1]["met"]
    assert result["all_met"] is False
    assert len(result["targets"]) == 2  # no "long" rows: its targets are left out


def test_bench_train_summary_counts_the_data_wait(tmp_path):
    bench = load_tool("bench_train")
    rows = [{"step": 1, "step_seconds": 9.0},  # warm-up, not timed
            {"step": 2, "step_seconds": 1.0, "data_seconds": 0.5},
            {"step": 3, "step_seconds": 2.0},
            {"step": 4, "step_seconds": 1.0, "data_seconds": 2.0},
            {"step": 4, "loss": 1.0}]  # other records in metrics.jsonl are ignored
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = bench.summarize(str(tmp_path), range(2, 5), tokens_per_step=100,
                             flops_per_token=1e9)
    assert record["step_seconds"] == 2.0  # median of 1.5, 2.0, 3.0
    assert record["tokens_per_s"] == 50.0
    assert record["model_tflops"] == pytest.approx(0.05)
    assert "breakdown" not in record  # no profile written


@pytest.mark.parametrize("params,zero3_tflops,expect_mfu_target", [
    (98_000_000, 0.030, True),  # 0.030 / 0.060 = 0.5 >= 0.4
    (98_000_000, 0.020, False),  # 0.33 < 0.4
    (1_500_000, 0.030, None),  # small config: no MFU target
])
def test_bench_train_mfu_against_the_peak(params, zero3_tflops, expect_mfu_target):
    bench = load_tool("bench_train")
    records = [
        {"shape": "m", "setup": "zero3_dp2", "parameters": params, "model_tflops": zero3_tflops},
        {"shape": "m", "setup": "plain", "parameters": params, "model_tflops": 0.036},
        {"shape": "m", "setup": "targets", "zero3_vs_plain": {"ratio": 0.8}},
    ]
    bench.add_mfu(records, peak=0.060)
    assert records[0]["mfu"] == pytest.approx(zero3_tflops / 0.060)
    assert records[1]["mfu"] == pytest.approx(0.6)
    if expect_mfu_target is None:
        assert "mfu" not in records[2]
    else:
        assert records[2]["mfu"]["met"] is expect_mfu_target
        assert records[2]["mfu"]["target"] == bench.TARGET_MFU


@pytest.mark.distributed
def test_bench_gloo_times_both_averaging_paths(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))  # its spawned ranks import it by name
    bench = load_tool("bench_gloo")
    bench.main(["--elements", "10000", "--tensors", "7", "--repeats", "1", "--json"])
    *rows, ratio = json.loads(capsys.readouterr().out)
    assert {r["impl"] for r in rows} == {"reduce_scatter_coalesced", "bucket_all_reduce",
                                         "reduce_scatter_tensor", "all_reduce"}
    assert all(r["seconds"] > 0 and r["elements"] == 10000 for r in rows)
    seconds = {r["impl"]: r["seconds"] for r in rows}
    assert ratio["bucket_all_reduce_vs_reduce_scatter_coalesced"] == pytest.approx(
        seconds["bucket_all_reduce"] / seconds["reduce_scatter_coalesced"])
