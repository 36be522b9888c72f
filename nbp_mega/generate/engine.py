"""Block-parallel generation: one forward step per block, against a static KV cache.

Legend: B batch; P prefix tokens; L block length; n targets of a step (L, or 1 in the hybrid
start's block 0); K given latent frames; T, H, W latent grid; V vocabulary.

The first step prefills the whole conditioning in one forward, exactly as training sees it
(`SequenceLayout.build`: the class or text prefix, the start slots, the given video blocks as
ordinary block-causal blocks). The last n positions of each step predict the next n targets;
every later step feeds exactly the inputs of the next window (`generation_windows`: the block
just sampled, or in the hybrid start one token, then [token L-1, middles]), its queries
attending to the cache plus the window itself (bidirectional inside a block). Inputs are a
gather from one id buffer [prefix | fixed slots | video], so nothing is concatenated or
reallocated per step. A clip of nb blocks with K frames given takes one step per remaining
block (NTP: L = 1, one step per token; hybrid: L steps for block 0, then one per block).

Classifier-free guidance (sampling.guidance_scale != 1) runs the conditional rows and their
unconditional twins (prefix replaced by the no-condition token) as one batch of 2B through
every forward, and samples from u + s (c - u).
"""

from __future__ import annotations

import torch

from nbp_mega.generate.cuda_graph import GraphedSteps
from nbp_mega.generate.kv_cache import StaticKVCache
from nbp_mega.generate.packed_linear import packed_linears
from nbp_mega.generate.sampling import SamplingConfig, sample
from nbp_mega.parallel.collectives import gather_last_dim, tensor_parallel_group


def _check_guidance(model, sampling: SamplingConfig) -> bool:
    """Whether this call guides; refuses guidance the model was not trained for."""
    if sampling.guidance_scale == 1.0:
        return False
    if model.layout.null_token is None:
        raise ValueError(f"sampling.guidance_scale={sampling.guidance_scale} needs a class- or "
                         "text-conditional model trained with model.cond_dropout > 0")
    return True


def _guided(logits: torch.Tensor, batch: int, scale: float) -> torch.Tensor:
    """[2B, n, V] (conditional rows, then unconditional) -> u + scale (c - u) [B, n, V]."""
    c, u = logits[:batch], logits[batch:]
    return torch.where(torch.isfinite(c), u + scale * (c - u), c)  # padded ids stay -inf


def _check(model, context) -> int:
    """Validate the given frames; return how many targets they fix."""
    layout, cfg = model.layout, model.cfg
    given = 0 if context is None else context.shape[1]
    bt = layout.blocks.block[0]
    if given % bt or given >= cfg.grid[0]:
        raise ValueError(f"context of {given} latent frames: expected a multiple of the "
                         f"block's {bt} frames, fewer than the grid's {cfg.grid[0]}")
    if context is not None and (context.dim() != 4 or tuple(context.shape[2:]) != tuple(
            cfg.grid[1:]) or context.min() < 0 or context.max() >= cfg.vocab_size):
        raise ValueError(f"context tokens {list(context.shape)}: expected [B, K, {cfg.grid[1]}"
                         f", {cfg.grid[2]}] ids in [0, {cfg.vocab_size}) = model.vocab_size")
    if not cfg.start_block and given == 0:
        raise ValueError("model.start_block=false (the K600 layout): block 0 is context only; "
                         "give at least the first latent frame(s) as context")
    return layout.given_targets(given)


def _id_buffer(model, batch: int, labels, text, context, guide: bool, device) -> torch.Tensor:
    """[B or 2B, P + F + Nv]: prefix, fixed slots and the video (context filled in); the
    unconditional twins of guidance have the no-condition prefix."""
    layout = model.layout
    seq = torch.zeros(batch, layout.blocks.num_tokens, dtype=torch.long, device=device)
    if context is not None:
        # the first K frames are the first blocks of the block order (bt divides K)
        full = torch.zeros(batch, *model.cfg.grid, dtype=torch.long, device=device)
        full[:, : context.shape[1]] = context.to(device)
        given = context.shape[1] * context.shape[2] * context.shape[3]
        seq[:, :given] = layout.blocks.to_blocks(full)[:, :given]
    prefix = layout.prefix_ids(labels, text, batch=batch)
    if guide:
        drop = torch.arange(2 * batch) >= batch
        prefix = layout.prefix_ids(None if labels is None else labels.repeat(2),
                                   None if text is None else text.repeat(2, 1), drop)
        seq = seq.repeat(2, 1)
    return layout.id_buffer(prefix.to(device), seq)


def _step_fn(model, rows: int, cuda_graph: bool):
    """step(ids [rows, S], start, n) -> this rank's logits [rows, n, V/tp] of the step's last
    n positions: eager against the model's cache (`StaticKVCache.reused_for`), or replayed
    from the model's CUDA graphs."""
    if cuda_graph:
        return GraphedSteps.for_model(model, rows).logits
    cache = StaticKVCache.reused_for(model, rows)
    return lambda ids, start, n: model.logits(model.hidden_states(ids, start, cache)[:, -n:])


@torch.no_grad()
def generate(model, *, seeds: list[int], labels: torch.Tensor | None = None,
             text: torch.Tensor | None = None, context: torch.Tensor | None = None,
             sampling: SamplingConfig | None = None, on_step=None,
             cuda_graph: bool = False, onednn: bool = True) -> torch.Tensor:
    """Sample len(seeds) clips -> token grids [B, T, H, W].

    labels [B] class ids (class-conditional models); text [B, model.text_len] text ids in
    fixed form (text-conditional models: `TextTokenizer.encode_fixed`); context [B, K, H, W]
    the first K latent frames, given (frame prediction; K a multiple of the block's frames).
    Sample b depends only on seeds[b] and its own conditioning. on_step(done, total) is
    called after each forward step (progress bars). cuda_graph (CUDA): every step replays a
    CUDA graph (`GraphedSteps`), captured on the first call with this batch size and reused
    by later calls; the same logits as the eager steps. onednn (CPU): the model's linears
    multiply through oneDNN's packed weights (`packed_linears`; MKL's small-M products
    stream the weights far below the memory's rate).
    """
    sampling = sampling or SamplingConfig()
    model.eval()
    layout, batch = model.layout, len(seeds)
    device = next(model.parameters()).device
    first = _check(model, context)
    guide = _check_guidance(model, sampling)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    ids = _id_buffer(model, batch, labels, text, context, guide, device)
    step_logits = _step_fn(model, ids.shape[0], cuda_graph)
    source = layout.input_source.to(device)
    video = ids[:, layout.prefix_len + len(layout.fixed_ids):]  # a view: samples land in ids
    offset = layout.video_offset  # video code c is embedding id offset + c (model.id_layout)
    windows = layout.generation_windows(first)
    with packed_linears(model, enabled=onednn):
        for step, (lo, hi, n) in enumerate(windows):
            # full-vocabulary logits on every TP rank: each samples the same tokens
            logits = gather_last_dim(step_logits(ids[:, source[lo:hi]], lo, n),
                                     tensor_parallel_group(model))
            if guide:
                logits = _guided(logits, batch, sampling.guidance_scale)
            tokens = sample(logits, sampling, generators)  # [B, n]
            target = hi - n - layout.prefix_len + layout.target_offset  # video index of first
            video[:, target:target + n] = (tokens.repeat(2, 1) if guide else tokens) + offset
            if on_step is not None:
                on_step(step + 1, len(windows))
    return layout.blocks.from_blocks(video[:batch] - offset)
