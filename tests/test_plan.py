"""The planner (nbp_mega.plan): its model of the parameters against the real model, its
activation formula against the tensors autograd saves, its ZeRO settings against the generated
DeepSpeed config, its model states against DeepSpeed's own estimator, the memory model's
properties, the search and its CLI (table, JSON, bad input, nothing fits).

Measured memory against the estimates: tests/test_bench_memory.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
from dataclasses import replace

import pytest
import torch

from nbp_mega.config import load_config
from nbp_mega.config_fields import ConfigError
from nbp_mega.model import NBPTransformer
from nbp_mega.parallel.layers import TensorParallel
from nbp_mega.parallel.tp_shards import TPPlan
from nbp_mega.plan import zero3
from nbp_mega.plan.__main__ import main as plan_main
from nbp_mega.plan.cost import step_time
from nbp_mega.plan.layout import Cluster, GiB, Job, Layout, ZeroSettings
from nbp_mega.plan.memory import (
    gathered_bytes,
    layer_saved_per_token,
    logits_bytes,
    memory_phases,
    pipeline_stage_jobs,
    resident_between_steps,
    training_memory,
)
from nbp_mega.plan.search import search
from nbp_mega.plan.shapes import ModelShape
from tests.conftest import tiny_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")

SHAPES = [dict(family="gpt", position="learned_1d", num_classes=3),
          dict(family="gpt", position="learned_3d"),
          dict(family="llama", position="rope_3d", text_len=4, text_vocab=40),
          dict(family="gpt", hybrid_start=True, start_block=True, text_len=4, text_vocab=40)]


def job_of(name: str, *overrides: str, backend: str = "nccl") -> Job:
    return Job.of_config(load_config(os.path.join(CONFIGS, name), list(overrides)), backend)


# -- the model as the planner sees it -----------------------------------------------------------
@pytest.mark.parametrize("changes", SHAPES, ids=lambda c: "-".join(map(str, c.values())))
def test_parameters_are_the_models(dims, changes):
    """Every name, full shape and TP split of ModelShape is the real NBPTransformer's."""
    cfg = tiny_model_config(**changes)
    with torch.device("meta"):
        model = NBPTransformer(cfg, TensorParallel(dims))
    plan = TPPlan.of(model, tp=1)
    real = {n: (tuple(p.shape), plan.dims[n]) for n, p in model.named_parameters()}
    ours = {p.name: (p.shape, p.split) for p in ModelShape(cfg).params}
    assert ours == real


def test_module_order_is_the_forward_order(dims):
    """The planner's module calls come in the order a forward pass makes them (what ZeRO-3
    traces), for both families."""
    for family in ("gpt", "llama"):
        cfg = tiny_model_config(family=family, num_classes=3)
        model = NBPTransformer(cfg, TensorParallel(dims)).eval()
        calls = []
        for name, module in model.named_modules():
            if list(module.parameters(recurse=False)):
                module.register_forward_pre_hook(lambda m, a, n=name, c=calls: c.append(n))
        tokens = torch.randint(0, cfg.vocab_size, (1, *cfg.grid))
        with torch.no_grad():
            model(*model.layout.build(tokens, torch.tensor([1])))
        expected = [name for name, _ in ModelShape(cfg).modules]
        assert [c.removesuffix(".linear") for c in calls] == expected


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs, parameters excluded."""
    storages = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


LAYERS = {"gpt": dict(family="gpt", dropout=0.0), "gpt-dropout": dict(family="gpt", dropout=0.1),
          "llama-rope-dropout": dict(family="llama", position="rope_3d", dropout=0.1)}


@pytest.mark.parametrize("changes", list(LAYERS.values()), ids=list(LAYERS))
def test_layer_activation_formula_is_what_autograd_saves(dims, changes):
    """layer_saved_per_token x tokens = the bytes one transformer layer saves for its
    backward (fp32, B=2, S=64, d=64), within 3%."""
    cfg = tiny_model_config(hidden=64, heads=4, grid=[2, 4, 8], **changes)
    torch.manual_seed(0)
    model = NBPTransformer(cfg, TensorParallel(dims)).train()
    layer = model.layers[0]
    x = torch.randn(2, model.layout.seq_len, cfg.hidden, requires_grad=True)
    got = _saved_bytes(lambda: layer(x, model.rope, 0))
    job = Job(shape=ModelShape(cfg), precision="fp32", zero=ZeroSettings(), global_batch=2,
              dropout=cfg.dropout > 0)
    want = layer_saved_per_token(job, tp=1, device="cpu") * x.shape[0] * x.shape[1]
    assert want == pytest.approx(got, rel=0.03), (want, got)


def test_logits_of_one_loss_chunk():
    job = job_of("nbp_700m.yaml", "model.loss_chunk=512")
    one = Layout(tensor=1, data=8, micro_batch=2)
    assert logits_bytes(job, one) == 512 * 64000 * (2 + 12)
    assert logits_bytes(job, replace(one, tensor=2)) == 512 * 32000 * 14
    whole = replace(job, loss_chunk=0)
    assert logits_bytes(whole, one) == 2 * 1264 * 64000 * 14


# -- DeepSpeed's settings and estimator ---------------------------------------------------------
def test_zero_settings_are_deepspeeds_defaults_and_our_generated_config(dims):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from nbp_mega.parallel.deepspeed import deepspeed_config

    ds = DeepSpeedZeroConfig()
    ours = ZeroSettings()
    for name in ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size",
                 "param_persistence_threshold", "max_live_parameters", "max_reuse_distance",
                 "sub_group_size", "reduce_scatter"):
        assert getattr(ours, name) == getattr(ds, name), name
    cfg = load_config(os.path.join(CONFIGS, "tiny.yaml"),
                      ["train.global_batch=1", "deepspeed.zero_optimization="
                       "{stage3_prefetch_bucket_size: 1000, reduce_bucket_size: 2000}"])
    zero = deepspeed_config(cfg, dims)["zero_optimization"]  # dims: a gloo job
    settings = ZeroSettings.of_config(cfg, backend="gloo")
    assert settings.reduce_scatter == zero.get("reduce_scatter", True) is False
    assert (settings.prefetch_bucket_size, settings.reduce_bucket_size) == (1000, 2000)
    assert ZeroSettings.of_config(cfg, backend="nccl").reduce_scatter is True


def test_model_states_agree_with_deepspeeds_estimator(dims):
    """DeepSpeed's estimate_zero3_model_states_mem_needs_all_live (bf16 ZeRO-3, one GPU; the
    figures it prints, to the byte: its own estimate_zero3_model_states_mem_needs of the
    model's counts) is 18 bytes per parameter + the largest layer in fp32 without offload;
    ours: the 16 bytes the buffers take (bf16 parameters and gradients, fp32 master, two fp32
    moments), within 15%. With the optimizer offloaded both count 2 bytes per parameter
    (within 1%)."""
    from deepspeed.runtime.zero import stage3

    cfg = load_config(os.path.join(CONFIGS, "bench_100m.yaml"),
                      ["model.layers=2", "model.hidden=512", "model.heads=8",
                       "train.precision=bf16", "train.global_batch=1"])
    model = NBPTransformer(cfg.model, TensorParallel(dims))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        stage3.estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=1)
    total, largest = stage3.model_to_params(model)  # what _all_live counts and prints
    assert f"{total // 10**6}M total params" in out.getvalue()
    job = Job.of_config(cfg)
    for offload, rel in ((False, 0.15), (True, 0.01)):
        _, theirs, _ = stage3.estimate_zero3_model_states_mem_needs(
            total, largest, cpu_offload=offload, cpu_offload_params=False)
        assert f"{theirs / 2**30:6.2f}GB" in out.getvalue()
        layout = Layout(tensor=1, data=1, zero_stage=3, offload_optimizer=offload)
        ours = sum(resident_between_steps(job, layout).values()) + 4 * largest
        assert ours == pytest.approx(theirs, rel=rel), (offload, ours, theirs)


# -- properties of the memory model -------------------------------------------------------------
def test_zero_stages_shard_what_they_should():
    job = job_of("nbp_1.2b.yaml")
    P = job.shape.numel(1)
    for stage, sharded in ((1, {"master_weights", "optimizer_states"}),
                           (3, {"parameters", "gradients", "master_weights",
                                "optimizer_states"})):
        one = resident_between_steps(job, Layout(tensor=1, data=1, zero_stage=stage))
        eight = resident_between_steps(job, Layout(tensor=1, data=8, zero_stage=stage))
        for name in ("parameters", "master_weights", "optimizer_states"):
            ratio = eight[name] / one[name]
            assert ratio == pytest.approx(1 / 8 if name in sharded else 1, rel=0.01), name
    plain = resident_between_steps(job, Layout(tensor=1, data=8, zero_stage=0))
    assert plain["parameters"] == 2 * P  # bf16 whole
    off = resident_between_steps(job, Layout(tensor=1, data=8, zero_stage=3,
                                             offload_optimizer=True))
    assert off["master_weights"] == off["optimizer_states"] == off["gradients"] == 0
    tp2 = resident_between_steps(job, Layout(tensor=2, data=4, zero_stage=3))
    assert tp2["optimizer_states"] == pytest.approx(8 * job.shape.numel(2) / 4, rel=0.01)


def test_checkpointing_micro_batch_and_zero_init():
    job = job_of("nbp_1.2b.yaml")
    base = Layout(tensor=1, data=8, zero_stage=3, micro_batch=1, activation_checkpointing=False)
    acts = {m: training_memory(job, replace(base, micro_batch=m)).phases["forward_backward"]
            for m in (1, 2)}
    ckpt = training_memory(job, replace(base, activation_checkpointing=True))
    assert ckpt.phases["forward_backward"] < acts[1] < acts[2]
    whole = training_memory(replace(job, zero_init=False), base)
    assert whole.phases["build"] >= 4 * job.shape.numel(1)  # fp32, every rank
    assert training_memory(job, base).phases["build"] < whole.phases["build"] / 4
    with pytest.raises(ValueError, match="pipeline=2"):
        training_memory(job, replace(base, pipeline=2))


def test_zero3_gathering_replay():
    """First step: one module's parameters at a time. Steady state with DeepSpeed's
    defaults: prefetching runs ahead to ~stage3_max_live_parameters, so a 100M model is held
    whole; a small max_live or no prefetch and no reuse bring it back to one module."""
    job = job_of("bench_100m.yaml")
    layout = Layout(tensor=1, data=2, zero_stage=3)
    shape, b = job.shape, job.bytes
    biggest = max(sum(p.numel for p in params if p.numel > 100_000)
                  for _, params in shape.modules)
    big = sum(p.numel for p in shape.params if p.numel > 100_000)
    assert gathered_bytes(job, layout, steady=False) == b * biggest
    assert gathered_bytes(job, layout, steady=True) == b * big
    tight = replace(job, zero=replace(job.zero, max_live_parameters=10_000_000,
                                      max_reuse_distance=0))
    assert b * biggest < gathered_bytes(tight, layout, steady=True) <= b * (10_000_000
                                                                            + 2 * biggest)
    none = replace(job, zero=replace(job.zero, prefetch_bucket_size=0, max_reuse_distance=0))
    assert gathered_bytes(none, layout, steady=True) == b * biggest


def test_zero3_replay_keeps_what_is_reused_soon():
    """Without prefetch a parameter used again within max_reuse_distance stays gathered."""
    visits = [[("a", 10)], [("b", 5)], [("a", 10)], [("c", 50)], [("b", 5)]]
    kwargs = dict(steady=True, prefetch_bucket=0, max_live=10**9)
    assert zero3.gathered_peak(visits, max_reuse_distance=0, **kwargs) == 50
    assert zero3.gathered_peak(visits, max_reuse_distance=15, **kwargs) == 50  # b: 60 away
    assert zero3.gathered_peak(visits, max_reuse_distance=100, **kwargs) == 5 + 50


def test_phases_name_their_parts():
    job = job_of("nbp_3b.yaml")
    mem = training_memory(job, Layout(tensor=2, data=16, zero_stage=3, micro_batch=2))
    parts = memory_phases(job, Layout(tensor=2, data=16, zero_stage=3, micro_batch=2))
    assert mem.total == max(mem.phases.values()) == mem.phases[mem.peak_phase]
    assert sum(mem.components().values()) == mem.total
    assert set(parts["forward_backward"]["temporary"]) >= {"gathered_parameters",
                                                           "gradient_bucket", "loss_logits"}
    assert mem.kv_cache == 2 * 32 * 1264 * 3072 // 2 * 2  # layers x k,v x S x d/tp x bf16


# -- time ---------------------------------------------------------------------------------------
def test_step_time_parts():
    job = job_of("nbp_1.2b.yaml")
    cluster = Cluster(gpus=16, gpu_mem_gib=80, intra_bw=200, inter_bw=20)
    inside = step_time(job, Layout(tensor=2, data=4, zero_stage=3), replace(cluster, gpus=8))
    across = step_time(job, Layout(tensor=2, data=8, zero_stage=3), cluster)
    assert step_time(job, Layout(tensor=1, data=16), cluster).tensor_parallel == 0
    assert inside.tensor_parallel > 0 and across.tensor_parallel > 0
    # per GPU the DP ring moves (dp-1)/dp of the (tp-sharded) model per collective
    ratio = across.data_parallel / inside.data_parallel
    # ... every micro step (ZeRO-3): 8 of them at dp 4, 4 at dp 8 (64 clips, micro batch 1)
    assert ratio == pytest.approx((7 / 8) / (3 / 4) * (200 / 20) / 2, rel=0.01)
    assert across.compute == pytest.approx(inside.compute / 2, rel=1e-6)
    off = step_time(job, Layout(tensor=2, data=8, zero_stage=3, offload_optimizer=True),
                    cluster)
    assert off.offload > 0 and across.offload == 0


def test_pipeline_stages_split_memory_and_add_a_bubble():
    """A pipeline's memory is its largest stage's: the stages' parameters add up to the
    model, 4 stages hold about a quarter each, and stage 0 keeps 4 micro-batches'
    activations in flight (1F1B) where the last keeps one; its step pays a bubble of
    (pp - 1) / A of the slowest stage's compute, which more micro-batches shrink."""
    job = job_of("nbp_3b.yaml")
    stages = job.shape.stages(4)
    assert sum(s.numel(1) for s in stages) == job.shape.total_params
    assert [s.layers for s in stages] == [7, 9, 9, 7]  # the ends also hold embedding / head
    assert max(s.numel(1) for s in stages) < 0.26 * job.shape.total_params
    layout = Layout(tensor=2, data=2, pipeline=4, zero_stage=1, micro_batch=1,
                    activation_checkpointing=False)
    flat = Layout(tensor=2, data=8, zero_stage=1, micro_batch=1, activation_checkpointing=False)
    piped, whole = training_memory(job, layout), training_memory(job, flat)
    assert piped.parameters == pytest.approx(whole.parameters / 4, rel=0.05)
    jobs = pipeline_stage_jobs(job, layout)
    assert [j.shape.in_flight for j in jobs] == [4, 3, 2, 1]
    one = replace(layout, pipeline=1)
    acts = [training_memory(j, one).phases["forward_backward"] for j in jobs]
    assert acts[0] > acts[-1]
    cluster = Cluster(gpus=16, gpu_mem_gib=80)
    t = step_time(job, layout, cluster)
    A = layout.accumulation(job.global_batch)  # 64 clips / (1 x dp 2) = 32
    assert t.pipeline_bubble == pytest.approx((t.compute + t.tensor_parallel) * 3 / A)
    assert t.pipeline_p2p > 0 and step_time(job, flat, cluster).pipeline_bubble == 0
    with pytest.raises(ValueError, match="pipeline engine trains with ZeRO 0 or 1"):
        training_memory(job, replace(layout, zero_stage=3))


def test_search_tries_pipelines_with_zero_0_or_1_and_enough_micro_batches():
    job = job_of("nbp_3b.yaml", "train.global_batch=16")
    plan = search(job, Cluster(gpus=32, gpu_mem_gib=80))
    piped = [o.layout for o in plan.options if o.layout.pipeline > 1]
    assert {lay.pipeline for lay in piped} == {2, 4, 8, 16}  # 32 stages: 16 micro-batches
    assert all(lay.zero_stage <= 1 for lay in piped)
    assert all(lay.accumulation(16) >= lay.pipeline for lay in piped)
    assert "tensor=1 pipeline=32" in plan.skipped  # 16 clips / dp 1: too few micro-batches


# -- the search and the CLI ---------------------------------------------------------------------
def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = plan_main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json_recommends_the_fastest_that_fits_with_margin(capsys):
    code, out, _ = run_cli(capsys, f"{CONFIGS}/nbp_3b.yaml", "--gpus", "16", "--gpu-mem", "40",
                           "--json")
    assert code == 0
    plan = json.loads(out)
    usable = (40 - 2.0) * GiB
    layouts, best = plan["layouts"], plan["recommended"]
    assert layouts and all(o["memory_bytes"]["total"] <= usable for o in layouts)
    safe = [o for o in layouts if o["memory_bytes"]["total"] <= usable * 0.9]
    assert best["step_seconds"]["total"] == min(o["step_seconds"]["total"] for o in safe)
    for o in layouts:
        lay = o["layout"]
        assert lay["tensor"] * lay["data"] * lay["pipeline"] == 16
        assert lay["pipeline"] == 1 or lay["zero_stage"] <= 1  # the pipeline engine: ZeRO 0-1
        assert lay["tensor"] <= 8 and 32 % lay["tensor"] == 0 and 64 % lay["data"] == 0
        assert o["memory_bytes"]["total"] == max(o["phases_bytes"].values())
    assert plan["tried"] > len(layouts)  # some did not fit 40 GiB


def test_cli_table(capsys):
    code, out, _ = run_cli(capsys, f"{CONFIGS}/nbp_1.2b.yaml", "model.grid=[3,16,16]",
                           "--gpus", "8", "--preset", "h100-80gb", "--top", "3")
    assert code == 0
    assert "tp  dp  pp zero" in out and "<- recommended" in out
    assert re.search(r"recommended: parallel\.tensor=\d+ parallel\.pipeline=1 ", out)
    assert "989.4 TFLOP/s" in out


def test_tensor_parallel_stays_in_a_node_and_divides_the_model(capsys):
    job = job_of("bench_100m.yaml", "train.global_batch=24")  # 12 heads
    plan = search(job, Cluster(gpus=24, gpu_mem_gib=80, node_gpus=8))
    assert {o.layout.tensor for o in plan.options} == {1, 2, 4}  # 3, 6, 8 do not split it
    assert "vocab_pad_multiple=128 is not divisible by 3" in plan.skipped["tensor=3"]
    assert "heads=12 is not divisible by 8" in plan.skipped["tensor=8"]
    small_nodes = search(job_of("nbp_1.2b.yaml"), Cluster(gpus=16, gpu_mem_gib=80,
                                                         node_gpus=4))
    assert max(o.layout.tensor for o in small_nodes.options) == 4


def test_bad_input_says_what_is_wrong(capsys):
    code, _, err = run_cli(capsys, f"{CONFIGS}/nbp_1.2b.yaml", "--gpus", "12", "--gpu-mem",
                           "80")
    assert code == 1 and "--gpus 12 is not a multiple of --node-gpus 8" in err
    code, out, _ = run_cli(capsys, f"{CONFIGS}/nbp_1.2b.yaml", "--gpus", "48", "--gpu-mem",
                           "80", "--json")  # 64 clips: dp 48, 24 and 6 do not divide ...
    assert code == 0 and json.loads(out)["recommended"]["layout"]["pipeline"] % 3 == 0  # ...
    code, _, err = run_cli(capsys, f"{CONFIGS}/nbp_1.2b.yaml", "train.global_batch=1",
                           "--gpus", "16", "--gpu-mem", "80")  # one clip: no dp, no pipeline
    assert code == 1 and "no parallel layout of 16 GPUs" in err and "global_batch=1" in err
    assert "fewer than 2 micro-batches" in err
    code, _, err = run_cli(capsys, f"{CONFIGS}/nbp_1.2b.yaml", "model.nope=1", "--gpus", "8",
                           "--gpu-mem", "80")
    assert code == 1 and "nope" in err
    with pytest.raises(SystemExit):
        plan_main([f"{CONFIGS}/nbp_1.2b.yaml", "--gpus", "8"])  # no --gpu-mem, no preset
    with pytest.raises(ConfigError, match="efficiency"):
        search(job_of("nbp_1.2b.yaml"), Cluster(gpus=8, gpu_mem_gib=80, efficiency=0))


def test_nothing_fits_names_what_was_tried_and_the_smallest_need(capsys):
    code, out, err = run_cli(capsys, f"{CONFIGS}/nbp_14b.yaml", "--gpus", "2", "--gpu-mem",
                             "16")
    assert code == 1 and "0 of" in out
    assert "no layout fits 16 GiB per GPU" in err and "tried" in err
    need = float(re.search(r"the smallest needs ([\d.]+) GiB", err).group(1))
    job = job_of("nbp_14b.yaml")
    smallest = min(training_memory(job, lay).total for lay in (
        Layout(tensor=t, data=2 // t, zero_stage=3, offload_optimizer=True, micro_batch=1,
               activation_checkpointing=True) for t in (1, 2)))
    assert need == pytest.approx(smallest / GiB, abs=0.06) and need > 14
    assert math.isfinite(need)
