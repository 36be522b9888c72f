"""Tensor parallelism for trained models: reading, loading and sampling.

One real run trains 2 steps at tp=2 x dp=2 with ZeRO-3 on 4 gloo ranks: the checkpoint layout
DeepSpeed's zero_to_fp32 refuses. Its weights gather to exactly what DeepSpeed gathers from
each TP rank's files alone, merged by an independent (name-based) rule; it loads at TP=1 and
at TP=2 with the validation loss the run logged; TP=2 sampling on 2 ranks gives the TP=1
tokens on every rank; a partial checkpoint is refused naming its missing or broken file.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch

from nbp_mega.generate import SamplingConfig, generate
from nbp_mega.generate.load import load_trained_model, resolve_checkpoint
from nbp_mega.metrics import read_metrics
from nbp_mega.model import NBPTransformer
from nbp_mega.parallel.layers import TensorParallel
from nbp_mega.parallel.tp_shards import ShardError, TPPlan
from nbp_mega.parallel.zero_checkpoint import CheckpointError, TrainingCheckpoint
from tests.conftest import tiny_model_config
from tests.generate.test_load import validation_loss
from tests.spawn import run_distributed

pytestmark = pytest.mark.distributed

STEP = "step_00000002"
SAMPLINGS = {"greedy": SamplingConfig(temperature=0.0),
             "top_k_top_p": SamplingConfig(top_k=8, top_p=0.9, temperature=1.0)}
SEEDS, LABELS = [3, 4, 5], [0, 1, 2]
# An untrained model beside the trained one: llama MLP (a gated column), non-raster blocks.
RANDOM_MODEL = dict(family="llama", position="rope_3d", block_shape=[2, 2, 2], num_classes=3)


def logged_val_loss(run_dir) -> float:
    return read_metrics(os.path.join(run_dir, "metrics.jsonl"))[1][-1]["val_loss"]


def sample_all(model) -> dict[str, torch.Tensor]:
    return {name: generate(model, seeds=SEEDS, labels=torch.tensor(LABELS), sampling=s)
            for name, s in SAMPLINGS.items()}


def random_model(dims) -> NBPTransformer:
    torch.manual_seed(0)
    cfg = tiny_model_config(**RANDOM_MODEL)
    return NBPTransformer(cfg, TensorParallel(dims, init_std=0.2)).eval()


# --- the oracle: DeepSpeed on each TP rank's files alone, TP shards merged by name -------

SPLIT_BY_NAME = [(r"\.(qkv|fc|gate)\.linear\.(weight|bias)$", 0),
                 (r"\.proj\.linear\.weight$", 1), (r"^(tok_emb\.weight|head\.linear\.weight)$", 0)]


def deepspeed_per_tp_rank(checkpoint, tp: int, tmp_path) -> list[dict]:
    """zero_to_fp32 on a folder of links to one TP rank's files, for each TP rank."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = []
    for t in range(tp):
        folder = tmp_path / f"tp_rank_{t}" / "tag"
        folder.mkdir(parents=True)
        for f in checkpoint.glob(f"*mp_rank_{t:02d}_*.pt"):
            (folder / f.name).symlink_to(f)
        out.append(get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag="tag"))
    return out


def merge_by_name(shards: list[dict]) -> dict:
    full = {}
    for name, first in shards[0].items():
        dim = next((d for pattern, d in SPLIT_BY_NAME if re.search(pattern, name)), None)
        if dim is None:
            assert all(torch.equal(s[name], first) for s in shards), name
            full[name] = first
        else:
            full[name] = torch.cat([s[name] for s in shards], dim=dim)
    return full


def test_tp2_zero3_checkpoint_gathers_to_deepspeeds_weights(tp2_run, dims, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = tp2_run / "checkpoints" / STEP
    with pytest.raises(ValueError, match=r"Expected 2 of '\*_optim_states.pt'.*found 4 files"):
        get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=STEP)
    per_rank = deepspeed_per_tp_rank(checkpoint, 2, tmp_path)
    ckpt = TrainingCheckpoint(str(checkpoint))
    assert (ckpt.layout.tp, ckpt.layout.dp, ckpt.layout.zero_stage) == (2, 2, 3)
    for t, expected in enumerate(per_rank):
        ours = {k: v for k, v in ckpt.rank_state_dict(t).items() if torch.is_tensor(v)}
        assert ours.keys() == expected.keys()
        assert all(torch.equal(ours[k], expected[k]) for k in expected), t
    cfg, _ = resolve_checkpoint(str(tp2_run))
    model = NBPTransformer(cfg.model, TensorParallel(dims))
    full = ckpt.full_state_dict(TPPlan.of(model))
    expected = merge_by_name(per_rank)
    tensors = {k: v for k, v in full.items() if torch.is_tensor(v)}
    assert tensors.keys() == expected.keys()
    for name in expected:
        assert torch.equal(tensors[name], expected[name]), name
    assert full["tok_emb.weight"].shape[0] == 2 * per_rank[0]["tok_emb.weight"].shape[0]


def test_tp2_checkpoint_loads_at_tp1_with_the_logged_val_loss(tp2_run, dims):
    model, cfg = load_trained_model(str(tp2_run), dims=dims)
    assert model.tp_size == 1
    assert validation_loss(model, cfg) == pytest.approx(logged_val_loss(tp2_run), rel=1e-5)


# --- TP=2 on 2 ranks against TP=1 in this process ------------------------------------------

def _tp2_worker(run_dir: str, random_state: str) -> dict:
    from nbp_mega.parallel.dims import ParallelConfig, init_parallel, shutdown_parallel

    dims = init_parallel(ParallelConfig(tensor=2))
    model, cfg = load_trained_model(run_dir, dims=dims)
    out = {"val_loss": validation_loss(model, cfg), "trained": sample_all(model)}
    # loaded from the rank's own files; the same cut from the merged tensors (other tp sizes)
    ckpt, plan = TrainingCheckpoint(os.path.join(run_dir, "checkpoints", STEP)), TPPlan.of(model)
    own = ckpt.shard_state_dict(plan, 2, dims.tp_rank)
    out["cut_equals_own"] = all(
        torch.equal(plan.split_tensor(n, ckpt.tensor(n, plan), 2, dims.tp_rank), own[n])
        for n in plan.dims)
    rand = random_model(dims)
    rand.load_state_dict(TPPlan.of(rand).split(torch.load(random_state), 2, dims.tp_rank))
    out["random"] = sample_all(rand)
    out["tp"] = model.tp_size
    shutdown_parallel()
    return out


@pytest.fixture(scope="module")
def tp2_job(tp2_run, dims, tmp_path_factory):
    """TP=1 references made here, the same done at TP=2 on 2 ranks: (reference, per rank)."""
    trained, _ = load_trained_model(str(tp2_run), dims=dims)
    rand = random_model(dims)
    path = str(tmp_path_factory.mktemp("random") / "full.pt")
    torch.save(rand.state_dict(), path)
    reference = {"trained": sample_all(trained), "random": sample_all(rand)}
    return reference, run_distributed(_tp2_worker, 2, (str(tp2_run), path), timeout=300)


def test_tp2_checkpoint_loads_at_tp2_with_the_logged_val_loss(tp2_run, tp2_job):
    _, ranks = tp2_job
    for rank in ranks:
        assert rank["tp"] == 2 and rank["cut_equals_own"]
        assert rank["val_loss"] == pytest.approx(logged_val_loss(tp2_run), rel=1e-5)


@pytest.mark.parametrize("model", ["trained", "random"])
@pytest.mark.parametrize("sampling", list(SAMPLINGS))
def test_tp2_sampling_gives_the_tp1_tokens_on_every_rank(tp2_job, model, sampling):
    reference, ranks = tp2_job
    expected = reference[model][sampling]
    assert expected.unique().numel() > 1  # not a degenerate clip of one id
    for r, rank in enumerate(ranks):
        assert torch.equal(rank[model][sampling], expected), (r, model, sampling)


# --- the merge rule, and checkpoints that are not whole -------------------------------------

def test_plan_takes_split_dims_from_the_layer_types(dims):
    model = random_model(dims)
    plan = TPPlan.of(model)
    layer = "layers.0"
    assert plan.dims[f"{layer}.attn.qkv.linear.weight"] == 0  # column-parallel
    assert plan.dims[f"{layer}.mlp.gate.linear.weight"] == 0
    assert plan.dims[f"{layer}.attn.proj.linear.weight"] == 1  # row-parallel
    assert plan.dims["tok_emb.weight"] == 0 and plan.dims["head.linear.weight"] == 0
    assert plan.dims[f"{layer}.norm1.weight"] is None
    full = model.state_dict()
    halves = [plan.split(full, 2, r) for r in range(2)]
    assert halves[1]["head.linear.weight"].shape[0] == full["head.linear.weight"].shape[0] // 2
    merged = plan.merge(halves)
    assert all(torch.equal(merged[k], v) for k, v in full.items() if torch.is_tensor(v))
    other = TPPlan.of(NBPTransformer(tiny_model_config(**RANDOM_MODEL, hidden=64),
                                     TensorParallel(dims)))
    with pytest.raises(ShardError, match=r"tok_emb.weight .*expects \(64, 64\)"):
        other.merge(halves)


@pytest.fixture
def copied_run(tp2_run, tmp_path):
    shutil.copytree(tp2_run, tmp_path / "run", ignore=shutil.ignore_patterns("tensorboard"))
    return tmp_path / "run"


def test_a_missing_rank_file_is_named(copied_run, dims):
    (copied_run / "checkpoints" / STEP / "zero_pp_rank_1_mp_rank_01_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"missing zero_pp_rank_1_mp_rank_01_optim_states"
                       r"\.pt\. A complete ZeRO-3 fp32, tp=2 x dp=2 checkpoint has 8 files"):
        load_trained_model(str(copied_run), dims=dims)


@pytest.mark.parametrize("name", ["zero_pp_rank_1_mp_rank_01_model_states.pt",
                                  "zero_pp_rank_0_mp_rank_01_optim_states.pt"])
def test_a_truncated_file_is_named(copied_run, dims, name):
    path = copied_run / "checkpoints" / STEP / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)} \(.* bytes\) cannot be read"):
        load_trained_model(str(copied_run / "checkpoints" / STEP), dims=dims)


def test_a_missing_checkpoint_is_named(copied_run, dims):
    with pytest.raises(FileNotFoundError, match=rf"no checkpoint step_00000009 .*holds: .*{STEP}"):
        load_trained_model(str(copied_run), "step_00000009", dims=dims)
