"""A static KV cache: per-layer key/value buffers preallocated once and written in place.

Legend: B batch; Nl = N / tp heads on this rank; S_max = the longest sequence; D head dim.

Each step writes its keys and values at [start, start + S) and hands attention the whole
buffer: block_causal_attention masks the keys past the queries' block, so the shapes never
change from step to step (no torch.cat, no reallocation: a step can be captured in a graph).
"""

from __future__ import annotations

import torch


class LayerCache:
    """One layer's view of the cache: `update` writes new keys/values, returns the buffers."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v  # [B, Nl, S_max, D]

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int):
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; a step wrote "
                             f"[{start}, {end})")
        self.k[:, :, start:end].copy_(k)
        self.v[:, :, start:end].copy_(v)
        return self.k, self.v


class StaticKVCache:
    """Keys and values of every layer: [layers, B, Nl, S_max, D] each, allocated once."""

    def __init__(self, layers: int, batch: int, heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device):
        shape = (layers, batch, heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._layers = [LayerCache(self.k[i], self.v[i]) for i in range(layers)]

    @classmethod
    def for_model(cls, model, batch: int) -> StaticKVCache:
        """A cache sized for `model`'s whole sequence, in its parameters' dtype and device."""
        attn = model.layers[0].attn
        weight = next(model.parameters())
        return cls(len(model.layers), batch, attn.local_heads, model.layout.seq_len,
                   attn.head_dim, dtype=weight.dtype, device=weight.device)

    @classmethod
    def reused_for(cls, model, batch: int) -> StaticKVCache:
        """`for_model`'s cache, kept on the model (the latest only) and handed out again to
        the next call of the same batch size: allocating and zeroing it took 115 ms a clip at
        the CPU bench's batch 8. What the previous call left in it lies only past what each
        step has written, where attention masks every key (finite values, times 0)."""
        cache = model.__dict__.get("_generation_kv_cache")
        weight = next(model.parameters())
        if (cache is None or cache.k.shape[1] != batch or cache.k.dtype != weight.dtype
                or cache.k.device != weight.device):
            model.__dict__.pop("_generation_kv_cache", None)  # free the old one first
            cache = model.__dict__["_generation_kv_cache"] = cls.for_model(model, batch)
        return cache

    def layer(self, i: int) -> LayerCache:
        return self._layers[i]
