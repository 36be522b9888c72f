"""The video tokenizer: published layout and file format, FSQ arithmetic, causality, shapes,
our own format, and errors for bad input."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import math
import os
import pathlib
import shutil
import tempfile

import pytest
import torch

from nbp_mega.tokenizer import (
    FSQ,
    PRESETS,
    Magvit2,
    TokenizerError,
    load_video_tokenizer,
    save_video_tokenizer,
)
from nbp_mega.tokenizer.magvit2 import GroupNorm3D, Magvit2Config, ResidualUnit
from nbp_mega.tokenizer.video import _load_strict

# The published tokenizer's state-dict table, shipped with the tests (a copy of the project's
# shared/reference/nbp_magvit2_state_dict.tsv, which is compared with it where present).
REFERENCE = os.path.join(os.path.dirname(__file__), "data", "nbp_magvit2_state_dict.tsv")
SHARED_REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared",
                                "reference", "nbp_magvit2_state_dict.tsv")


def reference_table() -> dict[str, tuple[int, ...]]:
    table = {}
    with open(REFERENCE) as f:
        for line in f:
            if not line.startswith("#") and line.strip():
                key, shape, _ = line.rstrip("\n").split("\t")
                table[key] = tuple(ast.literal_eval(shape))
    return table


def test_fsq_indices_round_trip_exactly():
    fsq = FSQ((8, 8, 8, 5, 5, 5))
    assert fsq.codebook_size == 64000
    every = torch.arange(64000).view(1, 40, 40, 40)
    codes = fsq.indices_to_codes(every)  # [1, 6, 40, 40, 40]
    center = torch.tensor([4, 4, 4, 2, 2, 2]).view(1, 6, 1, 1, 1)
    digits = torch.round(codes * center).long() + center
    basis = torch.tensor([1, 8, 64, 512, 2560, 12800]).view(1, 6, 1, 1, 1)
    assert torch.equal((digits * basis).sum(1), every)
    assert digits.min() == 0 and (digits.amax(dim=(0, 2, 3, 4)) == torch.tensor(
        [7, 7, 7, 4, 4, 4])).all()
    z = torch.randn(2, 6, 3, 4, 4) * 3
    quantized, indices = fsq(z)
    assert indices.min() >= 0 and indices.max() < 64000
    assert torch.equal(fsq.indices_to_codes(indices), quantized)


def test_fsq_published_arithmetic():
    fsq = FSQ((8, 5))
    half8, half5 = 7 * (1 - 1e-3) / 2, 4 * (1 - 1e-3) / 2
    z = torch.tensor([0.3, -0.7]).view(1, 2, 1, 1, 1)
    expected8 = math.tanh(0.3 + math.tan(0.5 / half8)) * half8 - 0.5  # tan, as published
    expected5 = math.tanh(-0.7) * half5
    assert fsq.bound(z).flatten().tolist() == pytest.approx([expected8, expected5], abs=1e-6)
    _, index = fsq(z)
    assert index.item() == (round(expected8) + 4) + 8 * (round(expected5) + 2)
    z.requires_grad_(True)
    fsq(z)[0].sum().backward()  # straight-through rounding: gradients reach z
    assert (z.grad != 0).all()
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        fsq.indices_to_codes(torch.tensor([[[[40]]]]))


@pytest.mark.skipif(not os.path.exists(SHARED_REFERENCE), reason="no shared/ beside the clone")
def test_shipped_reference_table_is_the_shared_one():
    with open(REFERENCE) as shipped, open(SHARED_REFERENCE) as shared:
        assert shipped.read() == shared.read()


def test_published_layout_matches_reference_table():
    table = reference_table()
    with torch.device("meta"):
        model = Magvit2(PRESETS["nbp-magvit2"])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == table
    assert len(ours) == 434 and sum(math.prod(s) for s in ours.values()) == 370_372_105
    assert PRESETS["nbp-magvit2"].downsample == (4, 8, 8)


@pytest.fixture
def memory_tmp(tmp_path):
    """A folder in RAM (/dev/shm) when it has room: the published-size file is 1.5 GB, which
    this machine's disk writes at ~100 MB/s (15 s a copy); else tmp_path."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4e9:
        with tempfile.TemporaryDirectory(dir=shm) as d:
            yield pathlib.Path(d)
    else:
        yield tmp_path


def test_published_file_loads_strictly_and_runs(memory_tmp):
    """The published format: torch.save({'model_state_dict': {'module.<key>': ...}})."""
    tmp_path = memory_tmp
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Magvit2(PRESETS["nbp-magvit2"])
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("beta") else 0.0, 0.02)
    path = tmp_path / "magvit2_ucf.pt"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "epoch": 7}, path)
    tok = load_video_tokenizer(str(path))
    loaded = tok.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert tok.codebook_size == 64000 and tok.downsample == (4, 8, 8)
    assert tok.latent_shape(17, 128, 128) == (5, 16, 16)
    with open(path, "rb") as f:
        assert tok.checksum() == hashlib.sha256(f.read()).hexdigest()
    video = torch.rand(1, 3, 5, 16, 16) - 0.5
    tokens = tok.encode(video)
    assert tokens.shape == (1, 2, 2, 2) and tokens.dtype == torch.long
    assert tok.decode(tokens).shape == (1, 3, 5, 16, 16)
    # a state with one tensor dropped is another architecture (the strict check every file
    # goes through; checked on the state itself: another 1.5 GB file round trip adds nothing)
    state = {k: v for k, v in model.state_dict().items() if k != "decoder_layers.29.conv.bias"}
    with pytest.raises(TokenizerError, match="another tokenizer architecture: 1 missing"):
        _load_strict(tok.model, state, str(path))


@pytest.fixture(scope="module")
def tiny():
    return load_video_tokenizer("tiny")


def test_shapes_17x128x128(tiny):
    video = torch.rand(2, 3, 17, 128, 128) - 0.5
    tokens = tiny.encode(video)
    assert tokens.shape == (2, 5, 16, 16)
    assert tiny.decode(tokens).shape == (2, 3, 17, 128, 128)
    assert tiny.decode(tokens).abs().max() <= 0.5


@pytest.mark.parametrize("preset,norm", [("tiny", "none"), ("tiny", "group"),
                                         ("tiny-s4", "none")])
def test_encoder_and_decoder_are_causal(preset, norm):
    torch.manual_seed(0)
    model = Magvit2(dataclasses.replace(PRESETS[preset], norm=norm))
    if norm == "none":  # every residual branch starts at 0: give them weights to test
        for unit in model.modules():
            if isinstance(unit, ResidualUnit):
                torch.nn.init.normal_(unit.fn[-1].conv.weight, std=0.05)
    enc, dec = model.encoder_layers, model.decoder_layers
    side = 32 // model.cfg.downsample[1]  # latent height and width of a 32x32 clip
    video = torch.rand(1, 3, 9, 32, 32) - 0.5
    with torch.no_grad():
        base = enc(video)  # [1, 6, 3, side, side]
        assert base.shape == (1, 6, 3, side, side)
        for frame in range(9):
            moved = video.clone()
            moved[:, :, frame] += 0.3
            changed = (enc(moved) - base).abs().amax(dim=(0, 1, 3, 4)) > 0  # [3] latent frames
            first = 0 if frame == 0 else (frame + 3) // 4  # latent k sees frames <= 4k
            assert changed.tolist() == [k >= first for k in range(3)], frame
        codes = torch.rand(1, 6, 3, side, side) - 0.5
        out = dec(codes)  # [1, 3, 9, 32, 32]
        assert out.shape == video.shape
        moved = codes.clone()
        moved[:, :, 1] += 0.5
        changed = (dec(moved) - out).abs().amax(dim=(0, 1, 3, 4)) > 0  # [9] frames
        assert changed.tolist() == [f >= 1 for f in range(9)]  # latent 1 -> frames 1..4


def test_uint8_input_and_own_format(tiny, tmp_path):
    frames = torch.randint(0, 256, (3, 5, 16, 24, 3), dtype=torch.uint8)
    as_float = frames.permute(0, 4, 1, 2, 3).float() / 255 - 0.5
    tokens = tiny.encode(frames)
    assert torch.equal(tokens, tiny.encode(as_float))
    path = tmp_path / "tiny.pt"
    save_video_tokenizer(tiny.model, str(path), meta={"steps": 0})
    again = load_video_tokenizer(str(path))
    assert again.model.cfg == tiny.model.cfg
    assert torch.equal(again.encode(frames), tokens)
    assert not os.path.exists(f"{path}.partial")


def test_bad_input_is_explained(tiny, tmp_path):
    cases = [
        (torch.zeros(1, 3, 16, 32, 32), "16 frames: the tokenizer needs 1 \\+ 4n"),
        (torch.zeros(1, 3, 17, 100, 32), "resolution 100x32.*multiples of 8"),
        (torch.rand(1, 3, 5, 32, 32) + 0.2, "expected \\[-0.5, 0.5\\]"),
        (torch.zeros(1, 3, 5, 32, 32, dtype=torch.int32), "dtype torch.int32"),
        (torch.zeros(1, 5, 32, 32, 3), "float video must be \\[B, 3, T, H, W\\]"),
        (torch.zeros(1, 5, 32, 32, 4, dtype=torch.uint8), "uint8 video must be"),
    ]
    for video, message in cases:
        with pytest.raises(TokenizerError, match=message):
            tiny.encode(video)
    with pytest.raises(TokenizerError, match="neither a tokenizer file nor a preset"):
        load_video_tokenizer("no-such-thing")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(TokenizerError, match="not a readable torch file"):
        load_video_tokenizer(str(tmp_path / "junk.pt"))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(TokenizerError, match="not a video tokenizer checkpoint"):
        load_video_tokenizer(str(tmp_path / "other.pt"))
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in
                                     tiny.model.state_dict().items()}}, tmp_path / "small.pt")
    with pytest.raises(TokenizerError, match="another tokenizer architecture"):
        load_video_tokenizer(str(tmp_path / "small.pt"))  # published format, tiny weights


def test_norm_none_preset():
    """tiny has no normalisation layers, residual branches start at 0 (identity units), and
    its keys are the GroupNorm variant's minus the norm parameters; a bad norm is explained."""
    torch.manual_seed(0)
    plain = Magvit2(PRESETS["tiny"])
    grouped = Magvit2(dataclasses.replace(PRESETS["tiny"], norm="group"))
    assert not any(isinstance(m, GroupNorm3D) for m in plain.modules())
    units = [m for m in plain.modules() if isinstance(m, ResidualUnit)]
    assert units and all(not u.fn[-1].conv.weight.any() and not u.fn[-1].conv.bias.any()
                         for u in units)
    norm_keys = {f"{n}.{p}" for n, m in grouped.named_modules() if isinstance(m, GroupNorm3D)
                 for p in ("weight", "bias")}
    assert set(plain.state_dict()) == set(grouped.state_dict()) - norm_keys
    video = torch.rand(1, 3, 5, 16, 16) - 0.5
    with torch.no_grad():
        x = plain.encoder_layers[0](video)
        assert torch.equal(units[0](x), x)  # an identity unit at init
    # Variance-preserving init: the codes, and through them the reconstruction, depend on the
    # input from step 0. PyTorch's default init gives every clip the same code (z varies
    # 0.005 across clips, the reconstruction not at all), so training starts from a decoder
    # that ignores its codes.
    clips = torch.rand(8, 3, 5, 32, 32) - 0.5
    with torch.no_grad():
        z = plain.encoder_layers(clips)
        recon = plain.decode_codes(plain.quantizer(z)[0])
    assert z.std(0).mean() > 0.05 and recon.std(0).mean() > 0.02
    with pytest.raises(ValueError, match="norm='layer', expected one of"):
        Magvit2Config(norm="layer")
    from nbp_mega.config_fields import ConfigError
    from nbp_mega.tokenizer.train import ModelSection, model_config

    assert model_config(ModelSection(preset="tiny", norm="group")).norm == "group"
    assert model_config(ModelSection(preset="tiny")).norm == "none"
    assert Magvit2(model_config(ModelSection(preset="tiny-s4"))).cfg.downsample == (4, 4, 4)
    assert model_config(ModelSection(preset="tiny", norm="group", norm_groups=4)).norm_groups == 4
    with pytest.raises(ConfigError, match="norm_groups=4 needs model.norm=group"):
        model_config(ModelSection(preset="tiny", norm_groups=4))


def test_tiny_s4_preset(tmp_path):
    """4x4-pixel tokens: 4x the latent grid of tiny; its strides survive our file format."""
    tok = load_video_tokenizer("tiny-s4")
    assert tok.downsample == (4, 4, 4) and tok.latent_shape(5, 32, 32) == (2, 8, 8)
    video = torch.rand(1, 3, 5, 32, 32) - 0.5
    tokens = tok.encode(video)
    assert tokens.shape == (1, 2, 8, 8)
    assert tok.decode(tokens).shape == video.shape
    save_video_tokenizer(tok.model, str(tmp_path / "s4.pt"))
    again = load_video_tokenizer(str(tmp_path / "s4.pt"))
    assert again.model.cfg == tok.model.cfg
    assert torch.equal(again.encode(video), tokens)
