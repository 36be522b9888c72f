"""A safetensors file written one tensor at a time (memory: the largest tensor, not the file).

safetensors.torch.save_file takes every tensor of the file at once and serialises them into
one buffer first. The format is simple enough to stream: an 8-byte little-endian header
length, a JSON header {name: {dtype, shape, data_offsets: [begin, end)}, "__metadata__": {...}}
padded with spaces to a multiple of 8 bytes, then the tensors' bytes back to back in header
order. Shapes and dtypes are known before any tensor is read (from the model's TPPlan), so the
header goes first and each tensor's bytes follow as it arrives. Readers (safetensors'
safe_open / load_file, transformers) check the offsets and sizes.

    with SafetensorsWriter(path, [(name, shape, torch.float32), ...]) as w:
        for name, tensor in source: w.write(name, tensor)
"""

from __future__ import annotations

import json
import math
import struct

import torch

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class SafetensorsWriter:
    def __init__(self, path: str, entries, metadata: dict[str, str] | None = None):
        """entries: (name, shape, dtype) of every tensor, in the order they will be written."""
        self.path, self.order, header, offset = path, [], {}, 0
        for name, shape, dtype in entries:
            nbytes = math.prod(shape) * torch.finfo(dtype).bits // 8
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self.order.append((name, tuple(shape), dtype))
            offset += nbytes
        header["__metadata__"] = dict(metadata or {})
        text = json.dumps(header, separators=(",", ":")).encode()
        self._header = text + b" " * (-len(text) % 8)
        self.data_bytes, self._next = offset, 0
        self._file = None

    def __enter__(self) -> SafetensorsWriter:
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed in __exit__)
        self._file.write(struct.pack("<Q", len(self._header)))
        self._file.write(self._header)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor, exactly as declared (name, shape, dtype)."""
        want = self.order[self._next] if self._next < len(self.order) else None
        got = (name, tuple(tensor.shape), tensor.dtype)
        if got != want:
            raise ValueError(f"{self.path}: tensor {self._next} is {got}, the header declared "
                             f"{want}")
        data = tensor.detach().contiguous().cpu()
        if data.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16
            data = data.view(torch.int16)
        if data.numel():
            self._file.write(memoryview(data.numpy().reshape(-1)).cast("B"))
        self._next += 1

    def __exit__(self, kind, value, traceback) -> None:
        self._file.close()
        if kind is None and self._next != len(self.order):
            raise ValueError(f"{self.path}: {self._next} of {len(self.order)} declared tensors "
                             "written")
