"""``zstd-exponent``: the exponent of every float gets its own byte plane, entropy-coded; the rest is raw.

Activations spend most of their entropy in the mantissa and sign, which are close to random, while
the exponent of neighbouring values takes only a few distinct values (~2.8 of 8 bits on SmolLM2 hidden
states, see docs/compression.md). So the codec rotates each element left by one bit, which puts the
whole exponent in the top byte (bf16 and fp32; for fp16 the 5-bit exponent plus the top 3 mantissa
bits), compresses that plane with zstd set up as a near-pure Huffman coder (a 7-byte minimum match and
a tiny hash table: matches are rare on this data, so looking for them only costs time), and stores the
other bytes as they are (their entropy is 7.9-8.0 bits per byte: compressing them gains < 1 %).

Small messages (a one-token decode step: 576 values for SmolLM2) cannot carry their own code table
(zstd's costs ~40 bytes of 576): they are range-coded (rANS, ``constriction``) with one of a few
static tables that ship with the package (``tables/``, built from SmolLM2 hidden states by
``python -m bench.compress_tables``); the encoder picks the table that codes the message shortest. The
payload names the table it used, so per-model or per-session tables can be added under new ids.

Payload: one byte ``table``, then

* ``table == 0``: the tensor's bytes as they are (any dtype; also whenever the planes would not be
  smaller);
* ``table == 1``: one zstd frame holding the exponent plane, then the other byte planes raw (their size
  is known to the receiver);
* ``table >= 2``: the CRC-32 of the exponent plane (4 bytes, little-endian), the plane as
  little-endian 32-bit rANS words coded with packaged table ``table``, then the other byte planes
  raw. (A rANS decoder turns any words into some symbols; the CRC is what refuses a damaged payload.)

Decoding checks the frame header (declared size, window, dictionary id) before decompressing and never
writes more than the tensor's size.
"""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import zstandard

from bloombee_compress.compressors import MAX_ZSTD_WINDOW_SLACK, zstd_decompress_into
from bloombee_core.compression import Compressor, expected_nbytes, tensor_bytes_view, tensor_from_bytes

if TYPE_CHECKING:
    import torch

RAW_TABLE = 0
ZSTD_TABLE = 1
# Planes this small or smaller are range-coded with a packaged table (measured on SmolLM2: smaller than
# zstd up to ~16 tokens × 576; zstd is faster from a few thousand symbols on).
TABLE_MAX_PLANE = 4096
CRC_SIZE = 4
# What zstd spends besides the coded symbols on a small exponent plane (frame, block and Huffman table
# headers): measured 35-45 bytes on 576-byte SmolLM2 planes.
ZSTD_TABLE_COST = 40
WINDOW_LOG = 19  # zstd level 1's window; the decoder refuses frames asking for more than 1 MiB


@dataclass(frozen=True)
class Table:
    """One static code table: symbol counts (all > 0) for the exponent plane of one layout."""

    id: int
    layout: str  # "e8" (bf16 and fp32: the 8-bit exponent) or "f16" (fp16: 5 exponent + 3 mantissa bits)
    file: str  # in bloombee_compress/tables: a [tables, 256] uint32 .npy of counts
    row: int


TABLE_FILES = {"e8": "smollm2-e8-v1.npy", "f16": "smollm2-f16-v1.npy"}
TABLES: dict[int, Table] = {
    **{2 + row: Table(2 + row, "e8", TABLE_FILES["e8"], row) for row in range(4)},
    **{6 + row: Table(6 + row, "f16", TABLE_FILES["f16"], row) for row in range(4)},
}
"""Packaged tables by id. Ids are part of the wire format: never reuse or change one, add new ids."""


def _zstd_params() -> zstandard.ZstdCompressionParameters:
    # strategy 1 (fast), min_match 7 and hash_log 6: measured 2-3x faster than level 1 and a smaller
    # plane (fewer short matches that cost more than the Huffman-coded literals they replace).
    return zstandard.ZstdCompressionParameters(
        window_log=WINDOW_LOG,
        hash_log=6,
        chain_log=6,
        search_log=1,
        min_match=7,
        target_length=0,  # > 0 would switch the literals' Huffman coding off with the fast strategy
        strategy=1,
        write_content_size=True,
    )


@dataclass(frozen=True)
class _Model:
    table: Table
    categorical: object  # constriction.stream.model.Categorical


@dataclass(frozen=True)
class _LayoutModels:
    models: tuple[_Model, ...]  # by row
    code_lengths: np.ndarray  # [rows, 256] float64 -log2(p): picks the table that codes a message shortest


@cache
def _layout_models(layout: str) -> _LayoutModels:
    import constriction

    with resources.files("bloombee_compress").joinpath("tables", TABLE_FILES[layout]).open("rb") as file:
        counts = np.load(file, allow_pickle=False).astype(np.float64)
    tables = sorted((t for t in TABLES.values() if t.layout == layout), key=lambda t: t.row)
    if counts.shape != (len(tables), 256) or not (counts > 0).all():
        raise RuntimeError(f"packaged code table file {TABLE_FILES[layout]} is damaged: {counts.shape}")
    probs = counts / counts.sum(axis=1, keepdims=True)
    models = tuple(
        _Model(table, constriction.stream.model.Categorical(probs[table.row], perfect=False))
        for table in tables
    )
    return _LayoutModels(models, -np.log2(probs))


def table_model(table_id: int) -> _Model:
    table = TABLES.get(table_id)
    if table is None:
        known = ", ".join(str(i) for i in sorted(TABLES))
        raise ValueError(
            f"zstd-exponent payload uses code table {table_id}, which this peer does not have (it has {known})"
        )
    return _layout_models(table.layout).models[table.row]


class _Contexts(threading.local):
    """zstd contexts are not thread-safe: one set per thread."""

    def __init__(self) -> None:

        self.compressor = zstandard.ZstdCompressor(compression_params=_zstd_params())
        # max_window_size also bounds any frame after the first, whose header nobody checked.
        self.decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW_SLACK)


_contexts = _Contexts()

# 16-bit split: rotate left by one, then the top byte is the exponent plane and the low byte the rest.
_ALL16 = np.arange(1 << 16, dtype=np.uint32)
_ROT16 = ((_ALL16 << 1) | (_ALL16 >> 15)) & 0xFFFF
SPLIT16_TOP = (_ROT16 >> 8).astype(np.uint8)  # np.take with these tables: ~1 GB/s, 2x numpy shifts
SPLIT16_LOW = (_ROT16 & 0xFF).astype(np.uint8)
del _ALL16, _ROT16


@cache
def _layouts() -> dict[torch.dtype, str]:
    import torch

    return {torch.bfloat16: "e8", torch.float32: "e8", torch.float16: "f16"}


def _layout(dtype: torch.dtype) -> str | None:
    return _layouts().get(dtype)


def split_planes(data: np.ndarray, itemsize: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(exponent plane, other planes) of ``data`` (a flat uint8 array of 2- or 4-byte elements)."""
    if itemsize == 2:
        words = data.view(np.uint16)
        return np.take(SPLIT16_TOP, words), [np.take(SPLIT16_LOW, words)]
    words = data.view(np.uint32)
    rotated = (words << 1) | (words >> 31)
    return (rotated >> 24).astype(np.uint8), [(rotated >> 16).astype(np.uint8), rotated.astype(np.uint16)]


def merge_planes(top: np.ndarray, rest: memoryview, itemsize: int, out: np.ndarray) -> None:
    """Inverse of :func:`split_planes`, written into ``out`` (uint16 or uint32 array)."""
    numel = len(top)
    if itemsize == 2:
        rotated = (top.astype(np.uint16) << 8) | np.frombuffer(rest, dtype=np.uint8, count=numel)
        np.bitwise_or(rotated >> 1, rotated << 15, out=out)
        return
    mid = np.frombuffer(rest, dtype=np.uint8, count=numel)
    low = np.frombuffer(rest, dtype=np.uint16, count=numel, offset=numel)
    rotated = (top.astype(np.uint32) << 24) | (mid.astype(np.uint32) << 16) | low
    np.bitwise_or(rotated >> 1, rotated << 31, out=out)


class ZstdExponentCompressor(Compressor):
    """Exponent byte plane entropy-coded with zstd, the other bytes raw (bf16, fp16, fp32)."""

    name: ClassVar[str] = "zstd-exponent"
    description: ClassVar[str] = (
        "floats: exponent byte plane Huffman-coded by zstd (packaged tables for small messages), rest raw"
    )

    def encode(self, tensor: torch.Tensor) -> bytes:
        data = tensor_bytes_view(tensor).numpy()
        layout = _layout(tensor.dtype)
        if layout is None or data.size == 0:
            return bytes([RAW_TABLE]) + data.tobytes()
        top, rest = split_planes(data, tensor.element_size())
        table_id, body = ZSTD_TABLE, b""
        if top.size <= TABLE_MAX_PLANE:
            table_id, body = _range_code(top, layout)
        if len(body) <= CRC_SIZE:  # large, a constant plane (no words at all), or no table fits it
            table_id, body = ZSTD_TABLE, _contexts.compressor.compress(top)
        if len(body) >= top.size:  # the exponents did not shrink: send the tensor as it is
            return bytes([RAW_TABLE]) + data.tobytes()
        return b"".join([bytes([table_id]), body, *rest])  # join reads the planes' buffers: one copy

    def decode(self, payload: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        nbytes = expected_nbytes(dtype, shape)
        what = f"a {dtype} tensor of shape {tuple(shape)}"
        if not payload:
            raise ValueError(f"zstd-exponent payload for {what} is empty")
        table_id = payload[0]
        if table_id == RAW_TABLE:
            return tensor_from_bytes(memoryview(payload)[1:], dtype, shape)
        model = table_model(table_id) if table_id != ZSTD_TABLE else None  # unknown ids: refused here
        layout = _layout(dtype)
        if layout is None or (model is not None and model.table.layout != layout):
            raise ValueError(
                f"zstd-exponent payload for {what} uses code table {table_id}, not one for {dtype}"
            )
        itemsize = dtype.itemsize
        numel = nbytes // itemsize
        rest_size = numel * (itemsize - 1)
        body_size = len(payload) - 1 - rest_size
        ranged_ok = body_size > CRC_SIZE and body_size % 4 == 0 and numel <= TABLE_MAX_PLANE
        if numel == 0 or body_size <= 0 or (model is not None and not ranged_ok):
            raise ValueError(
                f"zstd-exponent payload for {what} is {len(payload)} bytes: it does not hold {rest_size} "
                f"bytes of raw planes after a valid exponent plane for code table {table_id}"
            )
        view = memoryview(payload)
        body = view[1 : 1 + body_size]
        if model is None:
            top = np.empty(numel, dtype=np.uint8)
            zstd_decompress_into(
                body, memoryview(top), f"the exponent plane of {what}", decompressor=_contexts.decompressor
            )
        else:
            top = _range_decode(body, numel, model, what)
        words = np.empty(numel, dtype=np.uint16 if itemsize == 2 else np.uint32)
        merge_planes(top, view[1 + body_size :], itemsize, words)
        return torch.from_numpy(words.view(np.uint8)).view(dtype).reshape(shape)


def _range_code(top: np.ndarray, layout: str) -> tuple[int, bytes]:
    """(table id, CRC + rANS words) with the packaged table of ``layout`` that codes ``top`` shortest,
    or ``(ZSTD_TABLE, b"")`` when zstd, with a table of the message's own, is predicted shorter (a
    message unlike the data the tables were built from, e.g. another model's)."""
    import constriction

    layout_models = _layout_models(layout)
    histogram = np.bincount(top, minlength=256).astype(np.float64)
    table_bits = layout_models.code_lengths @ histogram
    row = int(np.argmin(table_bits))
    seen = histogram[histogram > 0]
    own_bits = float(-(seen * np.log2(seen / top.size)).sum())  # order-0 entropy: a Huffman coder's floor
    if table_bits[row] / 8 + CRC_SIZE > own_bits / 8 + ZSTD_TABLE_COST:
        return ZSTD_TABLE, b""
    best = layout_models.models[row]
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(top.astype(np.int32), best.categorical)
    crc = zlib.crc32(top).to_bytes(CRC_SIZE, "little")
    return best.table.id, crc + coder.get_compressed().astype("<u4").tobytes()


def _range_decode(body: memoryview, numel: int, model: _Model, what: str) -> np.ndarray:
    import constriction

    crc = int.from_bytes(body[:CRC_SIZE], "little")
    words = np.frombuffer(body[CRC_SIZE:], dtype="<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        symbols = coder.decode(model.categorical, numel)
        # A valid payload is used up exactly: anything left over, or missing, means it was not ours.
        intact = coder.is_empty()
    except Exception as error:  # constriction raises its own error types on exhausted or invalid data
        raise ValueError(f"range-coded exponent plane of {what} is corrupt ({error})") from None
    top = np.asarray(symbols, dtype=np.uint8)
    if not intact or len(symbols) != numel or zlib.crc32(top) != crc:
        raise ValueError(
            f"range-coded exponent plane of {what} does not decode to the {numel} symbols it was "
            "made from (CRC mismatch or words left over): corrupt or truncated"
        )
    return top
