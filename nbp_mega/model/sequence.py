"""The training sequence: prefix, start block, video blocks, and what predicts what.

Legend: B batch; P prefix tokens; L block length; Nv video tokens; nb = Nv / L blocks;
S = input length; Nt = number of targets.

Vocabulary (embedding rows): video codes 0..V-1, then the start token V, then class ids
V+1..V+C, then (with model.cond_dropout > 0) the no-condition token V+1+C, which replaces the
class prefix of dropped clips in training and of the unconditional rows of classifier-free
guidance. The head predicts video codes only.

Input  = [prefix (P)] [start block (L), if start_block] [video blocks 0 .. nb-2]
Target =                          [video blocks 0 .. nb-1] (or 1 .. nb-1 without start)
Input position P + i*L + j predicts target i*L + j: token j of block i predicts token j of
block i+1. Attention: the prefix is visible to all and bidirectional; blocks of L tokens from
position P on are block-causal, which is `block_causal_attention(..., block_len=L,
prefix_len=P)`. Text prompts and the paper's hybrid start will add prefix kinds here.
"""

from __future__ import annotations

from functools import cached_property

import torch

from nbp_mega.model.blocks import BlockLayout
from nbp_mega.model.config import ModelConfig


class SequenceLayout:
    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.blocks = BlockLayout(tuple(cfg.grid), tuple(cfg.block_shape))
        self.block_len = self.blocks.block_len
        self.prefix_len = cfg.class_tokens if cfg.num_classes > 0 else 0
        self.start_token = cfg.vocab_size
        self.class_offset = cfg.vocab_size + 1
        self.null_token = cfg.vocab_size + 1 + cfg.num_classes if cfg.cond_dropout else None
        self.embed_vocab = cfg.vocab_size + 1 + cfg.num_classes + (1 if cfg.cond_dropout else 0)
        # video tokens that appear as input: all blocks but the last
        self.num_video_inputs = self.blocks.num_tokens - self.block_len
        start = self.block_len if cfg.start_block else 0
        self.seq_len = self.prefix_len + start + self.num_video_inputs
        self.num_targets = self.num_video_inputs + start

    @property
    def num_target_blocks(self) -> int:
        return self.num_targets // self.block_len

    @property
    def generation_steps(self) -> int:
        """Forward passes to generate a clip from its conditioning (one per target block)."""
        return self.num_target_blocks

    def prefix(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """labels [B] -> class prefix ids [B, P]; rows where drop [B] is true get the
        no-condition token instead."""
        ids = (self.class_offset + labels)[:, None].expand(labels.shape[0], self.prefix_len)
        if drop is None:
            return ids
        if self.null_token is None:
            raise ValueError("dropping the condition needs model.cond_dropout > 0 (the model "
                             "has no no-condition token)")
        return torch.where(drop.to(ids.device)[:, None], self.null_token, ids)

    def build(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
              drop: torch.Tensor | None = None):
        """tokens [B, T, H, W], labels [B] (drop [B]: rows without condition) ->
        input_ids [B, S], targets [B, Nt]."""
        seq = self.blocks.to_blocks(tokens)  # [B, Nv]
        B, L = seq.shape[0], self.block_len
        parts = []
        if self.prefix_len:
            if labels is None:
                raise ValueError("model.num_classes > 0 but the batch has no labels")
            if labels.min() < 0 or labels.max() >= self.cfg.num_classes:
                raise ValueError(f"class labels must be in [0, {self.cfg.num_classes}) = "
                                 f"model.num_classes, got {labels.min()}..{labels.max()} "
                                 f"(-1 is a clip without a label: train on labelled shards "
                                 f"or set model.num_classes=0)")
            parts.append(self.prefix(labels, drop))
        if self.cfg.start_block:
            parts.append(seq.new_full((B, L), self.start_token))
            targets = seq
        else:
            targets = seq[:, L:]
        parts.append(seq[:, :-L])
        return torch.cat(parts, dim=1), targets

    @cached_property
    def video_coords(self) -> torch.Tensor:
        """[Nv - L, 3] latent (t, h, w) of the video tokens in the input."""
        return self.blocks.coords[: self.num_video_inputs]

    @cached_property
    def num_slots(self) -> int:
        """Input positions before the video tokens (prefix + start block)."""
        return self.seq_len - self.num_video_inputs

    def visible_keys(self) -> torch.Tensor:
        """[S] number of keys each input position attends to (for FLOP counts)."""
        pos = torch.arange(self.seq_len)
        P, L = self.prefix_len, self.block_len
        block_end = P + ((pos - P) // L + 1) * L
        return torch.where(pos < P, torch.full_like(pos, P), block_end.clamp(max=self.seq_len))


def cond_drop_mask(seed: int, step: int, global_batch: int, first: int, count: int,
                   p: float) -> torch.Tensor:
    """[count] bool: which clips of this rank's slice [first, first + count) of global batch
    `step` lose their condition (classifier-free guidance training). Drawn for the whole
    global batch from (seed, step) alone, so it depends on neither dp nor the global RNG
    (dropout's), and a resumed run draws the same."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return (torch.rand(global_batch, generator=gen) < p)[first:first + count]
