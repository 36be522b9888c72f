"""Training data: token shards on disk (shards.py), the stateful loader (loader.py), and
synthetic token videos for the demo and tests (synthetic.py)."""

from nbp_mega.data.loader import (
    Batch,
    DataConfig,
    TokenLoader,
    batch_digest,
    build_loaders,
    eval_batches,
)
from nbp_mega.data.shards import (
    Sample,
    ShardError,
    ShardIndex,
    check_meta,
    check_tokens,
    expand_shards,
)

__all__ = ["Batch", "DataConfig", "Sample", "ShardError", "ShardIndex", "TokenLoader",
           "batch_digest", "build_loaders", "check_meta", "check_tokens", "eval_batches",
           "expand_shards"]
