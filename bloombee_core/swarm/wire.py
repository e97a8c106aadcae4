"""The wire format: a msgpack header frame, then each tensor's payload in frames of at most CHUNK bytes.

A header is a msgpack map. Tensors are described in ``header["tensors"]`` as
``{"name", "dtype", "shape", "compressor", "nbytes"}``; their payloads follow in that order. The receiver
reads the header, checks every description against its own limits and expectations (callers add
their own checks between :func:`read_header` and :func:`read_tensors`), and only then reads payloads,
never more than the declared sizes. Nothing is pickled.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from bloombee_core.compression import RAW, Compressor
from bloombee_core.dtypes import WIRE_DTYPES, torch_dtype
from bloombee_core.swarm.links import LinkLike, LinkReportError
from bloombee_core.transport import FrameStream, FrameTooLarge, TransportError

PROTOCOL = "/bloombee/swarm/1.0.0"
MAX_HEADER = 64 * 1024
CHUNK = 1 << 20  # payload frame size; libp2p streams have no cap, but big frames hurt interleaving

DTYPES: dict[str, torch.dtype] = {name: torch_dtype(name, WIRE_DTYPES) for name in WIRE_DTYPES}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_NDIM = 4


class ProtocolError(ValueError):
    """A message broke the protocol; the text says what was wrong, with what value."""


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    compressor: str
    nbytes: int

    @property
    def raw_nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def compressor_table(compressors: Mapping[str, Compressor] | None = None) -> dict[str, Compressor]:
    """Compressors a peer can decode: ``none`` plus the given ones (name -> instance)."""
    table: dict[str, Compressor] = {RAW.name: RAW}
    table.update(compressors or {})
    return table


async def send(
    stream: FrameStream,
    header: dict[str, Any],
    tensors: Mapping[str, torch.Tensor] | None = None,
    compressor: Compressor = RAW,
    link: LinkLike | None = None,
) -> None:
    """Write one message: the header, then each tensor's (possibly compressed) payload in chunks.

    With ``link`` (this peer's link to the stream's other end) the compressor is adapted to the link's
    measured speed, the header carries our receive-rate report, and the bytes are counted on the link.
    """
    payloads = []
    metas = []
    if link is not None:
        compressor = link.encoder(compressor)
    raw_total = 0
    for name, tensor in (tensors or {}).items():
        if tensor.dtype not in DTYPE_NAMES:
            raise ProtocolError(f"tensor {name!r} has dtype {tensor.dtype}, not one the wire carries")
        use = compressor.for_tensor(tensor) if tensor.is_floating_point() else RAW
        payload = use.encode(tensor)
        raw_total += tensor.numel() * tensor.element_size()
        payloads.append(payload)
        metas.append(
            {
                "name": name,
                "dtype": DTYPE_NAMES[tensor.dtype],
                "shape": list(tensor.shape),
                "compressor": use.name,
                "nbytes": len(payload),
            }
        )
    body = dict(header)
    if link is not None:
        body.update(link.report())
        link.traffic.sent(raw_total, sum(len(p) for p in payloads))
    body["tensors"] = metas
    packed = msgpack.packb(body, use_bin_type=True)
    if len(packed) > MAX_HEADER:
        raise ProtocolError(f"message header of {len(packed)} bytes exceeds {MAX_HEADER}")
    await stream.write_frame(packed, drain=False)
    for payload in payloads:
        view = memoryview(payload)
        for offset in range(0, len(view), CHUNK):
            await stream.write_frame(view[offset : offset + CHUNK], drain=False)
    await stream.drain()


async def read_header(
    stream: FrameStream, link: LinkLike | None = None
) -> tuple[dict[str, Any], list[TensorMeta]] | None:
    """The next message's header and tensor descriptions (payloads not yet read); ``None`` at end of stream.
    With ``link``, the sender's receive-rate report in the header updates it.

    :raises ProtocolError: the header is not valid msgpack, not a map, or describes impossible tensors.
    """
    try:
        frame = await stream.read_frame(MAX_HEADER)
    except FrameTooLarge as exc:
        raise ProtocolError(f"message header too large: {exc}") from None
    if frame is None:
        return None
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=MAX_HEADER)
    except Exception as exc:
        raise ProtocolError(f"message header is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"message header must be a map, got {type(header).__name__}")
    metas = _tensor_metas(header.get("tensors", []))
    if link is not None:
        try:
            link.heard(header)
        except LinkReportError as exc:
            raise ProtocolError(str(exc)) from None
    return header, metas


def _tensor_metas(items: Any) -> list[TensorMeta]:
    if not isinstance(items, list) or len(items) > 8:
        raise ProtocolError("header field 'tensors' must be a list of at most 8 tensor descriptions")
    metas = []
    for item in items:
        if not isinstance(item, dict):
            raise ProtocolError(f"a tensor description must be a map, got {item!r:.80}")
        name, dtype, shape = item.get("name"), item.get("dtype"), item.get("shape")
        compressor, nbytes = item.get("compressor"), item.get("nbytes")
        if not isinstance(name, str) or not isinstance(compressor, str):
            raise ProtocolError(f"tensor description needs string 'name' and 'compressor', got {item!r:.200}")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ProtocolError(f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
        ):
            raise ProtocolError(f"tensor {name!r}: shape {shape!r:.100} is not a list of <= {MAX_NDIM} sizes")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise ProtocolError(f"tensor {name!r}: nbytes {nbytes!r} is not a non-negative integer")
        metas.append(TensorMeta(name, DTYPES[dtype], tuple(shape), compressor, nbytes))
    return metas


async def read_tensors(
    stream: FrameStream,
    metas: list[TensorMeta],
    compressors: Mapping[str, Compressor],
    max_bytes: int,
    link: LinkLike | None = None,
) -> dict[str, torch.Tensor]:
    """Read and decode the payloads described by ``metas`` (already checked by the caller).

    ``max_bytes`` bounds every tensor, raw and encoded; sizes are checked before anything is read.
    With ``link``, the bytes are counted on it and the time the payloads took measures its speed.
    """
    for meta in metas:
        if meta.compressor not in compressors:
            raise ProtocolError(
                f"tensor {meta.name!r}: unknown compressor {meta.compressor!r}; this peer has {sorted(compressors)}"
            )
        if meta.raw_nbytes > max_bytes or meta.nbytes > max_bytes:
            raise ProtocolError(
                f"tensor {meta.name!r} of shape {list(meta.shape)} ({meta.raw_nbytes} bytes, {meta.nbytes} "
                f"on the wire) exceeds the limit of {max_bytes} bytes"
            )
        if meta.compressor == RAW.name and meta.nbytes != meta.raw_nbytes:
            raise ProtocolError(
                f"tensor {meta.name!r}: {meta.nbytes} raw bytes declared, {meta.dtype} {list(meta.shape)} "
                f"needs {meta.raw_nbytes}"
            )
    begin = time.perf_counter()
    payloads = []
    for meta in metas:
        parts = []
        left = meta.nbytes
        while left > 0:
            try:
                frame = await stream.read_frame(min(CHUNK, left))
            except FrameTooLarge as exc:
                raise ProtocolError(f"tensor {meta.name!r}: payload frame too large: {exc}") from None
            if frame is None:
                raise TransportError(f"stream closed inside the payload of tensor {meta.name!r}")
            if not frame:
                raise ProtocolError(f"tensor {meta.name!r}: empty payload frame")
            parts.append(frame)
            left -= len(frame)
        payloads.append(b"".join(parts))
    if link is not None:
        wire_bytes = sum(meta.nbytes for meta in metas)
        link.measured(wire_bytes, time.perf_counter() - begin)
        link.traffic.received(sum(meta.raw_nbytes for meta in metas), wire_bytes)
    out: dict[str, torch.Tensor] = {}
    for meta, payload in zip(metas, payloads, strict=True):
        try:
            out[meta.name] = compressors[meta.compressor].decode(payload, meta.dtype, meta.shape)
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError(
                f"tensor {meta.name!r}: compressor {meta.compressor!r} cannot decode it: {exc}"
            ) from None
    return out


def error_header(message: str, **extra: Any) -> dict[str, Any]:
    return {"ok": False, "error": message, **extra}
