"""Block-parallel generation: one forward step per block, against a static KV cache.

Legend: B batch; P prefix tokens; L block length; nb video blocks; K given (context) blocks;
T, H, W latent grid; V vocabulary.

The first step prefills the whole conditioning in one forward, exactly as training sees it:
[class prefix][start block, if the model has one][given video blocks]. Its last L positions
give the logits of the next block; every later step feeds exactly the block just sampled at
its own positions, its queries attending to the cache plus the block itself (bidirectional
inside it), and returns the logits of the block after it. A clip of nb blocks with K given
takes nb - K steps, whatever the block length (NTP: L = 1, one step per token).

Classifier-free guidance (sampling.guidance_scale != 1) runs the conditional rows and their
unconditional twins (class prefix replaced by the no-condition token) as one batch of 2B
through every forward, and samples from u + s (c - u).
"""

from __future__ import annotations

import torch

from nbp_mega.config_fields import ConfigError
from nbp_mega.generate.kv_cache import StaticKVCache
from nbp_mega.generate.sampling import SamplingConfig, sample


def _check_guidance(model, labels, sampling: SamplingConfig) -> bool:
    """Whether this call guides; refuses guidance the model was not trained for."""
    if sampling.guidance_scale == 1.0:
        return False
    if labels is None or model.layout.null_token is None:
        raise ValueError(f"sampling.guidance_scale={sampling.guidance_scale} needs a "
                         "class-conditional model trained with model.cond_dropout > 0")
    return True


def _guided(logits: torch.Tensor, batch: int, scale: float) -> torch.Tensor:
    """[2B, L, V] (conditional rows, then unconditional) -> u + scale (c - u) [B, L, V]."""
    c, u = logits[:batch], logits[batch:]
    return torch.where(torch.isfinite(c), u + scale * (c - u), c)  # padded ids stay -inf


def _check(model, labels, context) -> int:
    """Validate the conditioning; return K, the number of given blocks."""
    layout, cfg = model.layout, model.cfg
    if model.tp_size != 1:
        raise ConfigError("generation runs at parallel.tensor=1 for now (tensor-parallel "
                          "sampling gathers the vocabulary shards: not built yet)")
    if (labels is None) != (layout.prefix_len == 0):
        raise ValueError(f"model.num_classes={cfg.num_classes}: pass labels exactly when the "
                         "model is class-conditional")
    given = 0 if context is None else context.shape[1]
    bt = layout.blocks.block[0]
    if given % bt or given >= cfg.grid[0]:
        raise ValueError(f"context of {given} latent frames: expected a multiple of the "
                         f"block's {bt} frames, fewer than the grid's {cfg.grid[0]}")
    if not cfg.start_block and given == 0:
        raise ValueError("model.start_block=false (the K600 layout): block 0 is context only; "
                         "give at least the first latent frame(s) as context")
    return given * cfg.grid[1] * cfg.grid[2] // layout.block_len


def _prefill_ids(model, batch: int, labels, context, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefill input ids [B, S0], the video sequence [B, Nv] with the context filled in)."""
    layout = model.layout
    seq = torch.zeros(batch, layout.blocks.num_tokens, dtype=torch.long, device=device)
    parts = []
    if layout.prefix_len:
        parts.append((layout.class_offset + labels.to(device))[:, None]
                     .expand(batch, layout.prefix_len))
    if model.cfg.start_block:
        parts.append(seq.new_full((batch, layout.block_len), layout.start_token))
    if context is not None:
        blocks = context.shape[1] * context.shape[2] * context.shape[3]
        # the first K blocks of the block order are exactly the first frames (bt divides K)
        full = torch.zeros(batch, *model.cfg.grid, dtype=torch.long, device=device)
        full[:, : context.shape[1]] = context.to(device)
        seq[:, :blocks] = layout.blocks.to_blocks(full)[:, :blocks]
        parts.append(seq[:, :blocks])
    return torch.cat(parts, dim=1), seq


@torch.no_grad()
def generate(model, *, seeds: list[int], labels: torch.Tensor | None = None,
             context: torch.Tensor | None = None,
             sampling: SamplingConfig | None = None) -> torch.Tensor:
    """Sample len(seeds) clips -> token grids [B, T, H, W].

    labels [B] class ids (class-conditional models); context [B, K, H, W] the first K latent
    frames, given (frame prediction; K a multiple of the block's frames). Sample b depends
    only on seeds[b] and its own conditioning.
    """
    sampling = sampling or SamplingConfig()
    model.eval()
    layout, L, batch = model.layout, model.layout.block_len, len(seeds)
    device = next(model.parameters()).device
    first = _check(model, labels, context)
    guide = _check_guidance(model, labels, sampling)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    cache = StaticKVCache.for_model(model, 2 * batch if guide else batch)
    ids, seq = _prefill_ids(model, batch, labels, context, device)
    if guide:  # the unconditional twins: the same sequence with the no-condition prefix
        unconditional = ids.clone()
        unconditional[:, : layout.prefix_len] = layout.null_token
        ids = torch.cat([ids, unconditional])
    h = model.hidden_states(ids, 0, cache)[:, -L:]  # [B or 2B, L, d]
    video_start = layout.num_slots  # input position of video block 0
    for block in range(first, layout.blocks.num_blocks):
        logits = model.logits(h)
        if guide:
            logits = _guided(logits, batch, sampling.guidance_scale)
        tokens = sample(logits, sampling, generators)  # [B, L]
        seq[:, block * L:(block + 1) * L] = tokens
        if block + 1 < layout.blocks.num_blocks:  # the last block is never an input
            step_ids = torch.cat([tokens, tokens]) if guide else tokens
            h = model.hidden_states(step_ids, video_start + block * L, cache)
    return layout.blocks.from_blocks(seq)
