"""Which implementation block_causal_attention uses, its fallbacks, `--info`, the FlexAttention
predicate (that the extension was built at all: test_extension_present.py).

Legend: B batch; N heads; S sequence; D head dim; L block length; P prefix length.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import nbp_mega.ops as ops
from nbp_mega.ops import block_causal_attention, fused, use_attention_impl
from nbp_mega.ops.flex import flex_block_causal_attention
from nbp_mega.ops.reference import dense_block_causal_attention
from tests.ops.attention_cases import qkv


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not fused.AVAILABLE, reason="nbp_mega._C is not built")
@pytest.mark.parametrize("impl", ["auto", "fused"])
def test_default_runs_the_cpu_kernel_on_the_cpu(monkeypatch, impl):
    monkeypatch.delenv("NBP_ATTENTION_IMPL", raising=False)
    assert ops._select() == "auto"
    calls = []
    kernel = fused.fused_attention
    monkeypatch.setattr(fused, "fused_attention", lambda *a, **kw: calls.append(1) or kernel(
        *a, **kw))
    q, k, v = qkv(40)
    with use_attention_impl(impl):
        out = block_causal_attention(q, k, v, 8, 2)
    assert calls == [1]
    torch.testing.assert_close(out, dense_block_causal_attention(q, k, v, 8, 2))


def test_cuda_default_is_not_the_unverified_kernel():
    # Until the gpu tests have passed on hardware (README), CUDA goes to FlexAttention.
    assert ops.CUDA_KERNEL_BY_DEFAULT is False
    expected = "flex" if ops._flex.AVAILABLE else "block_loop"
    assert ops.auto_choice("cuda") == expected and ops.auto_choice("cpu") == "fused"
    with use_attention_impl("auto"):
        assert ops.describe()["routes"]["cuda"] == expected
    with use_attention_impl("fused"):
        assert ops.describe()["routes"]["cuda"].startswith(
            "fused CUDA kernel" if fused.CUDA_COMPILED else expected)


def test_fused_hands_unsupported_inputs_over_and_says_so(caplog):
    q, k, v = qkv(40, dtype=torch.float64)  # the CPU kernel takes no float64
    with caplog.at_level(logging.INFO, logger="nbp_mega.ops"), use_attention_impl("fused"):
        out = block_causal_attention(q, k, v, 8, 2)
    assert "using block_loop" in caplog.text
    torch.testing.assert_close(out, dense_block_causal_attention(q, k, v, 8, 2))


def test_info_reports_backends_and_choice():
    run = run_python("import runpy; runpy.run_module('nbp_mega.ops', run_name='__main__')",
                     NBP_ATTENTION_IMPL="")
    assert run.returncode != 0 and "pass --info" in run.stderr  # no flag: a usage error
    run = subprocess.run([sys.executable, "-m", "nbp_mega.ops", "--info"], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, NBP_ATTENTION_IMPL=""))
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["extension"]["built"] == fused.AVAILABLE
    assert info["selected"] == "auto" and info["cuda_kernel_by_default"] is False
    if fused.AVAILABLE:
        assert info["extension"]["cpu"]["isa"] in ("avx512", "avx2", "generic")
        assert info["routes"]["cpu"] == "fused CPU kernel"


def test_without_the_extension_the_pure_pytorch_path_runs_and_says_so():
    code = ("import sys; sys.modules['nbp_mega._C'] = None\n"  # makes `import nbp_mega._C` fail
            "import json, torch, nbp_mega.ops as ops\n"
            "q = k = v = torch.randn(1, 2, 10, 4)\n"
            "ops.block_causal_attention(q, k, v, 2)\n"
            "print(json.dumps(ops.describe()))")
    run = run_python(code, NBP_ATTENTION_IMPL="")
    assert run.returncode == 0, run.stderr
    assert "nbp_mega._C is not available" in run.stderr  # the logged warning
    info = json.loads(run.stdout.splitlines()[-1])
    assert info["selected"] == "auto" and info["extension"]["built"] is False
    assert info["routes"]["cpu"] == "block_loop"


@pytest.mark.parametrize("S,L,P,q_offset,sq", [(97, 16, 3, 0, None), (60, 5, 0, 0, None),
                                                (80, 16, 2, 50, 30)])
def test_flex_mask_predicate_forward_on_cpu(S, L, P, q_offset, sq):
    q, k, v = (t.detach() for t in qkv(S, sq=sq))  # FlexAttention has no CPU backward
    out = flex_block_causal_attention(q, k, v, L, P, q_offset)
    torch.testing.assert_close(out, dense_block_causal_attention(q, k, v, L, P, q_offset),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not fused.AVAILABLE, reason="nbp_mega._C is not built")
@pytest.mark.parametrize("sq, L, P, q_offset, sk, end", [
    (1, 1, 0, 40, 64, 41),     # NTP step: one token sees the cache and itself
    (8, 8, 2, 34, 64, 42),     # a row block of 8 after a 2-token prefix
    (3, 8, 2, 34, 64, 42),     # part of a block (the hybrid start's rows are whole blocks)
    (2, 8, 4, 0, 64, 4),       # inside the prefix: the prefix only
    (8, 8, 0, 56, 64, 64),     # the last block: its end is the last key
], ids=["ntp", "row", "part", "prefix", "last"])
def test_one_block_of_queries_sees_one_range_of_keys(monkeypatch, sq, L, P, q_offset, sk,
                                                     end):
    """Queries within one block all see keys [0, end). `auto` on the CPU gives a step of
    1-token blocks (NTP) to SDPA without a mask (no kernel call), longer blocks to the kernel
    (faster there, measured); both match the dense reference."""
    assert ops.one_block_keys(sq, L, P, q_offset) == end
    q, k, v = qkv(sk)
    q = q[:, :, q_offset:q_offset + sq]
    calls = []
    kernel = fused.fused_attention
    monkeypatch.setattr(fused, "fused_attention", lambda *a, **kw: calls.append(1) or kernel(
        *a, **kw))
    with use_attention_impl("auto"):
        out = block_causal_attention(q, k, v, L, P, q_offset)
    assert calls == ([] if L == 1 else [1])
    torch.testing.assert_close(out, dense_block_causal_attention(q, k, v, L, P, q_offset),
                               rtol=1e-5, atol=1e-6)
    assert ops.one_block_keys(9, 8, 2, 34) is None and ops.one_block_keys(4, 8, 2, 0) is None
