"""zstd-exponent and auto: bit-exact on every float pattern, and refusal of payloads that do not fit."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import bloombee_compress
import numpy as np
import pytest
import torch
import zstandard
from bloombee_compress import AutoCompressor, ZstdExponentCompressor, choose_codec
from bloombee_compress.auto import DEFAULT_BANDWIDTH, PROFILES
from bloombee_compress.exponent import TABLE_MAX_PLANE, TABLES, split_planes, table_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bloombee_core.compression import Compressor
from bloombee_core.registry import load_plugins

TABLES_DIR = Path(bloombee_compress.__file__).parent / "tables"
FLOATS = [torch.bfloat16, torch.float16, torch.float32]
CODECS = [ZstdExponentCompressor, AutoCompressor]
UINT = {2: torch.int16, 4: torch.int32}

# Raw bit patterns a float can hold besides ordinary numbers: NaNs with several payloads (quiet,
# signalling, negative, all-ones), ±inf, ±0 and the largest/smallest subnormals.
SPECIAL_BITS = {
    2: {
        torch.bfloat16: [0x7FC0, 0x7F81, 0xFFC1, 0xFFFF, 0x7F80, 0xFF80, 0x8000, 0x0000, 0x0001, 0x807F],
        torch.float16: [0x7E00, 0x7C01, 0xFE01, 0xFFFF, 0x7C00, 0xFC00, 0x8000, 0x0000, 0x0001, 0x83FF],
    },
    4: {
        torch.float32: [
            0x7FC00000,
            0x7F800001,
            0xFFC00123,
            0xFFFFFFFF,
            0x7F800000,
            0xFF800000,
            0x80000000,
            0x00000000,
            0x00000001,
            0x807FFFFF,
        ]
    },
}


def special_bits(dtype: torch.dtype) -> list[int]:
    return SPECIAL_BITS[dtype.itemsize][dtype]


def from_bits(bits: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    signed = bits.astype(np.uint16 if dtype.itemsize == 2 else np.uint32).view(
        np.int16 if dtype.itemsize == 2 else np.int32
    )
    return torch.from_numpy(signed.copy()).view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.numel() == 0 or torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def activation_like(
    dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0, scale: float = 2.0
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


@st.composite
def float_tensors(draw) -> torch.Tensor:
    """Activation-like tensors (so the compressed paths run) of any shape, with special values mixed in."""
    dtype = draw(st.sampled_from(FLOATS))
    shape = tuple(draw(st.lists(st.integers(0, 24), max_size=3)))
    if draw(st.booleans()):  # sometimes a message of whole 576-wide tokens, the real case
        shape = (draw(st.integers(0, 12)), 576)
    numel = int(np.prod(shape)) if shape else 1
    kind = draw(st.sampled_from(["activations", "random bits", "constant"]))
    seed = draw(st.integers(0, 2**16))
    itemsize = dtype.itemsize
    if kind == "random bits":
        bits = np.random.default_rng(seed).integers(0, 1 << (8 * itemsize), numel, dtype=np.uint64)
    elif kind == "constant":
        bits = np.full(numel, draw(st.sampled_from(special_bits(dtype))), dtype=np.uint64)
    else:
        scale = draw(st.sampled_from([1e-6, 1.0, 40.0, 3e4]))
        base = activation_like(dtype, (numel,), seed, scale)
        bits = base.view(UINT[itemsize]).numpy().astype(np.int64).astype(np.uint64) % (1 << (8 * itemsize))
    if numel:
        for position, value in draw(
            st.lists(st.tuples(st.integers(0, numel - 1), st.sampled_from(special_bits(dtype))), max_size=8)
        ):
            bits[position] = value
    return from_bits(bits, dtype, shape)


PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(tensor=float_tensors())
def test_exponent_round_trip_is_bit_exact(tensor: torch.Tensor) -> None:
    codec = ZstdExponentCompressor()
    payload = codec.encode(tensor)
    assert len(payload) <= tensor.numel() * tensor.element_size() + 1  # never more than one byte of overhead
    assert same_bits(codec.decode(payload, tensor.dtype, tuple(tensor.shape)), tensor)


@PROPERTY
@given(tensor=float_tensors(), bandwidth=st.sampled_from([1e5, 1e6, DEFAULT_BANDWIDTH, 1e9, 1e12]))
def test_auto_round_trip_is_bit_exact(tensor: torch.Tensor, bandwidth: float) -> None:
    codec = AutoCompressor()
    codec.bandwidth_bytes_per_s = bandwidth
    payload = codec.encode(tensor)
    assert same_bits(AutoCompressor().decode(payload, tensor.dtype, tuple(tensor.shape)), tensor)


def table_like(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Values whose exponent plane follows a packaged table (as SmolLM2 hidden states do), with random
    sign and mantissa bits: the range-coded path is taken for small messages."""
    layout = "f16" if dtype == torch.float16 else "e8"
    table = next(t for t in TABLES.values() if t.layout == layout and t.row == 1)
    counts = np.load(TABLES_DIR / table.file)[table.row].astype(np.float64)
    rng = np.random.default_rng(seed)
    numel = int(np.prod(shape))
    top = rng.choice(256, size=numel, p=counts / counts.sum()).astype(np.uint64)
    bits = 8 * dtype.itemsize
    rest = rng.integers(0, 1 << (bits - 8), numel, dtype=np.uint64)
    rotated = (top << np.uint64(bits - 8)) | rest
    words = (rotated >> np.uint64(1)) | ((rotated & np.uint64(1)) << np.uint64(bits - 1))
    return from_bits(words, dtype, shape)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("tokens", [1, 3, 7, 8, 64])
@pytest.mark.parametrize("make", [table_like, activation_like], ids=["table-like", "randn"])
def test_both_paths_compress_with_specials(make, dtype: torch.dtype, tokens: int) -> None:
    tensor = make(dtype, (tokens, 576), seed=tokens)
    bits = tensor.reshape(-1).view(UINT[dtype.itemsize])
    signed = np.array(special_bits(dtype), dtype=np.uint64).astype(
        np.uint16 if dtype.itemsize == 2 else np.uint32
    )
    for position, value in enumerate(signed.view(np.int16 if dtype.itemsize == 2 else np.int32)):
        bits[position * 37] = int(value)
    payload = ZstdExponentCompressor().encode(tensor)
    small = tokens * 576 <= TABLE_MAX_PLANE
    # Small messages like the tables' data are range-coded; others get a zstd frame of their own.
    assert payload[0] in ({1, *TABLES} if small else {1})
    if make is table_like:
        assert (payload[0] >= 2) == small
    assert len(payload) < 0.9 * tensor.numel() * dtype.itemsize
    assert same_bits(ZstdExponentCompressor().decode(payload, dtype, tuple(tensor.shape)), tensor)


@pytest.mark.parametrize("cls", CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize(
    "tensor",
    [
        torch.zeros(0, 576, dtype=torch.bfloat16),
        torch.zeros(0, dtype=torch.float32),
        torch.tensor(2.5, dtype=torch.float16),
        torch.arange(24, dtype=torch.float32).reshape(4, 6).t(),
        torch.arange(-50, 50, dtype=torch.int64),
        torch.ones(3, 3, dtype=torch.float64),
        torch.zeros(4096, dtype=torch.bfloat16),
    ],
    ids=["empty-bf16", "empty-fp32", "scalar", "transposed", "int64", "float64", "zeros"],
)
def test_edge_tensors(cls: type[Compressor], tensor: torch.Tensor) -> None:
    restored = cls().decode(cls().encode(tensor), tensor.dtype, tuple(tensor.shape))
    assert same_bits(restored, tensor.contiguous())
    restored.add_(0)  # an ordinary, writable tensor


def test_non_floats_are_never_compressed() -> None:
    tokens = torch.zeros(4096, dtype=torch.int64)
    assert ZstdExponentCompressor().encode(tokens)[0] == 0
    auto = AutoCompressor()
    auto.bandwidth_bytes_per_s = 1.0
    assert auto.encode(tokens)[0] == 0
    assert choose_codec(1 << 20, "int64", 1.0) == "none"
    assert choose_codec(1 << 20, "float64", 1.0) == "none"


# --- auto's choice ---------------------------------------------------------------------------------


def test_choice_follows_the_link() -> None:
    one_token, prefill = 576 * 2, 128 * 576 * 2
    assert choose_codec(one_token, "bfloat16", DEFAULT_BANDWIDTH) == "none"  # ~30 us saved < ~160 us spent
    assert choose_codec(one_token, "bfloat16", 1e6) == "zstd-exponent"
    assert choose_codec(prefill, "bfloat16", DEFAULT_BANDWIDTH) == "zstd-exponent"
    assert choose_codec(prefill, "bfloat16", 10e9) == "none"
    assert choose_codec(0, "bfloat16", 1.0) == "none"
    with pytest.raises(ValueError, match="bandwidth must be positive"):
        choose_codec(prefill, "bfloat16", 0.0)


@given(
    nbytes=st.integers(1, 1 << 26),
    dtype=st.sampled_from(sorted(PROFILES)),
    slow=st.floats(1e3, 1e11),
    factor=st.floats(1.0, 1e3),
)
@settings(max_examples=200, deadline=None)
def test_a_slower_link_never_turns_compression_off(
    nbytes: int, dtype: str, slow: float, factor: float
) -> None:
    if choose_codec(nbytes, dtype, slow * factor) == "zstd-exponent":
        assert choose_codec(nbytes, dtype, slow) == "zstd-exponent"


def test_auto_uses_the_updated_link_estimate() -> None:
    tensor = activation_like(torch.bfloat16, (1, 576), seed=3)
    auto = AutoCompressor(AutoCompressor.Options(bandwidth_bytes_per_s=1e9, rtt_s=0.02))
    assert auto.rtt_s == 0.02 and auto.encode(tensor)[0] == 0
    auto.bandwidth_bytes_per_s = 1e5
    payload = auto.encode(tensor)
    assert payload[0] == 1 and len(payload) < 0.75 * 1152
    assert same_bits(AutoCompressor().decode(payload, tensor.dtype, (1, 576)), tensor)


# --- refusals --------------------------------------------------------------------------------------


def exponent_payloads() -> list[tuple[str, bytes, torch.Tensor]]:
    small = activation_like(torch.bfloat16, (1, 576), seed=1)
    large = activation_like(torch.float32, (16, 576), seed=2)
    return [
        ("range-coded", ZstdExponentCompressor().encode(small), small),
        ("zstd", ZstdExponentCompressor().encode(large), large),
    ]


@pytest.mark.parametrize("kind", ["range-coded", "zstd"])
def test_truncated_padded_or_reshaped_payloads_are_refused(kind: str) -> None:
    payload, tensor = next((p, t) for k, p, t in exponent_payloads() if k == kind)
    shape = tuple(tensor.shape)
    for bad in [
        payload[:-1],
        payload[:-4],
        payload[:-100],
        payload + b"\x00",
        payload + bytes(4),
        payload[:1],
        b"",
    ]:
        with pytest.raises(ValueError):
            ZstdExponentCompressor().decode(bad, tensor.dtype, shape)
        with pytest.raises(ValueError):
            AutoCompressor().decode(b"\x01" + bad, tensor.dtype, shape)
    for other in [(shape[0], shape[1] - 1), (shape[0] + 1, shape[1]), (0,)]:
        with pytest.raises(ValueError):
            ZstdExponentCompressor().decode(payload, tensor.dtype, other)


def test_range_coded_payload_with_a_flipped_word_is_refused() -> None:
    (_, payload, tensor), _ = exponent_payloads()
    for position in (1, 5, 40):
        bad = bytearray(payload)
        bad[position] ^= 0xFF
        with pytest.raises(ValueError, match="corrupt|exactly"):
            ZstdExponentCompressor().decode(bytes(bad), tensor.dtype, (1, 576))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_garbage_is_refused(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(0)
    shape = (2, 576)
    raw = 2 * 576 * dtype.itemsize
    for table in [1, *TABLES]:
        for size in (4, 64, raw // dtype.itemsize * (dtype.itemsize - 1) + 300):
            garbage = bytes([table]) + rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            with pytest.raises(ValueError):
                ZstdExponentCompressor().decode(garbage, dtype, shape)


@PROPERTY
@given(garbage=st.binary(max_size=3000), dtype=st.sampled_from(FLOATS), tokens=st.integers(0, 3))
def test_any_payload_gives_a_value_error_or_a_tensor_of_the_right_size(
    garbage: bytes, dtype: torch.dtype, tokens: int
) -> None:
    for codec in (ZstdExponentCompressor(), AutoCompressor()):
        try:
            out = codec.decode(garbage, dtype, (tokens, 576))
        except ValueError:
            continue
        assert out.dtype == dtype and out.shape == (tokens, 576)


def test_unknown_table_and_tag_are_refused() -> None:
    rest = bytes(576)
    with pytest.raises(ValueError, match="code table 200, which this peer does not have"):
        ZstdExponentCompressor().decode(bytes([200]) + bytes(8) + rest, torch.bfloat16, (1, 576))
    with pytest.raises(ValueError, match="codec tag 7"):
        AutoCompressor().decode(b"\x07" + bytes(1152), torch.bfloat16, (1, 576))
    # A table for fp16's layout cannot code a bf16 plane.
    fp16_table = next(t.id for t in TABLES.values() if t.layout == "f16")
    with pytest.raises(ValueError, match="not one for torch.bfloat16"):
        ZstdExponentCompressor().decode(bytes([fp16_table]) + bytes(8) + rest, torch.bfloat16, (1, 576))
    with pytest.raises(ValueError, match="not one for torch.int64"):
        ZstdExponentCompressor().decode(b"\x01" + bytes(100), torch.int64, (4,))
    assert table_model(2).table.layout == "e8"


def zstd_plane_payload(frame: bytes, numel: int, itemsize: int = 2) -> bytes:
    return b"\x01" + frame + bytes(numel * (itemsize - 1))


def test_declared_size_over_the_expected_size_is_refused() -> None:
    plane = split_planes(activation_like(torch.bfloat16, (16, 576)).view(torch.uint8).reshape(-1).numpy(), 2)[
        0
    ]
    frame = zstandard.ZstdCompressor().compress(plane.tobytes() + b"\x7f")  # one exponent too many
    with pytest.raises(ValueError, match="declares 9217 bytes, expected 9216"):
        ZstdExponentCompressor().decode(zstd_plane_payload(frame, 9216), torch.bfloat16, (16, 576))


def test_bombs_are_refused_without_allocating_their_size() -> None:
    numel = 4096
    honest = zstandard.ZstdCompressor(level=3).compress(bytes(256 << 20))  # 256 MiB of zeros in ~8 KiB
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=10, write_content_size=False)
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()
    unsized = stream.compress(bytes(64 << 20)) + stream.flush()
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27, write_content_size=False)
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()
    huge_window = stream.compress(bytes(1 << 20)) + stream.flush()
    cases = [(honest, "declares 268435456 bytes"), (unsized, "more than 4096 bytes"), (huge_window, "window")]
    tracemalloc.start()
    try:
        for frame, message in cases:
            with pytest.raises(ValueError, match=message):
                ZstdExponentCompressor().decode(zstd_plane_payload(frame, numel), torch.bfloat16, (numel,))
            with pytest.raises(ValueError, match=message):
                AutoCompressor().decode(b"\x01" + zstd_plane_payload(frame, numel), torch.bfloat16, (numel,))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # numpy/torch buffers are traced: nothing near the bombs' sizes was allocated


def test_registered_and_listed() -> None:
    plugins = load_plugins()
    assert isinstance(plugins.create("compressors", "auto"), AutoCompressor)
    assert isinstance(plugins.create("compressors", "zstd-exponent"), ZstdExponentCompressor)
