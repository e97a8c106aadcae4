"""A third-party plugin as one would publish it: a compressor that XOR-masks every byte (lossless, and
easy to check), and a transport and a model family chosen only by name (see :mod:`.chosen`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from bloombee_core import PluginOptions, hookimpl
from bloombee_core.compression import Compressor, tensor_bytes_view, tensor_from_bytes

if TYPE_CHECKING:  # torch is imported where it is used: listing plugins stays fast (no torch import)
    import torch


class XorCompressor(Compressor):
    name = "example-xor"
    description = "Toy example: XOR every byte with a key."

    class Options(PluginOptions):
        key: int = Field(0x5A, ge=0, le=255, description="The byte every byte is XOR-ed with.")

    def encode(self, tensor: torch.Tensor) -> bytes:
        return (tensor_bytes_view(tensor) ^ self.options.key).numpy().tobytes()

    def decode(self, payload: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        masked = tensor_from_bytes(payload, torch.uint8, (len(payload),))
        return tensor_from_bytes((masked ^ self.options.key).numpy().tobytes(), dtype, shape)


@hookimpl
def bloombee_register_compressors() -> list[type[Compressor]]:
    return [XorCompressor]


@hookimpl
def bloombee_register_transports() -> list[type]:
    from bloombee_plugin_example.chosen import RecordingTransport

    return [RecordingTransport]


@hookimpl
def bloombee_register_model_families() -> list[type]:
    from bloombee_plugin_example.chosen import RecordingLlama

    return [RecordingLlama]
