"""The training sequence: prefix, start slots, video blocks, and what predicts what.

Legend: B batch; P prefix tokens; L block length; Nv video tokens; nb = Nv / L blocks;
S = input length; Nt = number of targets; F fixed slot ids (start block, or BOV + middles).

Vocabulary (embedding rows), model.id_layout=nbp_mega: video codes 0..V-1; the start token V
(the start block's tokens, or the hybrid start's BOV); class ids V+1..V+C; with
model.cond_dropout > 0 the no-condition token V+1+C, which replaces the prefix of dropped clips
in training and of the unconditional rows of classifier-free guidance; text ids
(model.text_vocab of them) from `text_offset`; with the hybrid start L-1 "middle" placeholders
from `middle_offset`. model.id_layout=nbp, the published checkpoints' order (their
Net2NetTransformer): first the special ids, BOV 0 and with the hybrid start middles 1..L-1
(none without a start: the K600 layout), then class or text ids, then the video codes from
`video_offset` (UCF: BOV 0, middles 1..15, text 16..32015, video 32016..96015). Either way the
head predicts video codes 0..V-1 (the published UCF head's other 32,016 rows are not
imported), and the id buffer holds embedding ids: video code c is id `video_offset + c`.

Three layouts, all with input position P + i predicting target i:
  start block   [prefix][start block: L x V][video blocks 0 .. nb-2]      targets: blocks 0..nb-1
  no start      [prefix][video blocks 0 .. nb-2]    (the K600 layout)     targets: blocks 1..nb-1
  hybrid start  [prefix][BOV][block 0 tokens 0..L-2][token L-1, middles 1..L-1][blocks 1..nb-2]
                (the paper's UCF layout)                                  targets: blocks 0..nb-1
so token j of block i predicts token j of block i+1; in the hybrid start BOV predicts token
0, token j of block 0 predicts token j+1 one at a time, and [token L-1, middles] predicts
block 1. Every input is a gather: `input_source` indexes [prefix | fixed slots | video].

Attention: the prefix (class or text ids, pads included as in the published models) is
visible to all and bidirectional; after it, blocks of L tokens are block-causal, which is
`block_causal_attention(..., block_len=L, prefix_len=P)`. The hybrid start has two query
ranges: [0, P+L) causal token by token (block_len 1, prefix P) and [P+L, S) block-causal with
everything before P+L visible (block_len L, prefix P+L) - `attention_ranges`; no S x S mask.
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
        L = self.block_len = self.blocks.block_len
        self.hybrid = bool(cfg.hybrid_start)
        self.text_len = cfg.text_len
        self.prefix_len = cfg.text_len or (cfg.class_tokens if cfg.num_classes > 0 else 0)
        V, C = cfg.vocab_size, cfg.num_classes
        if cfg.id_layout == "nbp":
            self._published_ids(cfg)
        else:
            self.start_token = V
            self.class_offset = V + 1
            self.null_token = V + 1 + C if cfg.cond_dropout else None
            self.text_offset = V + 1 + C + (1 if cfg.cond_dropout else 0)
            self.middle_offset = self.text_offset + cfg.text_vocab
            self.embed_vocab = self.middle_offset + (L - 1 if self.hybrid else 0)
            self.video_offset = 0
        # video tokens that appear as input: all blocks but the last
        self.num_video_inputs = self.blocks.num_tokens - L
        self.target_offset = 0 if cfg.start_block else L  # video index of target 0
        self.seq_len = self.prefix_len + self.blocks.num_tokens - self.target_offset
        self.num_targets = self.blocks.num_tokens - self.target_offset

    def _published_ids(self, cfg: ModelConfig) -> None:
        """model.id_layout=nbp: [BOV, middles][class or text ids][video codes]."""
        specials = self.block_len if self.hybrid else int(cfg.start_block)  # BOV (+ middles)
        self.start_token = 0 if specials else None
        self.middle_offset = 1
        self.class_offset = self.text_offset = specials
        self.null_token = None
        self.video_offset = specials + cfg.num_classes + cfg.text_vocab
        self.embed_vocab = self.video_offset + cfg.vocab_size

    @cached_property
    def fixed_ids(self) -> torch.Tensor:
        """[F] the slot ids after the prefix: L start tokens, or BOV + L-1 middles (hybrid)."""
        if self.hybrid:
            middles = torch.arange(self.middle_offset, self.middle_offset + self.block_len - 1)
            return torch.cat([torch.tensor([self.start_token]), middles])
        if not self.cfg.start_block:
            return torch.zeros(0, dtype=torch.long)
        return torch.full((self.block_len,), self.start_token)

    @cached_property
    def input_source(self) -> torch.Tensor:
        """[S] index of each input position into [prefix (P) | fixed_ids (F) | video (Nv)]."""
        P, F, L = self.prefix_len, len(self.fixed_ids), self.block_len
        prefix, fixed = torch.arange(P), P + torch.arange(F)
        video = P + F + torch.arange(self.num_video_inputs)
        if not self.hybrid:
            return torch.cat([prefix, fixed, video])
        # [BOV][tokens 0..L-2][token L-1][middles][blocks 1 .. nb-2]
        return torch.cat([prefix, fixed[:1], video[: L - 1], video[L - 1: L], fixed[1:],
                          video[L:]])

    @cached_property
    def attention_ranges(self) -> list[tuple[int, int, int, int]]:
        """(first query, end, block_len, prefix_len) of each attention regime, in order."""
        P, L, S = self.prefix_len, self.block_len, self.seq_len
        if not self.hybrid:
            return [(0, S, L, P)]
        return [(0, P + L, 1, P), (P + L, S, L, P + L)]

    def step_len(self, target: int) -> int:
        """Targets predicted together with target `target` when generating (1 or L)."""
        return 1 if self.hybrid and target < self.block_len else self.block_len

    def generation_windows(self, given: int = 0) -> list[tuple[int, int, int]]:
        """(first input, end, n) of each forward of a clip whose first `given` targets are
        known: the first one prefills [0, ...); the last n inputs of each predict the next n
        targets. One per block (per token inside block 0 of the hybrid start)."""
        P, windows, i = self.prefix_len, [], given
        while i < self.num_targets:
            n = self.step_len(i)
            windows.append((0 if not windows else P + i, P + i + n, n))
            i += n
        return windows

    def given_targets(self, frames: int) -> int:
        """Targets fixed by the first `frames` latent frames given (frame prediction)."""
        _, H, W = self.blocks.grid
        return max(frames * H * W - self.target_offset, 0)

    @property
    def num_target_blocks(self) -> int:
        return self.num_targets // self.block_len

    def loss_per_block(self, token_loss):
        """Per-target losses [m, Nt] -> the mean loss of each target block position [nb]
        (over the clips and the tokens of the block), fp64, detached."""
        m = token_loss.shape[0]
        return token_loss.detach().view(m, -1, self.block_len).mean(dim=(0, 2)).double()

    @property
    def generation_steps(self) -> int:
        """Forward passes to generate a clip from its conditioning alone."""
        return len(self.generation_windows())

    def prefix_ids(self, labels: torch.Tensor | None = None, text: torch.Tensor | None = None,
                   drop: torch.Tensor | None = None, *, batch: int | None = None
                   ) -> torch.Tensor:
        """The prefix [B, P]: class ids (labels [B]) or text ids (text [B, text_len]); rows
        where drop [B] is true get the no-condition token instead."""
        ids = self._condition(labels, text, batch)
        if drop is None:
            return ids
        if self.null_token is None:
            raise ValueError("dropping the condition needs model.cond_dropout > 0 (the model "
                             "has no no-condition token)")
        return torch.where(drop.to(ids.device)[:, None], self.null_token, ids)

    def _condition(self, labels, text, batch) -> torch.Tensor:
        cfg = self.cfg
        if self.text_len:
            if text is None or labels is not None:
                raise ValueError(f"model.text_len={self.text_len}: pass text ids [B, "
                                 f"{self.text_len}] (and no labels)")
            if text.dim() != 2 or text.shape[1] != self.text_len:
                raise ValueError(f"text ids of shape {list(text.shape)}: expected [B, "
                                 f"{self.text_len}] = model.text_len")
            if text.min() < 0 or text.max() >= cfg.text_vocab:
                raise ValueError(f"text ids {text.min()}..{text.max()} outside [0, "
                                 f"{cfg.text_vocab}) = model.text_vocab")
            return self.text_offset + text.long()
        if text is not None:
            raise ValueError("text ids given, but the model is not text-conditional "
                             "(model.text_len=0)")
        if not self.prefix_len:
            if labels is not None:
                raise ValueError("labels given, but the model is not class-conditional "
                                 "(model.num_classes=0)")
            return torch.zeros(batch or 0, 0, dtype=torch.long)
        if labels is None:
            raise ValueError("model.num_classes > 0 but the batch has no labels")
        if labels.min() < 0 or labels.max() >= cfg.num_classes:
            raise ValueError(f"class labels must be in [0, {cfg.num_classes}) = "
                             f"model.num_classes, got {labels.min()}..{labels.max()} (-1 is a "
                             f"clip without a label: train on labelled shards or set "
                             f"model.num_classes=0)")
        return (self.class_offset + labels.long())[:, None].expand(-1, self.prefix_len)

    def id_buffer(self, prefix: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """[B, P + F + Nv]: what `input_source` indexes (video: [B, Nv] codes in block order,
        stored as ids `video_offset + code`)."""
        fixed = self.fixed_ids.to(video.device).expand(video.shape[0], -1)
        return torch.cat([prefix.to(video.device), fixed, video + self.video_offset], dim=1)

    def build(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
              drop: torch.Tensor | None = None, *, text: torch.Tensor | None = None):
        """tokens [B, T, H, W], labels [B] or text [B, text_len] (drop [B]: rows without
        condition) -> input_ids [B, S], targets [B, Nt]."""
        seq = self.blocks.to_blocks(tokens)  # [B, Nv]
        prefix = self.prefix_ids(labels, text, drop, batch=seq.shape[0])
        ids = self.id_buffer(prefix, seq)
        return ids[:, self.input_source.to(seq.device)], seq[:, self.target_offset:]

    @cached_property
    def slot_index(self) -> torch.Tensor:
        """[S] for each input position: its index among the non-video positions (prefix and
        fixed slots, in order), or -1 for a video token."""
        is_slot = self.input_source < self.prefix_len + len(self.fixed_ids)
        return torch.where(is_slot, is_slot.long().cumsum(0) - 1, -1)

    @cached_property
    def input_coords(self) -> torch.Tensor:
        """[S, 3] latent (t, h, w) of each input video token (-1 at slots)."""
        video = (self.input_source - self.prefix_len - len(self.fixed_ids)).clamp(min=0)
        coords = self.blocks.coords[video]
        return torch.where(self.slot_index[:, None] >= 0, -1, coords)

    @cached_property
    def num_slots(self) -> int:
        """Input positions that are not video tokens (prefix and fixed slots)."""
        return self.seq_len - self.num_video_inputs

    def visible_keys(self) -> torch.Tensor:
        """[S] number of keys each input position attends to (for FLOP counts)."""
        pos, out = torch.arange(self.seq_len), torch.zeros(self.seq_len, dtype=torch.long)
        for lo, hi, L, P in self.attention_ranges:
            q = pos[lo:hi]
            block_end = (P + ((q - P) // L + 1) * L).clamp(max=self.seq_len)
            out[lo:hi] = torch.where(q < P, torch.full_like(q, P), block_end)
        return out


def cond_drop_mask(seed: int, step: int, global_batch: int, first: int, count: int,
                   p: float) -> torch.Tensor:
    """[count] bool: which clips of this rank's slice [first, first + count) of global batch
    `step` lose their condition (classifier-free guidance training). Drawn for the whole
    global batch from (seed, step) alone, so it depends on neither dp nor the global RNG
    (dropout's), and a resumed run draws the same."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return (torch.rand(global_batch, generator=gen) < p)[first:first + count]
