"""Generation: a static KV cache, per-position sampling and the block-parallel engine."""

from nbp_mega.generate.engine import generate
from nbp_mega.generate.kv_cache import StaticKVCache
from nbp_mega.generate.sampling import SamplingConfig, filter_logits, sample

__all__ = ["SamplingConfig", "StaticKVCache", "filter_logits", "generate", "sample"]
