"""SHA-256 of files and of weights: what pins a tokenizer, a detector, a model or a shard chunk
to the bytes it was made with."""

from __future__ import annotations

import hashlib

import torch


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tensors(state: dict) -> str:
    """Hex SHA-256 of a state dict's tensors (names and bytes, in name order): the same
    weights give the same checksum whatever file or checkpoint layout they came from."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
                 .tobytes())
    return h.hexdigest()
