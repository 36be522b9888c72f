"""The NBP transformer: one code path for the `gpt` (paper) and `llama` families.

Legend: B batch; S input length; d width; N heads (Nl = N / tp on this rank); D = d / N;
F MLP width; V video vocabulary (Vp padded); P prefix length; L block length; Nt targets.

Written as single-device PyTorch: its linears, token embedding, head and loss come from a
`TensorParallel` factory (megatron-core TP layers), which makes the same code tensor-parallel.
Attention is block-causal through `nbp_mega.ops.block_causal_attention`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nbp_mega.config_fields import ConfigError
from nbp_mega.model.config import ModelConfig
from nbp_mega.model.positions import LearnedPositions1D, LearnedPositions3D, Rotary3D
from nbp_mega.model.sequence import SequenceLayout
from nbp_mega.ops import block_causal_attention
from nbp_mega.parallel.layers import TensorParallel


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.family == "gpt":
        return nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
    return nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)


def _pad(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, layout: SequenceLayout):
        super().__init__()
        bias = cfg.family == "gpt"
        self.local_heads = cfg.heads // tp.size
        self.head_dim = cfg.hidden // cfg.heads
        # Rows ordered [N, 3, D]: a contiguous TP split hands each rank whole heads' q, k, v.
        self.qkv = tp.column(cfg.hidden, 3 * cfg.hidden, bias=bias)
        self.proj = tp.row(cfg.hidden, cfg.hidden, bias=bias)
        self.ranges = layout.attention_ranges

    def forward(self, x: torch.Tensor, rope: Rotary3D | None, start: int,
                cache=None) -> torch.Tensor:
        """x [B, S, d] at positions [start, start + S). With a KV cache (generation) the new
        keys/values are written into it in place and the queries attend to all cached keys
        (those past their block are masked), so shapes stay static from step to step."""
        B, S, _ = x.shape
        qkv = self.qkv(x).view(B, S, self.local_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [B, Nl, S, D]
        if rope is not None:
            q, k = rope(q, start), rope(k, start)
        if cache is not None:
            k, v = cache.update(k, v, start)  # [B, Nl, S_max, D]
        out = self._attend(q, k, v, start)
        return self.proj(out.transpose(1, 2).reshape(B, S, self.local_heads * self.head_dim))


    def _attend(self, q, k, v, start: int) -> torch.Tensor:
        """Queries at [start, start + Sq), through each attention regime they fall in (one,
        except the hybrid start's token-by-token range and the blocks after it)."""
        outs, end = [], start + q.shape[2]
        for lo, hi, block_len, prefix_len in self.ranges:
            a, b = max(lo, start), min(hi, end)
            if a >= b:
                continue
            keys = min(k.shape[2], hi)  # keys past the regime are never visible in it
            outs.append(block_causal_attention(q[:, :, a - start:b - start], k[:, :, :keys],
                                               v[:, :, :keys], block_len, prefix_len, a))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class MLP(nn.Module):
    """gpt: GELU(x W1 + b1) W2 + b2; llama: (SiLU(x W1) * x W3) W2."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.gated = cfg.family == "llama"
        bias = not self.gated
        self.fc = tp.column(cfg.hidden, cfg.ffn_hidden, bias=bias)
        self.gate = tp.column(cfg.hidden, cfg.ffn_hidden, bias=False) if self.gated else None
        self.proj = tp.row(cfg.ffn_hidden, cfg.hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.proj(F.silu(self.gate(x)) * self.fc(x))
        return self.proj(F.gelu(self.fc(x)))


class TransformerLayer(nn.Module):
    """Pre-norm: x + drop(attn(norm(x))), then x + drop(mlp(norm(x)))."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, layout: SequenceLayout):
        super().__init__()
        self.norm1, self.norm2 = _norm(cfg), _norm(cfg)
        self.attn = Attention(cfg, tp, layout)
        self.mlp = MLP(cfg, tp)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: Rotary3D | None, start: int,
                cache=None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope, start, cache))
        return x + self.drop(self.mlp(self.norm2(x)))


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: transformer layers [first_layer, stop_layer) of the model, with
    the embedding on stage 0 and the final norm, head and loss on the last stage."""

    index: int
    count: int
    first_layer: int
    stop_layer: int

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1


class OnOtherStage(nn.Module):
    """Stands in `NBPTransformer.layers` for a layer another pipeline stage holds, so the
    layers this stage holds keep their model-wide names (layers.<i>...)."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this transformer layer lives on another pipeline stage")


class NBPTransformer(nn.Module):
    """The model, or with `stage` one pipeline stage of it (nbp_mega.parallel.pipeline).

    Each part (embedding, positions, every layer, head) is initialised from its own seed,
    drawn from the global RNG: the weights depend only on the seed set before the build,
    never on which parts this process builds (any TP, DP or pipeline layout).
    """

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, stage: Stage | None = None):
        super().__init__()
        cfg = cfg.resolved()
        self.cfg, self.layout, self.tp_size = cfg, SequenceLayout(cfg), tp.size
        self.stage = stage or Stage(0, 1, 0, cfg.layers)
        self._check_fits(cfg, tp)
        first, last, d = self.stage.is_first, self.stage.is_last, cfg.hidden
        seeds = _PartSeeds()
        self.tok_emb = self.pos_emb = self.rope = None
        if first:
            with seeds.part(0):
                self.tok_emb = tp.embedding(_pad(self.layout.embed_vocab,
                                                 cfg.vocab_pad_multiple), d)
            with seeds.part(1):
                if cfg.position == "learned_1d":
                    self.pos_emb = LearnedPositions1D(cfg.max_positions, d, cfg.init_std)
                elif cfg.position == "learned_3d":
                    self.pos_emb = LearnedPositions3D(self.layout, d, cfg.init_std)
        if cfg.position == "rope_3d":
            self.rope = Rotary3D(self.layout, d // cfg.heads, cfg.rope_theta)
        self.drop = nn.Dropout(cfg.dropout)
        own = range(self.stage.first_layer, self.stage.stop_layer)
        layers = []
        for i in range(cfg.layers):
            if i not in own:
                layers.append(OnOtherStage())
                continue
            with seeds.part(2 + i):
                layers.append(TransformerLayer(cfg, tp, self.layout))
        self.layers = nn.ModuleList(layers)
        self.norm = self.head = None
        if last:
            self.norm = _norm(cfg)
            head_vocab = _pad(cfg.vocab_size, cfg.vocab_pad_multiple)
            with seeds.part(2 + cfg.layers):
                self.head = tp.column(d, head_vocab, bias=False)
            lo, hi = tp.vocab_range(head_vocab)
            # Padded head rows (ids >= V, the tail of the vocabulary) take no probability
            # mass: this rank's logits from local index pad_from on are -inf (None: none).
            self.pad_from = max(cfg.vocab_size, lo) - lo if cfg.vocab_size < hi else None

    def _check_fits(self, cfg: ModelConfig, tp: TensorParallel) -> None:
        for key, value in (("model.heads", cfg.heads), ("model.ffn_hidden", cfg.ffn_hidden),
                           ("model.vocab_pad_multiple", cfg.vocab_pad_multiple)):
            if value % tp.size:
                raise ConfigError(f"{key}={value} is not divisible by parallel.tensor={tp.size}")
        if cfg.position == "learned_1d" and self.layout.seq_len > cfg.max_positions:
            raise ConfigError(f"sequence length {self.layout.seq_len} exceeds "
                              f"model.max_positions={cfg.max_positions}")

    def hidden_states(self, input_ids: torch.Tensor, start: int = 0,
                      cache=None) -> torch.Tensor:
        """input_ids [B, S] at positions [start, start + S) -> final-norm states [B, S, d].
        `cache`: a nbp_mega.generate.StaticKVCache (per-layer keys/values of earlier steps)."""
        return self.norm(self._run_layers(self._embed(input_ids, start), start, cache))

    def _embed(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(start, input_ids.shape[1])
        return self.drop(x)

    def _run_layers(self, x: torch.Tensor, start: int, cache=None) -> torch.Tensor:
        """This stage's layers (all of them without pipeline parallelism)."""
        for i in range(self.stage.first_layer, self.stage.stop_layer):
            layer = self.layers[i]
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(layer, x, self.rope, start, use_reentrant=False)
            else:
                x = layer(x, self.rope, start, None if cache is None else cache.layer(i))
        return x

    def stage_forward(self, x: torch.Tensor) -> torch.Tensor:
        """One pipeline stage's training forward: input_ids [B, S] (stage 0) or the previous
        stage's states [B, S, d] -> the next stage's input, or on the last stage the final
        states of the targets [B, Nt, d] (the prefix predicts nothing), which
        `loss(states, targets)` turns into the per-target loss."""
        if self.stage.is_first:
            x = self._embed(x, 0)
        x = self._run_layers(x, 0)
        if not self.stage.is_last:
            return x
        P = self.layout.prefix_len
        return self.norm(x[:, P : P + self.layout.num_targets])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[..., d] -> this rank's fp32 logit shard [..., Vp/tp], padded ids at -inf."""
        logits = self.head(h).float()
        if self.pad_from is not None:  # in place: a step's [.., V] logits are not copied
            logits[..., self.pad_from:] = float("-inf")
        return logits

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None):
        """input_ids [B, S], targets [B, Nt] -> per-target loss [B, Nt] (nats).

        Without targets (DeepSpeed's pipeline engine feeding one stage): `stage_forward`."""
        if targets is None:
            return self.stage_forward(input_ids)
        h = self.hidden_states(input_ids)
        P = self.layout.prefix_len
        return self.loss(h[:, P : P + targets.shape[1]], targets)  # the prefix predicts nothing

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Final states [B, Nt, d] and targets [B, Nt] -> per-target loss [B, Nt].

        Over model.loss_chunk of the B * Nt positions at a time, each chunk's head and
        cross-entropy recomputed in backward: the fp32 logits (and their softmax and
        gradient) of one chunk exist at a time, never those of the whole micro-batch
        (at the 700M preset's 64k vocabulary, 324 MB per clip).
        """
        chunk, (B, Nt) = self.cfg.loss_chunk, targets.shape
        if not chunk or B * Nt <= chunk:
            return self._loss(h, targets)
        h, targets = h.reshape(B * Nt, -1), targets.reshape(B * Nt)
        losses = [checkpoint(self._loss, h[i : i + chunk], targets[i : i + chunk],
                             use_reentrant=False, preserve_rng_state=False)
                  for i in range(0, B * Nt, chunk)]
        return torch.cat(losses).view(B, Nt)

    def _loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return TensorParallel.cross_entropy(self.logits(h), targets)


class _PartSeeds:
    """Each part of the model initialised from its own seed, all derived from one number
    drawn from the global RNG (so `torch.manual_seed(s)` before the build still decides the
    weights). The global RNG is left as the draw left it, whatever was built."""

    def __init__(self):
        self.base = int(torch.randint(0, 2**40, (), device="cpu"))  # not meta, not zero.Init

    @contextlib.contextmanager
    def part(self, index: int):
        devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.base * 1_000_003 + index)
            yield
