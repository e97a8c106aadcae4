"""One request to a server and its reply, and the tensors a request for some blocks carries."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import torch

from bloombee_core.compression import Compressor
from bloombee_core.swarm import wire
from bloombee_core.swarm.links import LinkLike
from bloombee_core.transport import FrameStream, Transport, TransportError

Tensors = dict[str, torch.Tensor]
# tensors every hop gets whole; the others are per-layer inputs, cut to each hop's blocks
_MAIN = ("hidden", "position_ids", "attention_mask", "grad", "tree", "keep")


class RemoteError(RuntimeError):
    """A server refused a request; ``code`` says whether another server may do better."""

    def __init__(self, peer: str, message: str, code: str) -> None:
        super().__init__(f"server {peer} refused the request: {message}")
        self.peer, self.code = peer, code


async def request(
    stream: FrameStream,
    header: dict[str, Any],
    tensors: Mapping[str, torch.Tensor] | None,
    compressor: Compressor,
    decoders: Mapping[str, Compressor],
    link: LinkLike | None = None,
) -> tuple[dict[str, Any], Tensors]:
    """Send one message and read its reply (raising :class:`RemoteError` for an error reply)."""
    await wire.send(stream, header, tensors, compressor, link)
    return await read_reply(stream, decoders, link)


async def read_reply(
    stream: FrameStream, decoders: Mapping[str, Compressor], link: LinkLike | None = None
) -> tuple[dict[str, Any], Tensors]:
    reply = await wire.read_header(stream, link)
    if reply is None:
        raise TransportError(f"server {stream.peer} closed the stream without answering")
    head, metas = reply
    if not head.get("ok", False):
        raise RemoteError(
            stream.peer, str(head.get("error", "no reason given")), str(head.get("code", "internal"))
        )
    return head, await wire.read_tensors(stream, metas, decoders, 1 << 31, link)


async def call(
    transport: Transport,
    peer: str,
    header: dict[str, Any],
    tensors: Mapping[str, torch.Tensor] | None,
    compressor: Compressor,
    decoders: Mapping[str, Compressor],
    timeout: float,
    link: LinkLike | None = None,
) -> tuple[dict[str, Any], Tensors]:
    """One :func:`request` on a stream of its own, answered within ``timeout`` seconds."""
    stream = await transport.connect(peer, wire.PROTOCOL)
    try:
        return await asyncio.wait_for(request(stream, header, tensors, compressor, decoders, link), timeout)
    finally:
        stream.close()


def step_inputs(
    position_ids: torch.Tensor,
    mask: torch.Tensor | None,
    per_layer: Tensors | None,
    tree: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> Tensors:
    """What every hop of one step shares: positions, padding mask, all blocks' per-layer inputs, and in
    a session opened for trees the token tree and the rows of the previous step to keep."""
    tensors = {"position_ids": position_ids.to(torch.int64), **(per_layer or {})}
    for name, value in (("attention_mask", mask), ("tree", tree), ("keep", keep)):
        if value is not None:
            tensors[name] = value.to(torch.int64)
    return tensors


def for_blocks(base: Tensors, hidden: torch.Tensor, start: int, end: int | None = None) -> Tensors:
    """A request's tensors for blocks ``start:end``: per-layer inputs (all blocks' in ``base``) are cut to
    those blocks; with ``end=None`` to ``start:`` (a session step: a server pushes later blocks' on)."""
    return {
        name: t if name in _MAIN else t[:, :, start:end] for name, t in {**base, "hidden": hidden}.items()
    }
