"""The benchmark tools' arithmetic: what they report must follow from what they measured.

tools/bench_attention.py runs end to end on its tiny shape (CPU), also with a crashing, a wrong
and a missing implementation standing in; its targets are checked on made-up rows.
tools/bench_train.py's summary (median step time including the data wait, quartiles), its
ABBA turns, its load record and MFU/targets are checked on made-up inputs, and its pausing of
live runs on two fake trainers (the real runs take minutes: `python tools/bench_train.py
--json`). tools/bench_generation.py runs end to end on a tiny model: its steps, tokens, frames,
rates, time split, ratios and targets must follow from its own records.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys

import pytest
import torch

from nbp_mega import machine_load
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
    assert machine["threads"] == 1 and machine["device"] == "cpu"
    got = {(r["impl"], r["pass"]) for r in rows}
    assert got == {(i, p) for i in bench.DEFAULT_IMPLS["cpu"] for p in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["shape"] == "tiny" and r["seconds"] > 0 and r["correct"] is True
        assert set(r["max_abs_error"]) == ({"out"} if r["pass"] == "fwd" else
                                           {"out", "dq", "dk", "dv"})
        fused_s = next(x["seconds"] for x in rows
                       if x["impl"] == "fused" and x["pass"] == r["pass"])
        assert r["vs_fused"] == pytest.approx(r["seconds"] / fused_s, rel=0.01)
    # the targets concern the paper and long shapes only: none applies
    assert targets == {"shape": "targets", "all_met": None, "targets": []}


def test_bench_attention_records_a_crash_and_a_wrong_kernel(capsys, monkeypatch):
    bench = load_tool("bench_attention")

    def crash(q, k, v, L):
        raise RuntimeError("kernel exploded")

    def fast_but_wrong(q, k, v, L):  # no mask at all
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    monkeypatch.setitem(bench.IMPLS, "fused", fast_but_wrong)
    monkeypatch.setitem(bench.IMPLS, "block_loop", crash)
    argv = ["--shapes", "tiny", "--repeats", "2", "--threads", "1", "--json", "--impls",
            "fused", "dense_mask", "block_loop"]
    assert bench.main(argv) == 1  # the bench went on, and says that it failed
    machine, *rows, targets = json.loads(capsys.readouterr().out)
    by = {(r["impl"], r["pass"]): r for r in rows}
    for p in ("fwd", "fwd+bwd"):
        assert by["fused", p]["correct"] is False and by["fused", p]["seconds"] > 0
        assert by["fused", p]["max_abs_error"]["out"] > 0.1
        assert by["block_loop", p]["error"] == "RuntimeError: kernel exploded"
        assert by["block_loop", p]["seconds"] is None and "correct" not in by["block_loop", p]
        assert by["dense_mask", p]["correct"] is True and by["dense_mask", p]["repeats"] == 2
    assert targets["all_met"] is None
    assert "ERROR: RuntimeError: kernel exploded" in bench.markdown([machine, *rows, targets])


def test_bench_attention_survives_a_broken_reference_or_only_failing_impls(capsys,
                                                                         monkeypatch):
    bench = load_tool("bench_attention")
    argv = ["--shapes", "tiny", "--repeats", "1", "--threads", "1", "--json", "--impls"]

    def crash(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(bench.IMPLS, "block_loop", crash)
    assert bench.main([*argv, "block_loop"]) == 1  # nothing left to time: no crash
    _, *rows, _ = json.loads(capsys.readouterr().out)
    assert [r["error"].startswith("RuntimeError: CUDA error") for r in rows] == [True, True]
    monkeypatch.setattr(bench, "references", crash)  # the context an earlier shape broke
    assert bench.main([*argv, "dense_mask"]) == 1
    _, *rows, _ = json.loads(capsys.readouterr().out)
    assert all(r["error"].startswith("inputs or reference: RuntimeError") for r in rows)


def row(shape, impl, seconds, correct=True):
    return {"shape": shape, "impl": impl, "pass": "fwd+bwd", "seconds": seconds,
            "correct": correct}


def test_bench_attention_targets_ratio_against_the_fastest_baseline():
    bench = load_tool("bench_attention")
    records = [row("paper", "fused", 0.6), row("paper", "dense_mask", 1.2),
               row("paper", "block_loop", 1.0), row("paper", "sdpa_causal", 0.5)]
    result = bench.targets_record(records)
    by_limit = {t["limit"]: t for t in result["targets"]}
    assert by_limit[0.7]["ratio"] == pytest.approx(0.6) and by_limit[0.7]["met"]
    assert by_limit[1.1]["ratio"] == pytest.approx(1.2) and not by_limit[1.1]["met"]
    assert result["all_met"] is False
    assert len(result["targets"]) == 2  # no "long" rows: its targets are left out


def test_bench_attention_all_met_only_when_a_target_was_evaluated():
    bench = load_tool("bench_attention")
    paper = [row("paper", "fused", 0.1), row("paper", "dense_mask", 1.0),
             row("paper", "block_loop", 1.0), row("paper", "sdpa_causal", 1.0)]
    assert bench.targets_record(paper)["all_met"] is True
    none = {"shape": "targets", "all_met": None, "targets": []}
    assert bench.targets_record([row("tiny", "fused", 0.1)]) == none  # no target's shape
    assert bench.targets_record(paper[:1]) == none  # no baseline measured
    assert bench.targets_record(paper, device="cuda") == none  # the targets are the CPU's
    assert "No target applies" in bench.markdown([
        {"device": "cpu", "cpu": "x", "cores": 2, "kernel_isa": "avx2", "threads": 2,
         "torch": "2", "dtype": "float32", "repeats": 1, "calls": 1, "load_average": [0]},
        none])


def test_bench_attention_a_fast_wrong_or_failed_kernel_meets_no_target():
    bench = load_tool("bench_attention")
    baselines = [row("paper", "dense_mask", 1.0), row("paper", "block_loop", 1.0)]
    wrong = bench.targets_record([row("paper", "fused", 0.1, correct=False), *baselines])
    assert wrong["targets"][0]["ratio"] == pytest.approx(0.1)
    assert wrong["targets"][0]["met"] is False and wrong["all_met"] is False
    crashed = bench.targets_record([{**row("paper", "fused", None), "error": "E"}, *baselines])
    assert crashed["targets"][0] == {**crashed["targets"][0], "ratio": None, "met": False}


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
    assert record["step_seconds_quartiles"] == [1.75, 2.5]
    assert record["step_seconds_range"] == [1.5, 3.0] and record["steps_timed"] == 3
    assert record["tokens_per_s"] == 50.0
    assert record["model_tflops"] == pytest.approx(0.05)
    assert "breakdown" not in record  # no profile written


def test_bench_train_turns_are_abba_and_the_steps_add_up():
    bench = load_tool("bench_train")
    assert bench.schedule(1) == [[0], [1]]
    assert bench.schedule(4) == [[0], [1, 1], [0, 0], [1, 1], [0]]
    # setup 0 is resumed 3 times in 4 rounds, setup 1 twice: one dropped step each
    plan0, plan1 = bench.plan_steps(warmup=4, rounds=4, per_turn=4, profile=1)
    assert plan0 == {"last_timed": 4 + 3 + 16, "profile_start": 25, "total": 25}
    assert plan1 == {"last_timed": 4 + 2 + 16, "profile_start": 24, "total": 24}


def test_load_record_counts_only_other_processes():
    bench_key, child, other, late, kworker = (10, 1), (11, 2), (20, 3), (30, 4), (40, 5)
    first = {bench_key: 100, child: 0, other: 500, late: 0, kworker: 0}
    last = {bench_key: 90_000, child: 50_000, other: 600, late: 250, kworker: 300}
    comm = {bench_key: "python", child: "python", other: "bash", late: "make", kworker: "kw"}
    cpu_before = [0] * 10
    cpu_after = [60_000, 0, 1000, 39_000, 0, 0, 0, 0, 0, 0]  # no steal
    kwargs = dict(own={bench_key, child}, kernel={kworker}, cpu_before=cpu_before,
                  cpu_after=cpu_after, wall=500.0, cores=2, ticks_per_s=100)
    record = machine_load.load_summary(first, last, comm, **kwargs)
    # others: 1 s (bash) + 2.5 s (make, started during the run) of 1000 core-seconds
    assert record["others_cpu_seconds"] == 3.5 and record["others_fraction"] == 0.0035
    assert record["kernel_threads_cpu_seconds"] == 3.0  # apart, not held against the run
    assert record["quiet"] is True
    assert [o["comm"] for o in record["others"]] == ["kw", "make", "bash"]
    busy = machine_load.load_summary(first, {**last, other: 500 + 2100}, comm, **kwargs)
    assert busy["others_cpu_seconds"] == 23.5 and busy["quiet"] is False  # > 2% of 1000
    stolen = machine_load.load_summary(first, last, comm, **{
        **kwargs, "cpu_after": [57_000, 0, 1000, 39_000, 0, 0, 0, 3000, 0, 0]})
    assert stolen["steal_fraction"] == 0.03 and stolen["quiet"] is False


def test_process_tree_follows_parents():
    procs = {(1, 0): (0, "init", 0), (10, 0): (1, "bench", 0), (11, 0): (10, "torchrun", 0),
             (12, 0): (11, "rank", 0), (13, 0): (12, "loader", 0), (20, 0): (1, "bash", 0),
             (3, 0): (2, "kworker", 0)}
    assert machine_load.process_tree(procs, 10) == {(10, 0), (11, 0), (12, 0), (13, 0)}
    assert machine_load.kernel_threads(procs) == {(3, 0)}


FAKE_TRAINER = r"""
import json, sys, time
run_dir, total = sys.argv[1], int(sys.argv[2])
with open(run_dir + "/metrics.jsonl", "w") as out:
    for step in range(1, total + 1):
        start, beats = time.perf_counter(), []
        while time.perf_counter() - start < 0.15:  # busy: it works only while not stopped
            beats.append(time.time())
            time.sleep(0.005)
        out.write(json.dumps({"step": step, "step_seconds": time.perf_counter() - start,
                              "beats": beats}) + "\n")
        out.flush()
"""


def test_bench_train_interleaves_two_live_runs_one_at_a_time(tmp_path):
    bench = load_tool("bench_train")
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    warmup, rounds, per_turn = 1, 2, 2
    plans = bench.plan_steps(warmup, rounds, per_turn, profile=1)
    watch, runs = bench.LoadWatch(), []
    try:
        for name, plan in zip(("a", "b"), plans, strict=True):
            (tmp_path / name).mkdir()
            argv = [sys.executable, str(script), str(tmp_path / name), str(plan["total"])]
            runs.append(bench.Run(name, (argv, None), str(tmp_path / name), keep_root=False))
            bench.warm_up(runs[-1], warmup, watch)
        bench.interleave(runs, rounds, per_turn, plans, watch)
    finally:
        for run in runs:
            run.kill()
    steps = {}
    for run in runs:
        with open(run.metrics) as f:
            steps[run.setup] = {r["step"]: r for r in map(json.loads, f)}
        assert len(run.timed) == rounds * per_turn and min(run.timed) > warmup
    for mine, theirs in (("a", "b"), ("b", "a")):
        for s in next(r for r in runs if r.setup == mine).timed:
            row = steps[mine][s]
            assert row["step_seconds"] < 0.4  # no pause inside a timed step
            begin, end = row["beats"][0], row["beats"][-1]
            # the other setup did no work while this one's timed step ran
            assert not any(begin < t < end for r in steps[theirs].values() for t in r["beats"])
    assert watch.summary()["wall_seconds"] > 0


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


def test_bench_generation_records_add_up():
    # A process of its own: the tool joins and leaves a torch.distributed job. A 2x4x8 grid,
    # the first latent frame given (K600 layout: no start block): 32 tokens to generate.
    proc = subprocess.run([sys.executable, str(TOOLS / "bench_generation.py"), "--json",
                           "--rounds", "2", "--threads", "1", "--sampler-repeats", "1",
                           "--given-frames", "1", "--batches", "1", "2", "--set",
                           "model.grid=[2,4,8]", "model.layers=1", "model.hidden=32",
                           "model.heads=2", "model.vocab_size=64"],
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k not in (
                              "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                              "MASTER_PORT")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(proc.stdout)
    machine, kinds = records[0], [r["shape"] for r in records]
    assert machine["shape"] == "machine" and machine["quiet"] == machine["load"]["quiet"]
    assert "load_average" in machine["load"] and kinds[-2:] == ["targets", "roofline"]
    for r in (r for r in records if r["shape"] == "sampler"):  # before/after, side by side
        assert r["speedup"] == pytest.approx(r["former_seconds"] / r["seconds"], rel=0.05)
        assert r["speedup_over_torch"] == pytest.approx(r["torch_seconds"] / r["seconds"],
                                                        rel=0.05)
        assert r["kernel"] == ("cpu_kernel" if fused.AVAILABLE else "torch")
    setups = {(r["shape"], r["batch"]): r for r in records if r["shape"] in BLOCK_LEN}
    assert set(setups) == {(name, b) for name in BLOCK_LEN for b in (1, 2)}
    for (name, batch), r in setups.items():
        assert r["block_len"] == BLOCK_LEN[name] and r["variant"] == "eager"
        assert r["steps"] == (2 * 4 * 8 - 4 * 8) // r["block_len"]  # blocks minus given
        assert r["tokens"] == batch * 32 and r["generated_frames"] == 5 - 1  # 1 + 4 (t - 1)
        seconds = r["seconds"]
        assert seconds == pytest.approx(statistics.median(r["seconds_by_round"]), rel=1e-3)
        assert r["tokens_per_s"] * seconds == pytest.approx(r["tokens"], rel=1e-3)
        assert r["video_frames_per_s"] * seconds == pytest.approx(batch * 4, rel=1e-3)
        with_decode = r["video_frames_per_s_with_decode"] * (seconds + r["decode_seconds"])
        assert with_decode == pytest.approx(batch * 4, rel=1e-3) and r["decode_seconds"] > 0
        assert 0 < r["forward_seconds"] < seconds and r["sampler_seconds"] > 0
        assert r["sampler_overhead"] == pytest.approx(1 - r["forward_seconds"] / seconds,
                                                      abs=2e-3)
        assert r["sampler_fraction"] <= r["sampler_overhead"] + 2e-3  # outside the forward
    goals, floor = records[-2:]
    targets = goals["targets"]
    for ratios in (r for r in records if r["shape"] == "ratios"):
        rows, ntp = setups["rows", ratios["batch"]], setups["ntp", ratios["batch"]]
        fps = "video_frames_per_s"
        assert ratios["rows_over_ntp"] == round(rows[fps] / ntp[fps], 2)
        assert ratios["steps_ratio"] == 8.0
        speedup, = (t for t in targets if t["target"].startswith("rows_over")
                    and t["batch"] == ratios["batch"])
        assert speedup["value"] == ratios["rows_over_ntp"]
        assert speedup["met"] == (speedup["value"] >= 11)
        # the ceiling: this run's NTP clip over the rows clip's floor
        ceiling, = (f for f in floor["floors"] if f["batch"] == ratios["batch"])
        assert ceiling["ntp_measured_seconds"] == ntp["seconds"]
        assert speedup["ceiling"] == ceiling["rows_over_ntp_ceiling"] == pytest.approx(
            ntp["seconds"] / ceiling["rows_seconds"], abs=0.01)
        assert speedup["reachable"] == (speedup["ceiling"] >= 11)
    for t in (t for t in targets if t["target"] == "sampler_overhead"):
        assert t["value"] == setups[t["setup"], t["batch"]]["sampler_overhead"]
        assert t["met"] == (t["value"] <= 0.10)
    met = [t["met"] for t in targets]
    assert goals["all_met"] == all(met) and len(targets) == 2 * 4
    # the roofline: 1 gpt layer of d=32 (qkv, proj, fc, proj: 12 d^2) and a head over the
    # (padded) vocabulary of 64 ids; the embedding tables are not matmul weights
    head = floor["matmul_weights"] - 12 * 32 ** 2
    assert head % 32 == 0 and head >= 64 * 32
    assert floor["flops_per_token"] == 2 * floor["matmul_weights"]
    assert floor["weight_bytes"] == 4 * floor["matmul_weights"]  # fp32
    gemm, read = floor["gemm_flops_per_s"], floor["read_bytes_per_s"]
    assert gemm > 1e8 and read > 1e8
    assert [f["batch"] for f in floor["floors"]] == [1, 2]
    for f in floor["floors"]:
        assert f["rows_seconds"] == pytest.approx(f["batch"] * 32 * floor["flops_per_token"]
                                                  / gemm, rel=1e-5)
        ntp = 32 * max(floor["weight_bytes"] / read, f["batch"] * floor["flops_per_token"] / gemm)
        assert f["ntp_seconds"] == pytest.approx(ntp, rel=1e-5)
        assert f["rows_over_ntp"] == pytest.approx(ntp / f["rows_seconds"], abs=0.01)


BLOCK_LEN = {"rows": 8, "frames": 32, "ntp": 1}


def test_bench_loss_memory_chunks_hold_a_fraction_of_the_logits():
    """At the 700M preset's vocabulary (64,000) and 1,264 targets per clip, the unchunked
    loss's peak is at least the fp32 logits of the clip; in chunks of 256 positions
    (a fifth of them) it is under half of that (one chunk's logits, softmax and gradient)."""
    proc = subprocess.run([sys.executable, str(TOOLS / "bench_loss_memory.py"), "--json",
                           "--micro-batch", "1", "--chunks", "0,256"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    machine, whole, chunked = json.loads(proc.stdout)
    assert machine["shape"] == "machine" and whole["loss_chunk"] == 0
    assert whole["vocab"] == 64000 and whole["positions"] == 1264
    assert whole["peak_bytes"] >= whole["logits_bytes"]
    assert chunked["peak_bytes"] < 0.5 * whole["peak_bytes"], (whole, chunked)
    assert chunked["peak_over_unchunked"] == pytest.approx(
        chunked["peak_bytes"] / whole["peak_bytes"], rel=1e-3)
