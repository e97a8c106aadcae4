"""The transport base class: how peers find each other (a DHT) and exchange messages (streams of frames).

A transport owns one peer: its identity, its addresses, its share of the DHT and its streams. Every
method is a coroutine run on the caller's asyncio event loop. Messages are *frames*: a 4-byte
big-endian length followed by that many bytes. The receiver names the largest frame it accepts before
any byte of the frame is read, so a peer can never make another one allocate more than it agreed to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bloombee_core.plugin import Plugin

FRAME_HEADER = 4


class TransportError(ConnectionError):
    """A peer could not be reached, or a stream broke."""


class FrameTooLarge(ValueError):
    """A peer announced a frame above the receiver's limit."""


class FrameStream:
    """A bidirectional stream of length-prefixed frames over asyncio reader/writer pairs."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = peer

    async def read_frame(self, max_bytes: int) -> bytes | None:
        """The next frame, or ``None`` when the other side closed the stream cleanly between frames."""
        try:
            header = await self.reader.readexactly(FRAME_HEADER)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            raise TransportError(f"stream from {self.peer} closed inside a frame header") from None
        except (ConnectionError, OSError) as exc:
            raise TransportError(f"stream from {self.peer} broke: {exc}") from None
        size = int.from_bytes(header, "big")
        if size > max_bytes:
            raise FrameTooLarge(
                f"peer {self.peer} sent a frame of {size} bytes; the limit here is {max_bytes}"
            )
        try:
            return await self.reader.readexactly(size)
        except asyncio.IncompleteReadError:
            raise TransportError(f"stream from {self.peer} closed inside a {size}-byte frame") from None
        except (ConnectionError, OSError) as exc:
            raise TransportError(f"stream from {self.peer} broke: {exc}") from None

    async def write_frame(self, data: bytes | memoryview, *, drain: bool = True) -> None:
        try:
            self.writer.write(len(data).to_bytes(FRAME_HEADER, "big"))
            self.writer.write(data)
            if drain:
                await self.writer.drain()
        except (ConnectionError, OSError, RuntimeError) as exc:
            raise TransportError(f"cannot write to {self.peer}: {exc}") from None

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError, RuntimeError) as exc:
            raise TransportError(f"cannot write to {self.peer}: {exc}") from None

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - closing a broken stream must never raise
            pass


StreamHandler = Callable[[FrameStream], Awaitable[None]]


@dataclass
class Record:
    """One DHT value under a (key, subkey), with its expiration time (transport clock)."""

    value: Any
    expiration: float


class Transport(Plugin):
    """Base of every transport (kind ``"transports"``).

    A subclass runs one peer. Records are small msgpack-able values (dicts of str/int/float/bool/list)
    stored under a key and a subkey (usually the storing peer's id) until they expire.
    """

    async def start(
        self,
        *,
        initial_peers: Sequence[str] = (),
        listen: Sequence[str] = (),
        announce: Sequence[str] = (),
        identity: str | None = None,
        client_mode: bool = False,
    ) -> None:
        """Join the swarm through ``initial_peers`` (none: start a new one, i.e. be a bootstrap node)."""
        raise NotImplementedError

    @property
    def peer_id(self) -> str:
        raise NotImplementedError

    async def addresses(self) -> list[str]:
        """Full multiaddrs (including the peer id) that other peers can use as ``initial_peers``."""
        raise NotImplementedError

    def now(self) -> float:
        """The swarm's clock for record expirations."""
        raise NotImplementedError

    async def store(self, key: str, subkey: str, value: Any, expiration: float) -> bool:
        raise NotImplementedError

    async def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Record]]:
        """For each key, its live subkey records (an absent key maps to an empty dict)."""
        raise NotImplementedError

    async def serve(self, protocol: str, handler: StreamHandler) -> None:
        """Call ``handler`` with every stream another peer opens for ``protocol``."""
        raise NotImplementedError

    async def connect(self, peer: str, protocol: str) -> FrameStream:
        """Open a stream to ``peer`` for ``protocol``; raises :class:`TransportError` if unreachable."""
        raise NotImplementedError

    async def shutdown(self) -> None:
        raise NotImplementedError
