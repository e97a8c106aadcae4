"""Compressors: bit-exact round trips, and refusal of payloads that do not fit the expected tensor."""

from __future__ import annotations

import struct

import bloombee_compress
import lz4.block
import pluggy
import pytest
import torch
import zstandard
from bloombee_compress import Lz4Compressor, RawCompressor, ZstdByteSplitCompressor, ZstdCompressor
from pydantic import ValidationError

from bloombee_core import hookspecs
from bloombee_core.compression import Compressor, expected_nbytes

ALL = [RawCompressor, Lz4Compressor, ZstdCompressor, ZstdByteSplitCompressor]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def activations(dtype: torch.dtype, shape: tuple[int, ...] = (2, 9, 64)) -> torch.Tensor:
    """Activation-like values plus every special value a float can hold."""
    torch.manual_seed(0)
    values = torch.randn(shape) * 3
    flat = values.view(-1)
    flat[:6] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-40])
    tensor = values.to(dtype)
    # A NaN with a non-default payload must survive too: set its low mantissa bits directly.
    raw = tensor.view(-1).view(torch.uint8)
    raw[0] = raw[0] | 0x1
    return tensor


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits_a, bits_b = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits_a, bits_b)


def unsized_frame(data: bytes, window_log: int) -> bytes:
    """A zstd frame that does not declare its content size, with the given window."""
    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=window_log, write_content_size=False
    )
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()  # size unknown up front
    return stream.compress(data) + stream.flush()


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_round_trip_is_bit_exact(cls: type[Compressor], dtype: torch.dtype) -> None:
    tensor = activations(dtype)
    assert torch.isnan(tensor.view(-1)[0]) and torch.signbit(tensor.view(-1)[3].float())
    restored = cls().decode(cls().encode(tensor), dtype, tuple(tensor.shape))
    assert same_bits(restored, tensor)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
@pytest.mark.parametrize(
    "tensor",
    [
        torch.zeros(0, 5),  # empty
        torch.tensor(2.5, dtype=torch.bfloat16),  # 0-d
        torch.arange(24, dtype=torch.float32).reshape(4, 6).t(),  # not contiguous
        torch.arange(-50, 50, dtype=torch.int64),  # token ids are tensors too
        torch.zeros(4096, dtype=torch.bfloat16),  # highly compressible
    ],
    ids=["empty", "scalar", "transposed", "int64", "zeros"],
)
def test_round_trip_edge_shapes(cls: type[Compressor], tensor: torch.Tensor) -> None:
    restored = cls().decode(cls().encode(tensor), tensor.dtype, tuple(tensor.shape))
    assert same_bits(restored, tensor.contiguous())
    restored.add_(0)  # the result must be an ordinary, writable tensor


def test_zstd_levels_change_size_not_content() -> None:
    tensor = activations(torch.bfloat16, (8, 256))
    payloads = [
        ZstdByteSplitCompressor(ZstdByteSplitCompressor.Options(level=lv)).encode(tensor) for lv in (1, 19)
    ]
    for payload in payloads:
        assert same_bits(ZstdByteSplitCompressor().decode(payload, tensor.dtype, tuple(tensor.shape)), tensor)
    with pytest.raises(ValidationError):
        ZstdCompressor.Options(level=99)
    with pytest.raises(ValidationError):
        ZstdCompressor.Options(levle=3)


def test_bytesplit_beats_plain_zstd_on_bf16() -> None:
    # Smooth, activation-like bf16 values: their exponent bytes repeat, their mantissa bytes do not.
    torch.manual_seed(1)
    tensor = (torch.randn(64, 512) * torch.linspace(0.5, 2.0, 512)).to(torch.bfloat16)
    raw = tensor.numel() * tensor.element_size()
    split = len(ZstdByteSplitCompressor().encode(tensor))
    plain = len(ZstdCompressor().encode(tensor))
    assert split < plain < raw


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_wrong_shape_is_refused(cls: type[Compressor]) -> None:
    tensor = activations(torch.float32, (4, 32))
    payload = cls().encode(tensor)
    for shape in [(4, 31), (4, 33), (0,)]:
        with pytest.raises(ValueError, match="bytes|planes|corrupt"):
            cls().decode(payload, torch.float32, shape)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_truncated_or_padded_payload_is_refused(cls: type[Compressor]) -> None:
    tensor = activations(torch.bfloat16, (4, 64))
    payload = cls().encode(tensor)
    for bad in [payload[:-1], payload + b"\x00", payload + payload, b""]:
        with pytest.raises(ValueError):
            cls().decode(bad, tensor.dtype, tuple(tensor.shape))


def test_bad_shapes_are_refused_before_anything_is_allocated() -> None:
    for shape in [(-1, 4), (2.0, 3), (True, 3)]:
        with pytest.raises(ValueError, match="non-negative ints"):
            expected_nbytes(torch.float32, shape)  # type: ignore[arg-type]


def test_zstd_bomb_with_honest_header_is_refused() -> None:
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(256 << 20))  # 256 MiB of zeros, ~8 KiB
    with pytest.raises(ValueError, match="declares 268435456 bytes, expected 4096"):
        ZstdCompressor().decode(bomb, torch.float32, (1024,))


def test_zstd_bomb_without_content_size_stops_at_expected_size() -> None:
    # No size in the header: the decoder must stop after the expected bytes instead of inflating it all.
    bomb = unsized_frame(bytes(256 << 20), window_log=10)
    with pytest.raises(ValueError, match="more than 4096 bytes"):
        ZstdCompressor().decode(bomb, torch.float32, (1024,))


def test_bytesplit_bomb_and_forged_header_are_refused() -> None:
    bomb = unsized_frame(bytes(64 << 20), window_log=10)
    forged = struct.pack("<B2I", 2, len(bomb), len(bomb)) + bomb + bomb
    with pytest.raises(ValueError, match="more than 8 bytes"):
        ZstdByteSplitCompressor().decode(forged, torch.bfloat16, (8,))
    with pytest.raises(ValueError, match="4 byte planes, expected 2"):
        ZstdByteSplitCompressor().decode(struct.pack("<B4I", 4, 0, 0, 0, 0), torch.bfloat16, (8,))
    with pytest.raises(ValueError, match="header announces"):
        ZstdByteSplitCompressor().decode(struct.pack("<B2I", 2, 10**9, 5) + b"x", torch.bfloat16, (8,))


def test_lz4_bomb_is_refused() -> None:
    bomb = lz4.block.compress(bytes(64 << 20), store_size=False)
    with pytest.raises(ValueError, match="corrupt or decodes to more than the 4096"):
        Lz4Compressor().decode(bomb, torch.float32, (1024,))


def test_hook_registers_every_builtin_through_pluggy() -> None:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(bloombee_compress)
    manager.check_pending()
    (classes,) = manager.hook.bloombee_register_compressors()
    assert {cls.name for cls in classes} == {"none", "lz4", "zstd", "zstd-bytesplit", "zstd-exponent", "auto"}
    assert all(issubclass(cls, Compressor) for cls in classes)


def test_zstd_frame_asking_for_a_huge_window_is_refused() -> None:
    # A 64 MiB window without a content size: the decoder would allocate the window before any output.
    frame = unsized_frame(bytes(1 << 20), window_log=26)
    assert zstandard.get_frame_parameters(frame).window_size == 1 << 26
    with pytest.raises(ValueError, match="67108864-byte window"):
        ZstdCompressor().decode(frame, torch.float32, (1024,))
