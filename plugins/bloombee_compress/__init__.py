"""Built-in lossless activation compressors: ``none``, ``lz4``, ``zstd``, ``zstd-bytesplit``,
``zstd-exponent`` and ``auto``."""

from __future__ import annotations

from bloombee_compress.auto import AutoCompressor, choose_codec
from bloombee_compress.compressors import (
    BUILTIN_COMPRESSORS as _BYTE_COMPRESSORS,
)
from bloombee_compress.compressors import (
    Lz4Compressor,
    ZstdByteSplitCompressor,
    ZstdCompressor,
)
from bloombee_compress.exponent import ZstdExponentCompressor
from bloombee_core.compression import Compressor, RawCompressor
from bloombee_core.hookspecs import hookimpl

BUILTIN_COMPRESSORS: list[type[Compressor]] = [*_BYTE_COMPRESSORS, ZstdExponentCompressor, AutoCompressor]

__all__ = [
    "BUILTIN_COMPRESSORS",
    "AutoCompressor",
    "Lz4Compressor",
    "RawCompressor",
    "ZstdByteSplitCompressor",
    "ZstdCompressor",
    "ZstdExponentCompressor",
    "choose_codec",
]


@hookimpl
def bloombee_register_compressors() -> list[type[Compressor]]:
    return list(BUILTIN_COMPRESSORS)
