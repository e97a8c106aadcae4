"""``auto``: per message, send raw bytes or ``zstd-exponent``, whichever gets the tensor across sooner.

Compressing pays when the link time it saves, ``(raw - compressed) / bandwidth``, exceeds what
compressing costs, ``encode + decode``. Both sides are predicted from measured constants (below; from
``python -m bench.compression --model smollm2``, docs/compression.md), so the choice is a pure function
of the tensor's size and dtype and the link estimate: :func:`choose_codec`.

The link estimate lives on the instance (``bandwidth_bytes_per_s``, ``rtt_s``), initialised from the
options; :meth:`AutoCompressor.for_link` gives a copy for one link whose receive rate was measured
(:mod:`bloombee_core.swarm.links`: every peer reports how fast it receives what the other sends). The round-trip time
is paid once per message whatever the codec, so it does not enter the choice; it is kept so a caller
can store its whole estimate in one place.

On the wire ``auto`` never appears: :meth:`AutoCompressor.for_tensor` hands the message the chosen
codec, whose name goes in the header, so a raw message costs nothing extra and a peer decodes it even
without this plugin. Used directly, :meth:`AutoCompressor.encode` writes one tag byte (0: raw bytes
follow; 1: a ``zstd-exponent`` payload follows), so decoding needs no state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from bloombee_compress.exponent import ZstdExponentCompressor
from bloombee_core.compression import RAW, Compressor, expected_nbytes, tensor_bytes_view, tensor_from_bytes
from bloombee_core.plugin import PluginOptions

if TYPE_CHECKING:
    import torch

DEFAULT_BANDWIDTH = 100e6 / 8  # 100 Mbit/s when the caller knows nothing better

TAG_NONE = 0
TAG_EXPONENT = 1
CODEC_TAGS = {"none": TAG_NONE, "zstd-exponent": TAG_EXPONENT}


@dataclass(frozen=True)
class CodecProfile:
    """Predicted cost and gain of one codec on one dtype (measured on one core; see docs/compression.md)."""

    ratio: float  # compressed / raw size on hidden states
    encode_bytes_per_s: float  # of raw data, single thread
    decode_bytes_per_s: float
    fixed_s: float  # per message, encode + decode together (Python calls, table pick, allocation)

    def seconds(self, nbytes: int) -> float:
        return self.fixed_s + nbytes / self.encode_bytes_per_s + nbytes / self.decode_bytes_per_s


# Measured with ``python -m bench.compression --model smollm2 --prompt both --tokens 128 512 2048`` on
# a 2-core host shared with other benchmarks (docs/compression.md, 2026-12-03): the medians ranged
# bf16 enc 190-570 / dec 490-1280 MB/s, fp16 300-590 / 650-1190, fp32 490-1180 / 620-1340 on prefill
# messages; a 1-token message costs ~160-180 us to encode and decode (Python and table overhead).
# Speeds are rounded down and ratios up, so that ``auto`` errs towards sending raw bytes.
PROFILES: dict[str, CodecProfile] = {
    "bfloat16": CodecProfile(ratio=0.69, encode_bytes_per_s=300e6, decode_bytes_per_s=550e6, fixed_s=170e-6),
    "float16": CodecProfile(ratio=0.87, encode_bytes_per_s=300e6, decode_bytes_per_s=650e6, fixed_s=170e-6),
    "float32": CodecProfile(ratio=0.845, encode_bytes_per_s=450e6, decode_bytes_per_s=500e6, fixed_s=170e-6),
}


def choose_codec(nbytes: int, dtype_name: str, bandwidth_bytes_per_s: float) -> str:
    """``"zstd-exponent"`` if it is predicted to deliver ``nbytes`` of ``dtype_name`` sooner, else ``"none"``.

    ``dtype_name`` is the torch dtype without ``torch.`` (``"bfloat16"``). Unknown dtypes (integers,
    float64, ...) are never compressed.
    """
    if not bandwidth_bytes_per_s > 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth_bytes_per_s!r} bytes/s")
    profile = PROFILES.get(dtype_name)
    if profile is None or nbytes <= 0:
        return "none"
    saved_s = nbytes * (1 - profile.ratio) / bandwidth_bytes_per_s
    return "zstd-exponent" if saved_s > profile.seconds(nbytes) else "none"


class AutoOptions(PluginOptions):
    bandwidth_bytes_per_s: float = Field(
        default=DEFAULT_BANDWIDTH, gt=0, description="link estimate used until the caller updates it"
    )
    rtt_s: float = Field(default=0.0, ge=0, description="round-trip time estimate (not used in the choice)")


class AutoCompressor(Compressor):
    """Raw bytes or ``zstd-exponent`` per message, whichever the link estimate says is faster."""

    name: ClassVar[str] = "auto"
    description: ClassVar[str] = "per message: none or zstd-exponent, from tensor size, dtype and link speed"
    Options: ClassVar[type[PluginOptions]] = AutoOptions

    def __init__(self, options: PluginOptions | None = None) -> None:
        super().__init__(options)
        self.bandwidth_bytes_per_s: float = self.options.bandwidth_bytes_per_s
        self.rtt_s: float = self.options.rtt_s
        self._exponent = ZstdExponentCompressor()

    def for_link(self, bandwidth_bytes_per_s: float | None) -> AutoCompressor:
        if bandwidth_bytes_per_s is None or bandwidth_bytes_per_s == self.bandwidth_bytes_per_s:
            return self
        adapted = copy.copy(self)  # shares the (stateless) codec
        adapted.bandwidth_bytes_per_s = bandwidth_bytes_per_s
        return adapted

    def choose(self, tensor: torch.Tensor) -> str:
        nbytes = tensor.numel() * tensor.element_size()
        return choose_codec(nbytes, str(tensor.dtype).removeprefix("torch."), self.bandwidth_bytes_per_s)

    def for_tensor(self, tensor: torch.Tensor) -> Compressor:
        return self._exponent if self.choose(tensor) == "zstd-exponent" else RAW

    def encode(self, tensor: torch.Tensor) -> bytes:
        if self.choose(tensor) == "zstd-exponent":
            return bytes([TAG_EXPONENT]) + self._exponent.encode(tensor)
        return bytes([TAG_NONE]) + tensor_bytes_view(tensor).numpy().tobytes()

    def decode(self, payload: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        expected_nbytes(dtype, shape)  # bad shapes are refused before the payload is looked at
        if not payload:
            raise ValueError(f"auto payload for a {dtype} tensor of shape {tuple(shape)} is empty")
        tag, body = payload[0], memoryview(payload)[1:]
        if tag == TAG_NONE:
            return tensor_from_bytes(body, dtype, shape)
        if tag == TAG_EXPONENT:
            return self._exponent.decode(body, dtype, shape)
        raise ValueError(
            f"auto payload for a {dtype} tensor of shape {tuple(shape)} names codec tag {tag}; "
            f"this peer knows {sorted(CODEC_TAGS.values())} ({', '.join(CODEC_TAGS)})"
        )
