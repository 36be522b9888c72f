"""An exported NBP video generator for Hugging Face transformers (torch + transformers only).

Legend: B batch; S input positions of a call; d width; N heads; D = d / N; V video codes;
P prefix length; L block length; T, H, W latent grid.

    model = AutoModel.from_pretrained(DIR, trust_remote_code=True)
    out = model(input_ids=ids)                 # ids [B, S]: the training input sequence
    out.logits                                 # [B, S, V] fp32 over the video codes
    tokens = model.generate_video(labels=torch.tensor([3]))      # [B, T, H, W], greedy

Written by nbp_mega's tools/convert_to_hf.py with the weights under nbp_mega's own names
(padded vocabulary rows dropped). The attention here is plain PyTorch
(scaled_dot_product_attention with a boolean mask built from config.attention_ranges), an
independent restatement of nbp_mega's block-causal attention: bidirectional inside a block,
causal across blocks, the prefix visible to all.

Generation (`generate_video`) is NBP's: one forward per block (per token inside block 0 of the
hybrid start) against a KV cache; the first forward prefills the conditioning (prefix, start
slots, given latent frames). Greedy decoding gives nbp_mega's greedy tokens (tools/sample.py
--greedy); with do_sample=True it draws with top-k / top-p / temperature from one
torch.Generator (not nbp_mega's per-sample generators, so seeds do not carry over).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_nbp import NBPVideoConfig


@dataclass
class NBPVideoOutput(ModelOutput):
    logits: torch.Tensor | None = None  # [B, S, V] fp32
    past_key_values: tuple | None = None  # per layer (k, v) [B, N, start + S, D]
    hidden_states: torch.Tensor | None = None  # [B, S, d] after the final norm


def _norm(config: NBPVideoConfig) -> nn.Module:
    if config.family == "gpt":
        return nn.LayerNorm(config.hidden, eps=config.norm_eps)
    return nn.RMSNorm(config.hidden, eps=config.norm_eps)


class Layout:
    """The per-position tables of config's sequence layout, computed from the config's lists
    on first use per device (plain tensors, not module buffers: from_pretrained may build the
    modules on the meta device, and these are not weights)."""

    def __init__(self, config: NBPVideoConfig):
        self.config, self._by_device = config, {}

    def __call__(self, device: torch.device) -> dict:
        if device not in self._by_device:
            self._by_device[device] = {k: v.to(device) for k, v in self._tables().items()}
        return self._by_device[device]

    def _tables(self) -> dict:
        c = self.config
        S = c.seq_len
        pos, key_end = torch.arange(S), torch.zeros(S, dtype=torch.long)
        for lo, hi, block_len, prefix_len in c.attention_ranges:
            p = pos[lo:hi]
            block_end = prefix_len + ((p - prefix_len) // block_len + 1) * block_len
            key_end[lo:hi] = torch.where(p < prefix_len, torch.full_like(p, prefix_len),
                                         block_end)
        slot = torch.tensor(c.slot_index, dtype=torch.long)
        coords = torch.tensor(c.input_coords, dtype=torch.long).view(S, 3)
        tables = {"key_end": key_end.clamp(max=S), "slot": slot, "coords": coords.clamp(min=0)}
        if c.position == "rope_3d":  # rotary angles over (t, h, w)
            pairs = c.hidden // c.heads // 2
            sections = [pairs - 2 * (pairs // 3), pairs // 3, pairs // 3]  # t: the remainder
            num_slots = int((slot >= 0).sum())
            at = torch.where(slot[:, None] >= 0, slot[:, None].expand(-1, 3), coords + num_slots)
            angles = []
            for axis, n in enumerate(sections):
                inv_freq = c.rope_theta ** (-torch.arange(n, dtype=torch.float64) / max(n, 1))
                angles.append(at[:, axis, None].double() * inv_freq)
            angle = torch.cat(angles, dim=-1)  # [S, D/2]
            tables["cos"], tables["sin"] = angle.cos().float(), angle.sin().float()
        return tables


def rotate(x: torch.Tensor, tables: dict, start: int) -> torch.Tensor:
    """Rotary embedding of q or k [B, N, S, D] at input positions [start, start + S): slots at
    (s, s, s), video tokens at (slots + t, slots + h, slots + w); D/2 pairs, halves rotated."""
    cos = tables["cos"][start:start + x.shape[-2]].to(x.dtype)
    sin = tables["sin"][start:start + x.shape[-2]].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: NBPVideoConfig):
        super().__init__()
        bias = config.family == "gpt"
        self.heads, self.head_dim = config.heads, config.hidden // config.heads
        self.qkv = nn.Linear(config.hidden, 3 * config.hidden, bias=bias)  # rows [N, 3, D]
        self.proj = nn.Linear(config.hidden, config.hidden, bias=bias)

    def forward(self, x, mask, rope, start, past):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, self.heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        if rope is not None:
            q, k = rotate(q, rope, start), rotate(k, rope, start)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, S, -1)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: NBPVideoConfig):
        super().__init__()
        self.gated = config.family == "llama"
        self.fc = nn.Linear(config.hidden, config.ffn_hidden, bias=not self.gated)
        self.gate = nn.Linear(config.hidden, config.ffn_hidden, bias=False) if self.gated \
            else None
        self.proj = nn.Linear(config.ffn_hidden, config.hidden, bias=not self.gated)

    def forward(self, x):
        if self.gated:
            return self.proj(F.silu(self.gate(x)) * self.fc(x))
        return self.proj(F.gelu(self.fc(x)))


class Layer(nn.Module):
    def __init__(self, config: NBPVideoConfig):
        super().__init__()
        self.norm1, self.norm2 = _norm(config), _norm(config)
        self.attn, self.mlp = Attention(config), MLP(config)

    def forward(self, x, mask, rope, start, past):
        a, kv = self.attn(self.norm1(x), mask, rope, start, past)
        x = x + a
        return x + self.mlp(self.norm2(x)), kv


class LearnedPositions1D(nn.Module):
    def __init__(self, config: NBPVideoConfig):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(config.max_positions, config.hidden))

    def forward(self, tables: dict, start: int, length: int) -> torch.Tensor:
        return self.table[start:start + length]


class LearnedPositions3D(nn.Module):
    def __init__(self, config: NBPVideoConfig):
        super().__init__()
        T, H, W = config.grid
        slots = sum(1 for s in config.slot_index if s >= 0)
        self.slots = nn.Parameter(torch.zeros(max(slots, 1), config.hidden))
        self.t = nn.Parameter(torch.zeros(T, config.hidden))
        self.h = nn.Parameter(torch.zeros(H, config.hidden))
        self.w = nn.Parameter(torch.zeros(W, config.hidden))

    def forward(self, tables: dict, start: int, length: int) -> torch.Tensor:
        slot = tables["slot"][start:start + length]
        c = tables["coords"][start:start + length]
        video = self.t[c[:, 0]] + self.h[c[:, 1]] + self.w[c[:, 2]]
        return torch.where(slot[:, None] >= 0, self.slots[slot.clamp(min=0)], video)


class NBPVideoPreTrainedModel(PreTrainedModel):
    config_class = NBPVideoConfig
    base_model_prefix = "nbp"
    _no_split_modules = ["Layer"]

    def _init_weights(self, module):  # weights come from the checkpoint
        pass


class NBPVideoModel(NBPVideoPreTrainedModel):
    def __init__(self, config: NBPVideoConfig):
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.embed_vocab, config.hidden)
        self.pos_emb = None
        if config.position == "learned_1d":
            self.pos_emb = LearnedPositions1D(config)
        elif config.position == "learned_3d":
            self.pos_emb = LearnedPositions3D(config)
        self.layout = Layout(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.layers))
        self.norm = _norm(config)
        self.head = nn.Linear(config.hidden, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, start: int = 0, past_key_values=None,
                use_cache: bool = False, **kwargs) -> NBPVideoOutput:
        """input_ids [B, S] at input positions [start, start + S) (start = the positions in
        past_key_values) -> logits [B, S, V] of what each position predicts."""
        if past_key_values is not None:
            start = past_key_values[0][0].shape[2]
        S = input_ids.shape[1]
        if start + S > self.config.seq_len:
            raise ValueError(f"positions [{start}, {start + S}) of a model trained on "
                             f"{self.config.seq_len} input positions")
        x = self.tok_emb(input_ids)
        tables = self.layout(x.device)
        if self.pos_emb is not None:
            x = x + self.pos_emb(tables, start, S)
        keys = torch.arange(start + S, device=x.device)
        mask = keys[None, :] < tables["key_end"][start:start + S, None]  # [S, start + S]
        rope = tables if self.config.position == "rope_3d" else None
        present = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, mask, rope, start,
                          None if past_key_values is None else past_key_values[i])
            present.append(kv)
        h = self.norm(x)
        return NBPVideoOutput(logits=self.head(h).float(), hidden_states=h,
                              past_key_values=tuple(present) if use_cache else None)

    # -- generation -----------------------------------------------------------------------
    def _prefix(self, batch: int, labels, text) -> torch.Tensor:
        c = self.config
        if c.text_len:
            if text is None or text.shape[-1] != c.text_len:
                raise ValueError(f"a text-conditional model: pass text ids [B, {c.text_len}]")
            return c.text_offset + text.long()
        if c.num_classes:
            if labels is None:
                raise ValueError(f"a class-conditional model: pass labels [B] in "
                                 f"[0, {c.num_classes})")
            return (c.class_offset + labels.long())[:, None].expand(-1, c.prefix_len)
        if labels is not None or text is not None:
            raise ValueError("an unconditional model: no labels or text")
        return torch.zeros(batch, 0, dtype=torch.long)

    def _windows(self, given: int) -> list[tuple[int, int, int]]:
        """(first input, end, n) per forward; the last n inputs predict the next n targets."""
        c, windows, i = self.config, [], given
        while i < c.num_targets:
            n = 1 if c.hybrid_start and i < c.block_len else c.block_len
            windows.append((0 if not windows else c.prefix_len + i, c.prefix_len + i + n, n))
            i += n
        return windows

    @torch.no_grad()
    def generate_video(self, labels: torch.Tensor | None = None,
                       text: torch.Tensor | None = None, context: torch.Tensor | None = None,
                       batch_size: int | None = None, do_sample: bool = False,
                       temperature: float = 1.0, top_k: int = 16000, top_p: float = 0.9,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Clips -> token grids [B, T, H, W]. labels [B] class ids; text [B, text_len] text
        ids (bos + ids, truncated, eos-padded); context [B, K, H, W] the first K latent
        frames given (K a multiple of the block's frames). Greedy unless do_sample."""
        c = self.config
        device = self.head.weight.device
        B = next((len(x) for x in (labels, text, context) if x is not None), batch_size or 1)
        T, H, W = c.grid
        order = torch.tensor(c.block_order, device=device)
        video = torch.zeros(B, T * H * W, dtype=torch.long, device=device)  # block order
        given = 0
        if context is not None:
            if context.shape[1] % c.block_shape[0] or context.shape[1] >= T:
                raise ValueError(f"context of {context.shape[1]} latent frames: expected a "
                                 f"multiple of {c.block_shape[0]}, fewer than {T}")
            frames = torch.zeros(B, T * H * W, dtype=torch.long, device=device)
            frames.view(B, T, H, W)[:, :context.shape[1]] = context.to(device)
            n = context.shape[1] * H * W
            video[:, :n] = frames[:, order[:n]] + c.video_offset
            given = max(n - c.target_offset, 0)
        elif c.target_offset:
            raise ValueError("this model (no start block: the K600 layout) needs the first "
                             "latent frame(s) as context")
        prefix = self._prefix(B, labels, text).to(device)
        fixed = torch.tensor(c.fixed_ids, dtype=torch.long, device=device).expand(B, -1)
        ids = torch.cat([prefix, fixed, video], dim=1)
        source = torch.tensor(c.input_source, device=device)
        video = ids[:, c.prefix_len + len(c.fixed_ids):]  # a view into ids
        past = None
        for lo, hi, n in self._windows(given):
            out = self(ids[:, source[lo:hi]], past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -n:]
            tokens = (self._draw(logits, temperature, top_k, top_p, generator) if do_sample
                      else logits.argmax(dim=-1))
            target = hi - n - c.prefix_len + c.target_offset
            video[:, target:target + n] = tokens + c.video_offset  # ids of the codes
        grid = torch.empty_like(video)
        grid[:, order] = video - c.video_offset
        return grid.view(B, T, H, W)

    @staticmethod
    def _draw(logits, temperature, top_k, top_p, generator) -> torch.Tensor:
        logits = logits / max(temperature, 1e-6)
        if 0 < top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            drop = probs.cumsum(dim=-1) - probs >= top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
        probs = logits.softmax(dim=-1).flatten(0, -2)
        return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])
