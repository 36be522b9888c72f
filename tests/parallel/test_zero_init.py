"""Built already partitioned (parallel.zero_stage=3: deepspeed.zero.Init over the
data-parallel group): each rank holds 1/dp of every parameter, and the gathered values are
exactly those of the ordinary build for the same seed, at TP=2 x DP=2 (4 gloo ranks; the
default layout, TP=1 x DP=2, builds this way in every ZeRO-3 training test)."""

from __future__ import annotations

import pytest
import torch

from tests.spawn import run_distributed

pytestmark = pytest.mark.distributed
MODEL = ["model.layers=2", "model.hidden=32", "model.heads=4", "model.grid=[2,4,8]",
         "model.block_shape=[1,1,8]", "model.vocab_size=32", "model.num_classes=4",
         "model.vocab_pad_multiple=16"]


def _build_worker(tp: int, family: str) -> dict:
    import deepspeed

    from nbp_mega.config import load_config
    from nbp_mega.model import NBPTransformer
    from nbp_mega.parallel.deepspeed import partitioned_build
    from nbp_mega.parallel.dims import init_parallel, shutdown_parallel
    from nbp_mega.parallel.layers import TensorParallel
    from nbp_mega.parallel.tp_shards import param_shape
    from tests.test_train import ROOT

    cfg = load_config(f"{ROOT}/configs/tiny.yaml", [*MODEL, f"model.family={family}",
                                                     f"parallel.tensor={tp}",
                                                     "parallel.zero_stage=3"])
    dims = init_parallel(cfg.parallel)
    tp_layers = TensorParallel(dims, init_std=cfg.model.init_std)
    torch.manual_seed(cfg.seed)
    plain = NBPTransformer(cfg.model, tp_layers)
    torch.manual_seed(cfg.seed)
    with partitioned_build(cfg, dims):
        model = NBPTransformer(cfg.model, tp_layers)
    out = {"held": {}, "equal": {}}
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        out["held"][name] = (p.ds_tensor.numel(), param_shape(p).numel(), p.numel())
        with deepspeed.zero.GatheredParameters([p]):
            out["equal"][name] = torch.equal(p.data, q.data)
    shutdown_parallel()
    return out


@pytest.mark.parametrize("tp,family", [(2, "llama")])  # dp 2 inside each TP group
def test_partitioned_build_holds_a_part_and_gathers_to_the_plain_weights(tp, family):
    world = 2 * tp  # dp = 2
    for rank, out in enumerate(run_distributed(_build_worker, world, (tp, family))):
        assert all(out["equal"].values()), (rank, [k for k, v in out["equal"].items()
                                                   if not v])
        for name, (held, full, visible) in out["held"].items():
            assert visible == 0 and held == -(-full // 2), (rank, name)  # ceil(numel / dp)
