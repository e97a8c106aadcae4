"""A third-party plugin as one would publish it: XOR-masks every byte (lossless, and easy to check)."""

from __future__ import annotations

import torch
from pydantic import Field

from bloombee_core import PluginOptions, hookimpl
from bloombee_core.compression import Compressor


class XorCompressor(Compressor):
    name = "example-xor"
    description = "Toy example: XOR every byte with a key."

    class Options(PluginOptions):
        key: int = Field(0x5A, ge=0, le=255, description="The byte every byte is XOR-ed with.")

    def encode(self, tensor: torch.Tensor) -> bytes:
        raw = tensor.detach().contiguous().view(torch.uint8).flatten()
        return (raw ^ self.options.key).numpy().tobytes()

    def decode(self, payload: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if len(payload) != expected:
            raise ValueError(f"payload has {len(payload)} bytes, shape {shape} of {dtype} needs {expected}")
        raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8) ^ self.options.key
        return raw.view(dtype).reshape(shape)


@hookimpl
def bloombee_register_compressors() -> list[type[Compressor]]:
    return [XorCompressor]
