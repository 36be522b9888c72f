"""The sampler draws from filter_logits' distribution (temperature, top-k, then top-p over the
survivors) by an inverse CDF, never picks a token of probability 0, and a row's tokens depend
on its own generator only. (tests/generate/test_engine.py checks the filters and the sampler
inside whole generations.)

Legend: B batch; L positions of a step; V vocabulary; N points of a uniform grid.
"""

from __future__ import annotations

import pytest
import torch

from nbp_mega.generate.sampling import SamplingConfig, draw, filter_logits, sample
from nbp_mega.ops import fused

# both implementations of `draw`: the CPU kernel (csrc/cpu/sampling_cpu.cpp) and PyTorch ops
KERNELS = [pytest.param("cpu_kernel", marks=pytest.mark.skipif(
    not fused.AVAILABLE, reason="nbp_mega._C is not built")), "torch"]

CONFIGS = {
    "paper-like": SamplingConfig(top_k=50, top_p=0.8),
    "top-k only, hot": SamplingConfig(temperature=1.7, top_k=30, top_p=1.0),
    "top-p only, cold": SamplingConfig(temperature=0.6, top_k=0, top_p=0.7),
    "k >= V": SamplingConfig(top_k=500, top_p=0.9),
    "unfiltered": SamplingConfig(temperature=0.8, top_k=0, top_p=1.0),
}


def grid_draws(logits: torch.Tensor, cfg: SamplingConfig, kernel: str,
               n: int = 4001) -> torch.Tensor:
    """logits [R, V] -> [R, N] the tokens `draw` picks at uniforms (i + 1/2) / N."""
    uniform = ((torch.arange(n) + 0.5) / n).expand(logits.shape[0], n)
    return draw(logits[:, None].expand(-1, n, -1), cfg, uniform, kernel=kernel)


def assert_inverse_cdf_of(ids: torch.Tensor, probs: torch.Tensor) -> None:
    """ids [R, N] on a uniform grid come from an inverse CDF of probs [R, V]: each token's
    uniforms form one interval (whatever the order of the tokens) as long as its probability
    (within one grid point), and no token of probability 0 is ever drawn."""
    n = ids.shape[1]
    counts = torch.stack([torch.bincount(row, minlength=probs.shape[1]) for row in ids])
    assert (counts[probs == 0] == 0).all(), "a filtered token was drawn"
    assert (counts - probs * n).abs().max() <= 1.01, (counts - probs * n).abs().max()
    for row in ids:  # one run per token drawn
        assert 1 + (row[1:] != row[:-1]).sum() == row.unique().numel()


def logits_of(kind: str) -> torch.Tensor:
    """[3, 200] logits, 20 padded ids at -inf. spread: distinct probabilities; flat: all
    within one bin of the nucleus search; clustered: 40 near-equal tokens after 3 larger ones,
    where the nucleus ends (inside one bin, with weight in the bins before it)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 200) * (1e-4 if kind == "flat" else 2.0)
    if kind == "clustered":
        logits[:, :3] = torch.tensor([3.0, 2.5, 2.0])
        logits[:, 3:43] = 1 + 1e-4 * torch.randn(3, 40)
        logits[:, 43:] -= 6
    logits[:, 180:] = float("-inf")  # padded ids, as model.logits leaves them
    return logits


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("kind", ["spread", "flat", "clustered"])
def test_draw_is_an_inverse_cdf_of_the_filtered_distribution(name, kind, kernel):
    cfg, logits = CONFIGS[name], logits_of(kind)
    probs = filter_logits(logits, cfg).softmax(dim=-1)
    assert_inverse_cdf_of(grid_draws(logits, cfg, kernel), probs)


@pytest.mark.parametrize("kernel", KERNELS)
def test_top_p_is_taken_over_the_top_k_survivors(kernel):
    # top-3 renormalised: 0.4, 0.333, 0.267; top-p 0.6 keeps two of them (over all five
    # tokens it would keep three: 0.30 + 0.25 < 0.6)
    logits = torch.tensor([[0.30, 0.25, 0.20, 0.15, 0.10]]).log()
    ids = grid_draws(logits, SamplingConfig(top_k=3, top_p=0.6), kernel)
    assert_inverse_cdf_of(ids, torch.tensor([[0.4, 1 / 3, 0, 0, 0]]) / (0.4 + 1 / 3))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", CONFIGS)
def test_never_a_token_of_probability_zero_even_at_the_end_of_the_cdf(name, kernel):
    logits = torch.tensor([2.0, 1.0, float("-inf"), 0.5, float("-inf"), float("-inf")])
    logits = logits.view(1, 1, 6).expand(1, 2, 6)
    # u = 1: u * total equals the total (rand's largest draw can round up to it)
    ids = draw(logits, CONFIGS[name], torch.ones(1, 2), kernel=kernel)
    kept = filter_logits(logits, CONFIGS[name])  # top-p drops the 0.5 in two configs
    assert torch.isfinite(kept.gather(-1, ids[..., None])).all(), ids


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_cdf_walk_across_chunks_ends_at_the_last_kept_token(kernel):
    # 3 kept tokens in a row of 2000 (the kernel walks chunks of 256 ids): each uniform falls on
    # its token's share, and u = 1 on the last kept token, never a later, empty chunk's
    logits = torch.full((1, 1, 2000), float("-inf"))
    logits[0, 0, [5, 300, 700]] = 0.0
    uniform = torch.tensor([[0.1, 0.5, 0.9, 1.0]])
    ids = draw(logits.expand(1, 4, 2000), SamplingConfig(top_k=0, top_p=1.0), uniform,
               kernel=kernel)
    assert ids.tolist() == [[5, 300, 700, 700]]


def test_a_row_depends_only_on_its_own_generator():
    torch.manual_seed(1)
    logits = torch.randn(8, 16, 1000)
    cfg = SamplingConfig(top_k=300, top_p=0.9)
    batch = sample(logits, cfg, [torch.Generator().manual_seed(s) for s in range(8)])
    alone = sample(logits[3:4], cfg, [torch.Generator().manual_seed(3)])
    assert torch.equal(batch[3:4], alone)
    other = sample(logits[3:4], cfg, [torch.Generator().manual_seed(99)])
    assert not torch.equal(other, alone)  # the seed matters


def test_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([1.5, 1.0, 0.4, 0.3, -0.5, float("-inf")]).view(1, 1, 6)
    cfg = SamplingConfig(temperature=1.5, top_k=4, top_p=0.8)
    ids = sample(logits.expand(1, 20000, 6), cfg, [torch.Generator().manual_seed(0)])
    freq = torch.bincount(ids.flatten(), minlength=6).float() / ids.numel()
    expected = filter_logits(logits, cfg).softmax(dim=-1).flatten()
    assert expected[3:].sum() == 0 and expected[2] > 0.15  # the filters do cut here
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_greedy_takes_the_most_likely_token_and_draws_nothing():
    logits = torch.randn(2, 5, 40)
    gen = torch.Generator().manual_seed(0)
    ids = sample(logits, SamplingConfig(temperature=0.0), [gen, gen])
    assert torch.equal(ids, logits.argmax(dim=-1))
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())


needs_kernel = pytest.mark.skipif(not fused.AVAILABLE, reason="nbp_mega._C is not built")


def paper_scale(kind: str) -> tuple[torch.Tensor, SamplingConfig]:
    """[2, 64000] logits (the paper's vocabulary) whose top-k and top-p cuts fall among tokens
    of visible probability. distinct: all 64000 in one bin of the kernel's first radix level
    (1 + i 2^-23, shuffled; every level of the select runs); spread: 40 tokens well above
    63960 random ones."""
    torch.manual_seed(2)
    V = 64000
    if kind == "distinct":
        logits = torch.stack([1 + torch.randperm(V).float() * 2.0 ** -23 for _ in range(2)])
        return logits, SamplingConfig(temperature=2e-5, top_k=30, top_p=0.6)
    logits = torch.randn(2, V)
    logits[:, torch.randperm(V)[:40]] = 8 + torch.randn(2, 40)
    return logits, SamplingConfig(temperature=1.0, top_k=25, top_p=0.9)


@needs_kernel
@pytest.mark.parametrize("kind", ["distinct", "spread"])
def test_the_kernel_draws_the_filtered_distribution_at_the_papers_vocabulary(kind):
    logits, cfg = paper_scale(kind)
    probs = filter_logits(logits.double(), cfg).softmax(dim=-1).float()
    assert 10 < (probs > 0).sum(dim=1).min() < cfg.top_k  # top-p cut inside top-k's
    assert_inverse_cdf_of(grid_draws(logits, cfg, "cpu_kernel", n=1001), probs)


@needs_kernel
def test_the_kernels_top_k_keeps_the_lowest_ids_of_a_tie():
    logits = torch.zeros(1, 1, 1000)
    ids = draw(logits.expand(1, 300, 1000), SamplingConfig(top_k=3, top_p=1.0),
               ((torch.arange(300) + 0.5) / 300)[None], kernel="cpu_kernel")
    assert torch.equal(torch.bincount(ids.flatten(), minlength=4), torch.tensor([100] * 3 + [0]))


@needs_kernel
def test_the_kernel_refuses_rows_it_cannot_sample():
    cfg, u = SamplingConfig(), torch.rand(1, 3)
    logits = torch.randn(1, 3, 100)
    logits[0, 1, 7] = float("nan")
    with pytest.raises(ValueError, match="row 1 of the logits holds NaN"):
        draw(logits, cfg, u, kernel="cpu_kernel")
    logits[0, 1] = float("-inf")
    with pytest.raises(ValueError, match="row 1 has no finite largest logit"):
        draw(logits, cfg, u, kernel="cpu_kernel")
    op = torch.ops.nbp_mega.sample_rows
    with pytest.raises(ValueError, match=r"uniform must be \[R\] = \[3\]"):
        op(torch.randn(3, 100), torch.rand(2), 10, 0.9, 1.0)
    with pytest.raises(ValueError, match="need 0 < top_p <= 1"):
        op(torch.randn(3, 100), torch.rand(3), 10, 0.0, 1.0)
    with pytest.raises(TypeError, match="logits must be float32"):
        op(torch.randn(3, 100).double(), torch.rand(3), 10, 0.9, 1.0)
    with pytest.raises(ValueError, match="kernel='cuda'"):
        draw(logits, cfg, u, kernel="cuda")
