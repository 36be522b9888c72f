"""Time-chunked (streaming) encode/decode equals the one-piece result; bf16 conv stacks with
fp32 quantisation stay close to fp32.

Legend: B batch; T frames; t latent frames; F frames_per_chunk. Tiny preset, random weights.
"""

from __future__ import annotations

import pytest
import torch

from nbp_mega.tokenizer import TokenizerError, load_video_tokenizer
from nbp_mega.tokenizer.magvit2 import CausalConv3d
from nbp_mega.tokenizer.video import _chunk_sizes


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny shapes gain nothing from a second thread, and on a loaded 2-core machine OpenMP
    spin-waiting makes the hundreds of small ops of a chunked run ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def whole():
    return load_video_tokenizer("tiny", frames_per_chunk=None)


def clip(frames: int, batch: int = 1, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=g) - 0.5


def tie_margin(tok, video: torch.Tensor) -> float:
    """Distance of the nearest bounded encoder output to a rounding tie (x.5)."""
    with torch.no_grad():
        bounded = tok.model.quantizer.bound(tok.model.encoder_layers(video))
    return float((bounded - bounded.floor() - 0.5).abs().min())


def test_chunk_sizes():
    assert _chunk_sizes(17, 16) == [17]
    assert _chunk_sizes(33, 16) == [17, 16]
    assert _chunk_sizes(41, 16) == [17, 16, 8]
    assert _chunk_sizes(13, 4) == [5, 4, 4]
    assert _chunk_sizes(41, None) == [41]
    assert _chunk_sizes(3, 1) == [2, 1]  # latent chunks of 1 + 1, then 1


@pytest.mark.parametrize("kernel, stride", [((3, 3, 3), (1, 1, 1)), ((3, 3, 3), (2, 2, 2)),
                                            ((1, 3, 3), (2, 1, 1)), ((5, 1, 1), (3, 1, 1)),
                                            ((2, 3, 3), (1, 2, 2)), ((4, 1, 1), (3, 1, 1))])
def test_causal_conv_streams_any_kernel_and_stride(kernel, stride):
    torch.manual_seed(0)
    conv = CausalConv3d(4, 5, kernel, stride)
    x = torch.randn(2, 4, 23, 6, 6)  # [B, C, T, H, W]
    with torch.no_grad():
        full = conv(x)
        for sizes in ([1] * 23, [4, 7, 12], [2, 0, 21]):  # a chunk of 0 frames is allowed too
            conv.start_stream()
            parts = [conv(piece) for piece in x.split(sizes, dim=2)]
            conv.stop_stream()
            assert torch.allclose(torch.cat(parts, dim=2), full, atol=1e-6), sizes


def test_streamed_encoder_and_decoder_equal_one_piece(whole):
    model, video = whole.model, clip(33)
    with torch.no_grad():
        z = model.encoder_layers(video)  # [1, 6, 9, 4, 4] before rounding
        for sizes in ([17, 16], [5] + [4] * 7, [1] * 33, [2, 7, 3, 21]):
            with model.streaming():
                parts = [model.encoder_layers(piece) for piece in video.split(sizes, dim=2)]
            assert torch.allclose(torch.cat(parts, dim=2), z, atol=1e-5), sizes
        codes = model.encode(video)[0]
        out = model.decode_codes(codes)  # [1, 3, 33, 32, 32]
        for sizes in ([5, 4], [1] * 9, [2, 3, 4]):
            with model.streaming():
                parts = [model.decode_codes(piece) for piece in codes.split(sizes, dim=2)]
            assert torch.allclose(torch.cat(parts, dim=2), out, atol=1e-5), sizes


@pytest.mark.parametrize("frames_per_chunk", [4, 8, 16])
def test_chunked_encode_and_decode_equal_one_piece(whole, frames_per_chunk):
    # 41 frames: F=4 -> 5 + 9x4; F=8 -> 9 + 4x8; F=16 -> 17 + 16 + 8 (not a multiple of F)
    video = clip(41, batch=2)
    assert tie_margin(whole, video) > 1e-4, "the test clip has a value on a rounding tie"
    tok = load_video_tokenizer("tiny", frames_per_chunk=frames_per_chunk, batch_size=1)
    tokens = whole.encode(video)  # [2, 11, 4, 4]
    assert torch.equal(tok.encode(video), tokens)
    assert torch.allclose(tok.decode(tokens), whole.decode(tokens), atol=1e-5)
    assert tok.decode(tokens).shape == (2, 3, 41, 32, 32)


def test_one_chunk_clip_takes_the_one_piece_path(monkeypatch):
    tok = load_video_tokenizer("tiny")  # default frames_per_chunk=16: 17 frames are one chunk
    assert tok.frames_per_chunk == 16

    def refuse():
        raise AssertionError("a one-chunk clip must not stream")

    monkeypatch.setattr(tok.model, "streaming", refuse)
    tokens = tok.encode(clip(17))
    assert tokens.shape == (1, 5, 4, 4) and tok.decode(tokens).shape == (1, 3, 17, 32, 32)


def test_streaming_state_is_reset_between_clips(whole):
    tok = load_video_tokenizer("tiny", frames_per_chunk=4, batch_size=1)
    a, b = clip(13, seed=1), clip(13, seed=2)
    assert tie_margin(whole, torch.cat([a, b])) > 1e-4
    alone_a, alone_b = whole.encode(a), whole.encode(b)
    assert torch.equal(tok.encode(a), alone_a)
    assert torch.equal(tok.encode(b), alone_b)  # nothing of a is carried into b
    assert torch.equal(tok.encode(torch.cat([a, b])), torch.cat([alone_a, alone_b]))
    tokens = torch.cat([alone_a, alone_b])
    assert torch.allclose(tok.decode(tokens), whole.decode(tokens), atol=1e-5)
    model = tok.model
    with pytest.raises(RuntimeError, match="already active"), model.streaming():
        with model.streaming():
            pass
    with pytest.raises(ZeroDivisionError), model.streaming():  # an error inside still resets
        model.encoder_layers(a[:, :, :5])
        raise ZeroDivisionError
    assert torch.equal(tok.encode(b), alone_b)


def test_bad_chunk_size_or_dtype_is_explained():
    for bad in (0, -4, 3, 6, 2.5, True):
        with pytest.raises(TokenizerError, match="positive multiple of the time downsample 4"):
            load_video_tokenizer("tiny", frames_per_chunk=bad)
    with pytest.raises(TokenizerError, match="expected torch.float32 or torch.bfloat16"):
        load_video_tokenizer("tiny", dtype=torch.float16)
    with pytest.raises(TokenizerError, match="expected torch.float32 or torch.bfloat16"):
        load_video_tokenizer("tiny", dtype="half")


def test_bf16_conv_stacks_fp32_quantisation(whole):
    """Measured (tiny, random weights, 4 seeds of 2x33x32x32): 92-94% of the indices equal
    fp32 (98.7-99.1% of the 6 digits); decoding equal tokens: mean |error| 0.0037 (1.3% of
    the output std 0.29), max 0.035. Bounds below have ~2-3x margin; a broken cast would miss
    them by far. Rounding bf16 bounded values would change only ~3% of indices here, too few
    for those bounds: that is caught exactly, by re-quantising the bf16 encoder output in
    fp32."""
    tok = load_video_tokenizer("tiny", dtype="bf16", frames_per_chunk=16)
    assert tok.dtype == torch.bfloat16 and tok.model.quantizer._half.dtype == torch.float32
    assert whole.dtype == torch.float32  # the CPU default
    video = clip(33, batch=2)
    tokens, tokens16 = whole.encode(video), tok.encode(video)  # [2, 9, 4, 4]
    with torch.no_grad():
        z16 = tok.model.encoder_layers(video.bfloat16())  # one piece, bf16
        assert torch.equal(tokens16, whole.model.quantizer(z16.float())[1])  # FSQ in fp32
        bounded = whole.model.quantizer.bound(z16.float())  # [2, 6, 9, 4, 4]
        rounded_in_bf16 = torch.round(bounded.bfloat16()).float()
        assert not torch.equal(rounded_in_bf16, torch.round(bounded)), \
            "this clip must be one on which quantising in bf16 would show"
    levels = torch.tensor(tok.model.quantizer.levels)
    basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long), levels[:-1]]), 0)
    digits = (tokens.unsqueeze(-1) // basis) % levels  # [2, 9, 4, 4, 6]
    digits16 = (tokens16.unsqueeze(-1) // basis) % levels
    assert (tokens16 == tokens).float().mean() > 0.8
    assert (digits16 == digits).float().mean() > 0.97
    err = (tok.decode(tokens) - whole.decode(tokens)).abs()
    assert err.mean() < 0.01 and err.max() < 0.1
    assert tok.decode(tokens).dtype == torch.float32


def test_chunked_encode_bounds_the_largest_activation():
    """Peak memory follows the chunk, not the clip: the largest tensor any layer returns (a
    deterministic stand-in for the allocator's peak) shrinks with frames_per_chunk."""
    largest = [0]

    def record(module, inputs, output):
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel())

    video = clip(65)
    sizes = {}
    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        for frames in (None, 16):
            largest[0] = 0
            tok = load_video_tokenizer("tiny", frames_per_chunk=frames)
            tok.decode(tok.encode(video))
            sizes[frames] = largest[0]
    finally:
        handle.remove()
    assert sizes[16] <= sizes[None] * 17 / 65 * 1.1, sizes
