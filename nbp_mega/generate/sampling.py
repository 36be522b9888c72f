"""Sampling one token per position, vectorised over the batch and the block.

Legend: B batch; L block length; V vocabulary.

Reproducible per sample: each sample draws from its own generator, seeded by its own seed, one
[L] uniform draw per step, so its tokens depend only on its seed and its conditioning, never
on the batch size or its place in the batch. Defaults are the paper's: top-k 16000, top-p 0.9,
temperature 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nbp_mega.config_fields import ConfigError, option


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


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """[..., V] fp32 logits -> the same with filtered tokens at -inf (temperature applied)."""
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the tokens before it already reach p (the first is always kept)
        drop = probs.cumsum(dim=-1) - probs >= cfg.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample(logits: torch.Tensor, cfg: SamplingConfig,
           generators: list[torch.Generator]) -> torch.Tensor:
    """logits [B, L, V] -> token ids [B, L]; row b draws from generators[b] only."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float(), cfg).softmax(dim=-1)  # [B, L, V]
    uniform = torch.stack([torch.rand(logits.shape[1], generator=g, device=g.device)
                           for g in generators]).to(probs.device)  # [B, L]
    # inverse-CDF draw: the first token whose cumulative probability passes the draw
    cdf = probs.cumsum(dim=-1)
    ids = torch.searchsorted(cdf, (uniform * cdf[..., -1]).unsqueeze(-1).contiguous(),
                             right=True)  # right: never a token of probability 0
    return ids.squeeze(-1).clamp_(max=logits.shape[-1] - 1)
