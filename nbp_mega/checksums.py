"""SHA-256 of files: what pins a tokenizer, a detector or a shard chunk to the bytes it was
made with."""

from __future__ import annotations

import hashlib


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
