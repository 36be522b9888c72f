"""Tensor parallelism: TP=2 gives the loss and gradients of TP=1 for the same weights."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_model_config
from tests.spawn import run_distributed

VARIANTS = [dict(family="gpt", position="learned_1d"), dict(family="llama", position="rope_3d")]


def _loss_and_grads(tp_size: int, state_path: str, save_state: bool):
    """One forward/backward at `tp_size`; returns (loss, full gradients) on rank 0."""
    from nbp_mega.model import NBPTransformer
    from nbp_mega.parallel.dims import ParallelConfig, init_parallel, shutdown_parallel
    from nbp_mega.parallel.layers import TensorParallel, gather_tp_state, shard_tp_state

    dims = init_parallel(ParallelConfig(tensor=tp_size))
    results = {}
    for i, variant in enumerate(VARIANTS):
        torch.manual_seed(i)
        cfg = tiny_model_config(num_classes=3, heads=4, **variant)
        tp = TensorParallel(dims, init_std=cfg.init_std)
        model = NBPTransformer(cfg, tp)
        path = f"{state_path}.{i}"
        if save_state:
            if dims.rank == 0:
                torch.save(gather_tp_state(model, tp), path)
        else:
            model.load_state_dict(shard_tp_state(model, torch.load(path), tp))
        g = torch.Generator().manual_seed(123)
        tokens = torch.randint(0, cfg.vocab_size, (3, *cfg.grid), generator=g)
        labels = torch.randint(0, 3, (3,), generator=g)
        loss = model(*model.layout.build(tokens, labels)).mean()
        loss.backward()
        grads = gather_tp_state(model, tp, {n: p.grad for n, p in model.named_parameters()})
        results[variant["family"]] = (loss.item(), grads)
    shutdown_parallel()
    return results


@pytest.mark.distributed
def test_tp2_matches_tp1(tmp_path):
    state = str(tmp_path / "full_state.pt")
    (ref,) = run_distributed(_loss_and_grads, 1, (1, state, True))
    tp2 = run_distributed(_loss_and_grads, 2, (2, state, False))
    for family, (loss1, grads1) in ref.items():
        for rank_result in tp2:
            loss2, grads2 = rank_result[family]
            assert abs(loss1 - loss2) <= 1e-5, family
            assert grads1.keys() == grads2.keys()
            for name in grads1:
                torch.testing.assert_close(grads2[name], grads1[name], atol=1e-5, rtol=1e-5,
                                           msg=lambda m, n=name, f=family: f"{f} {n}: {m}")
