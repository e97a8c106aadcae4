"""Lossless activation compressors: the base class and the helpers every compressor shares.

A compressor turns a tensor's raw bytes into a wire payload and back. The receiver always knows
the dtype and shape from the (validated) message header, so a payload carries no metadata of its
own beyond what the compressor needs. Decoding is the dangerous direction — the payload comes from the
network — so :meth:`Compressor.decode` implementations must never produce (or allocate) more than
``prod(shape) * itemsize`` bytes, whatever the payload claims.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

from bloombee_core.plugin import Plugin

if TYPE_CHECKING:
    import torch

__all__ = ["RAW", "Compressor", "RawCompressor", "expected_nbytes", "tensor_bytes_view", "tensor_from_bytes"]


class Compressor(Plugin):
    """Base of every compressor (kind ``"compressors"``).

    Subclasses set ``name`` and implement :meth:`encode` and :meth:`decode`. Both must be lossless:
    ``decode(encode(t), t.dtype, tuple(t.shape))`` equals ``t`` bit for bit, NaN payloads, infinities
    and ``-0.0`` included.
    """

    def encode(self, tensor: torch.Tensor) -> bytes:
        """Compress the tensor's raw (contiguous, native byte order) bytes into a payload."""
        raise NotImplementedError

    def decode(self, payload: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """Rebuild a CPU tensor of ``dtype`` and ``shape`` from ``payload``.

        :raises ValueError: the payload does not decode to exactly ``prod(shape) * itemsize`` bytes.
        """
        raise NotImplementedError

    def for_link(self, bandwidth_bytes_per_s: float | None) -> Compressor:
        """This compressor for one link whose receiver reports ``bandwidth_bytes_per_s`` (None: not yet
        measured). Compressors that choose per message from the link speed (``auto``) return a copy that
        uses it; the others return themselves."""
        return self

    def for_tensor(self, tensor: torch.Tensor) -> Compressor:
        """The compressor that encodes ``tensor`` on the wire (its name goes in the message header).
        A compressor that only chooses between others (``auto``) returns the chosen one, so the
        receiver needs nothing but that codec; the others return themselves."""
        return self


class RawCompressor(Compressor):
    """No compression: the payload is the tensor's bytes. Every peer decodes it (name ``none``)."""

    name: ClassVar[str] = "none"
    description: ClassVar[str] = "raw bytes, no compression"

    def encode(self, tensor: torch.Tensor) -> bytes:
        return tensor_bytes_view(tensor).numpy().tobytes()

    def decode(self, payload: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return tensor_from_bytes(payload, dtype, shape)


RAW = RawCompressor()


def expected_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of ``dtype`` and ``shape`` occupies; rejects shapes no tensor can have."""
    import torch

    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise ValueError(f"shape must hold non-negative ints, got {shape!r}")
    return math.prod(shape) * dtype.itemsize


def tensor_bytes_view(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 CPU view of the tensor's bytes (copies only if it is not contiguous or not on CPU)."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:  # an empty tensor may carry a stride of 0, which view() refuses
        return torch.empty(0, dtype=torch.uint8)
    return flat.view(torch.uint8)


def tensor_from_bytes(
    data: bytes | bytearray | memoryview, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    """A new, writable tensor holding a copy of ``data``, which must be exactly the right size."""
    import torch

    nbytes = expected_nbytes(dtype, shape)
    if len(data) != nbytes:
        raise ValueError(
            f"payload holds {len(data)} bytes but a {dtype} tensor of shape {tuple(shape)} needs {nbytes}"
        )
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)
