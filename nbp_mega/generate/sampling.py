"""Sampling one token per position, vectorised over the batch and the block.

Legend: B batch; L block length (positions of a step); V vocabulary; k top-k candidates;
R = B * L rows (positions); n candidates of a row (k, or V without top-k).

Reproducible per sample: each sample draws from its own generator, seeded by its own seed, one
[L] uniform draw per step, so its tokens depend only on its seed and its conditioning, never
on the batch size or its place in the batch. Defaults are the paper's: top-k 16000, top-p 0.9,
temperature 1.

The distribution is `filter_logits`' (the specification and the tests' oracle): temperature,
then the k most likely tokens, then top-p over those survivors (renormalised). `draw` samples
it by an inverse CDF at one uniform per position, without sorting anything of size V or k,
two ways:
- on the CPU, nbp_mega._C's `sample_rows` (csrc/cpu/sampling_cpu.cpp): per row, on one of
  torch's threads, a floor under the k-th largest logit guessed from every 32nd token, one
  vectorised pass keeping the tokens above it, a radix select of the k-th among those,
  vectorised weights, a histogram of their mass over log-spaced bins to find the bin where
  the nucleus ends (only that bin is sorted), and the CDF summed in double (chunk masses
  find the chunk where it passes u; that chunk is walked token by token);
- elsewhere (and where the extension is not built) PyTorch ops: `topk(sorted=False)` selects
  the candidates, the same log-spaced histogram (index_add_) finds the nucleus' bin, and only
  the few candidates in that bin are ordered to find the exact cut.
Either runs its CDF over the candidates in a fixed order that depends on the row's logits
alone, so a seed gives the same tokens at any batch size; the two orders differ, so the two
paths give different tokens for one seed (each follows the distribution). Where filter_logits'
sort keeps some of several tokens tied at the nucleus' last weight, both keep them all; float
sums in another order can move a token exactly at the top-p boundary (on CUDA the bin sums use
atomics); of tokens tied at the k-th logit the kernel keeps the lowest ids.
Measured (.notes/bench_generation_2026-12-07b.json, V = 64000, 16 positions, 2 threads): the
kernel 8.7x (batch 1: 0.95 ms) and 12.2x (batch 8: 6.2 ms) faster than the PyTorch path, 44x
and 56x the first sampler (a full sort of V).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nbp_mega.config_fields import ConfigError, option
from nbp_mega.ops import fused as _fused


@dataclass
class SamplingConfig:
    temperature: float = option(1.0, "softmax temperature (0 = greedy: the most likely token)",
                                min=0.0)
    top_k: int = option(16000, "keep the k most likely tokens per position (0 = all)", min=0)
    top_p: float = option(0.9, "keep the smallest set of tokens whose probability reaches p "
                          "(1 = all)", min=0.0)
    guidance_scale: float = option(1.0, "classifier-free guidance: logits u + s (c - u) of the "
                                   "conditional c and unconditional u rows (1 = off; needs a "
                                   "model trained with model.cond_dropout > 0)", min=0.0)

    def validate(self) -> None:
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p={self.top_p}: expected 0 < top_p <= 1")


def _top_k(cfg: SamplingConfig, vocab: int) -> int:
    """How many candidates top-k keeps (0 = no top-k filter)."""
    return cfg.top_k if 0 < cfg.top_k < vocab else 0


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """[..., V] fp32 logits -> the same with filtered tokens at -inf (temperature applied).

    Exactly top_k tokens survive the top-k filter (ties at the k-th value broken as
    torch.topk breaks them); top-p then keeps the most likely survivors until their
    renormalised probability reaches top_p (the first is always kept)."""
    logits = logits / cfg.temperature
    k = _top_k(cfg, logits.shape[-1])
    if k:
        values, ids = logits.topk(k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, ids, values)
    if cfg.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the tokens before it already reach p (the first is always kept)
        drop = probs.cumsum(dim=-1) - probs >= cfg.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def _uniforms(generators: list[torch.Generator], length: int, device) -> torch.Tensor:
    """[B, L] uniforms in [0, 1): row b from generators[b] alone."""
    return torch.stack([torch.rand(length, generator=g, device=g.device)
                        for g in generators]).to(device)


# Nucleus bins: 2^(23 - _BIN_SHIFT) = 256 per octave of probability below the row's largest,
# over _BINS / 256 = 30 octaves (smaller probabilities share the last bin). A float32 >= 0 read
# as int32 grows with its value, so a bin is a shift of that integer.
_BIN_SHIFT = 15
_BINS = 256 * 30
_ONE_BITS = 0x3F800000  # 1.0f as int32


def nucleus_threshold(w: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """w [R, n] unnormalised probabilities in [0, 1] (the row's largest = 1), mass [R, 1] ->
    [R, 1] the smallest weight the nucleus keeps: tokens by descending weight are kept while
    the weight before them stays below `mass` (the first is always kept); keep w >= it."""
    R = w.shape[0]
    bins = ((_ONE_BITS - w.view(torch.int32)) >> _BIN_SHIFT).clamp_(0, _BINS - 1)  # int32
    # per-row histograms as one flat [R * bins] (index_add_ takes int32 indices: no int64 copy)
    rows = torch.arange(R, dtype=torch.int32, device=w.device)[:, None] * _BINS
    per_bin = torch.zeros(R * _BINS, dtype=w.dtype, device=w.device)
    per_bin.index_add_(0, (bins + rows).view(-1), w.reshape(-1))
    cum = per_bin.view(R, _BINS).cumsum(dim=1)  # [R, bins], largest weights first
    # counts in int32: a bool sum to int64 costs 10x more on the CPU
    last = (cum < mass).sum(dim=1, keepdim=True, dtype=torch.int32).clamp_(max=_BINS - 1)
    above = torch.where(last > 0, cum.gather(1, (last.long() - 1).clamp(min=0)), 0.0)
    inside = bins == last  # the bin where the nucleus ends
    width = int(inside.sum(dim=1, dtype=torch.int32).max())  # few: a bin is 1/256 octave
    ordered = torch.where(inside, w, -1.0).topk(width, dim=1).values  # [R, width], descending
    own = ordered.clamp(min=0)
    before = above + own.cumsum(dim=1) - own  # weight of the tokens before each one
    count = ((before < mass) & (ordered >= 0)).sum(dim=1, keepdim=True)  # >= 1
    return ordered.gather(1, count - 1)


def _draw_torch(logits: torch.Tensor, cfg: SamplingConfig, uniform: torch.Tensor) -> torch.Tensor:
    """draw in PyTorch ops (any device): candidates in topk's order, or vocabulary order
    without top-k."""
    B, L, V = logits.shape
    rows = logits.float().reshape(B * L, V)
    k = _top_k(cfg, V)
    values, candidates = rows.topk(k, dim=1, sorted=False) if k else (rows, None)  # [R, n]
    top = values.max(dim=1, keepdim=True).values
    w = ((values - top) / cfg.temperature).exp()  # [R, n] in [0, 1], softmax numerators
    if cfg.top_p < 1:
        mass = cfg.top_p * w.sum(dim=1, keepdim=True)
        w = torch.where(w >= nucleus_threshold(w, mass), w, 0.0)
    cdf = w.cumsum(dim=1)
    total = cdf[:, -1:].contiguous()
    target = (uniform.reshape(B * L, 1).to(cdf.dtype) * total).contiguous()
    # right: never a weight of 0; at most the last token of weight > 0 (the first index
    # reaching the total), as uniform * total can round up to the total
    j = torch.minimum(torch.searchsorted(cdf, target, right=True), torch.searchsorted(cdf, total))
    ids = j if candidates is None else candidates.gather(1, j)
    return ids.view(B, L)


KERNELS = ("auto", "cpu_kernel", "torch")


def default_kernel(device: torch.device) -> str:
    """What draw's kernel="auto" runs for logits on `device`."""
    return "cpu_kernel" if device.type == "cpu" and _fused.AVAILABLE else "torch"


def draw(logits: torch.Tensor, cfg: SamplingConfig, uniform: torch.Tensor,
         kernel: str = "auto") -> torch.Tensor:
    """logits [B, L, V], uniform [B, L] in [0, 1] -> token ids [B, L]: the inverse CDF of
    softmax(filter_logits(logits)) at `uniform`, over the candidates in a fixed order that
    depends on the row's logits alone. Never a token of probability 0, even at uniform = 1.

    kernel: "cpu_kernel" nbp_mega._C's sample_rows (csrc/cpu/sampling_cpu.cpp: O(V) per row,
    a row per thread); "torch" PyTorch ops (any device); "auto" the first on CPU logits where
    the extension is built, else the second. Both draw from the same distribution; their
    candidate orders differ, so one uniform can map to different tokens."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}: expected one of {KERNELS}")
    if kernel == "auto":
        kernel = default_kernel(logits.device)
    if kernel == "torch":
        return _draw_torch(logits, cfg, uniform)
    B, L, V = logits.shape
    ids = torch.ops.nbp_mega.sample_rows(logits.float().reshape(B * L, V),
                                         uniform.reshape(B * L).float(), _top_k(cfg, V),
                                         cfg.top_p, cfg.temperature)
    return ids.view(B, L)


def sample(logits: torch.Tensor, cfg: SamplingConfig,
           generators: list[torch.Generator]) -> torch.Tensor:
    """logits [B, L, V] -> token ids [B, L]; row b draws from generators[b] only."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    return draw(logits, cfg, _uniforms(generators, logits.shape[1], logits.device))
