"""Built-in lossless activation compressors: ``none``, ``lz4``, ``zstd``, ``zstd-bytesplit``."""

from __future__ import annotations

from bloombee_compress.compressors import (
    BUILTIN_COMPRESSORS,
    Lz4Compressor,
    ZstdByteSplitCompressor,
    ZstdCompressor,
)
from bloombee_core.compression import Compressor, RawCompressor
from bloombee_core.hookspecs import hookimpl

__all__ = ["Lz4Compressor", "RawCompressor", "ZstdByteSplitCompressor", "ZstdCompressor"]


@hookimpl
def bloombee_register_compressors() -> list[type[Compressor]]:
    return list(BUILTIN_COMPRESSORS)
