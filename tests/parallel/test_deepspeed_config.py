"""The generated DeepSpeed JSON: gloo-specific defaults, and the config's raw keys win."""

from __future__ import annotations

import os

from tests.spawn import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _zero_sections():
    from nbp_mega.config import load_config
    from nbp_mega.parallel.deepspeed import deepspeed_config
    from nbp_mega.parallel.dims import ParallelConfig, init_parallel, shutdown_parallel

    dims = init_parallel(ParallelConfig(tensor=1))  # gloo: there is no GPU
    tiny = f"{ROOT}/configs/tiny.yaml"
    out = {name: deepspeed_config(load_config(tiny, overrides), dims)["zero_optimization"]
           for name, overrides in {
               "z3": ["parallel.zero_stage=3"],
               "z2": ["parallel.zero_stage=2"],
               "z3_user": ["parallel.zero_stage=3",
                           "deepspeed.zero_optimization.reduce_scatter=true"]}.items()}
    shutdown_parallel()
    return out


def test_zero3_on_gloo_averages_gradients_by_all_reduce():
    (zero,) = run_distributed(_zero_sections, 1)
    assert zero["z3"] == {"stage": 3, "reduce_scatter": False}
    assert "reduce_scatter" not in zero["z2"]  # measured for stage 3 only
    assert zero["z3_user"]["reduce_scatter"] is True  # `deepspeed:` keys override ours
