"""The streaming safetensors writer: what safetensors itself reads back, bit for bit, for the
dtypes an export writes; a tensor that differs from the declared header is refused."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nbp_mega.export.safetensors_stream import SafetensorsWriter


def test_streamed_file_reads_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(5, 3, generator=g),
               "b": torch.randn(7, generator=g).to(torch.bfloat16),
               "c.bias": torch.randn(2, 2, 2, generator=g).to(torch.float16),
               "empty": torch.zeros(0, 4)}
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(str(path), [(k, v.shape, v.dtype) for k, v in tensors.items()],
                           metadata={"format": "pt"}) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert writer.data_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_a_tensor_off_the_header_is_refused(tmp_path):
    entries = [("a", (2, 2), torch.float32), ("b", (3,), torch.float32)]
    with pytest.raises(ValueError, match=r"tensor 0 is \('a', \(2, 3\)"):
        with SafetensorsWriter(str(tmp_path / "x.safetensors"), entries) as writer:
            writer.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="1 of 2 declared tensors written"):
        with SafetensorsWriter(str(tmp_path / "y.safetensors"), entries) as writer:
            writer.write("a", torch.zeros(2, 2))
