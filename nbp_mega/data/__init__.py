"""Training data: token shards on disk (shards.py), the streaming loader (stream.py), its
wiring and validation batches (loader.py), synthetic token videos for the demo and tests."""

from nbp_mega.data.loader import DataConfig, build_loaders, eval_batches
from nbp_mega.data.shards import (
    Sample,
    ShardError,
    ShardIndex,
    check_meta,
    check_tokens,
    expand_shards,
)
from nbp_mega.data.stream import Batch, StreamLoader, StreamSpec, merge_states

__all__ = ["Batch", "DataConfig", "Sample", "ShardError", "ShardIndex", "StreamLoader",
           "StreamSpec", "build_loaders", "check_meta", "check_tokens", "eval_batches",
           "expand_shards", "merge_states"]
