"""The hivemind transport: a hivemind DHT (Kademlia over libp2p) for records, libp2p streams for traffic.

hivemind runs its DHT node in a forked process that drives a ``p2pd`` daemon; this peer talks to the
same daemon through a replica of the DHT's P2P handle. Records are serialized by hivemind with
msgpack; streams carry raw frames (see :class:`bloombee_core.transport.FrameStream`) — nothing is
pickled on the wire.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bloombee_core.plugin import PluginOptions
from bloombee_core.swarm.aio import in_thread
from bloombee_core.transport import FrameStream, Record, StreamHandler, Transport, TransportError

if TYPE_CHECKING:
    from hivemind import DHT
    from hivemind.p2p import P2P

logger = logging.getLogger(__name__)


class HivemindOptions(PluginOptions):
    dht_timeout: float = 10.0  # seconds for one DHT store/get
    connect_timeout: float = 10.0  # seconds to open a stream to a peer


class HivemindTransport(Transport):
    name = "hivemind"
    description = "hivemind DHT + libp2p streams (p2pd ships in the hivemind wheel)"
    Options = HivemindOptions

    def __init__(self, options: HivemindOptions | None = None) -> None:
        super().__init__(options)
        self.dht: DHT | None = None
        self.p2p: P2P | None = None
        self._peer_id: str | None = None

    async def start(
        self,
        *,
        initial_peers: Sequence[str] = (),
        listen: Sequence[str] = (),
        announce: Sequence[str] = (),
        identity: str | None = None,
        client_mode: bool = False,
    ) -> None:
        from hivemind import DHT

        kwargs: dict[str, Any] = {
            "host_maddrs": list(listen) or ["/ip4/127.0.0.1/tcp/0"],
            "client_mode": client_mode,
        }
        if announce:
            kwargs["announce_maddrs"] = list(announce)
        if identity:
            kwargs["identity_path"] = str(identity)
        # The DHT constructor forks and blocks until its node is up: keep it off the event loop.
        try:
            self.dht = await in_thread(
                lambda: DHT(initial_peers=list(initial_peers) or None, start=True, **kwargs)
            )
        except Exception as exc:
            raise TransportError(
                f"could not start a hivemind DHT node (initial_peers={list(initial_peers)}): {exc}"
            ) from exc
        self.p2p = await self.dht.replicate_p2p()
        self._peer_id = self.dht.peer_id.to_base58()

    @property
    def peer_id(self) -> str:
        if self._peer_id is None:
            raise RuntimeError("the transport is not started")
        return self._peer_id

    async def addresses(self) -> list[str]:
        return [str(addr) for addr in self.dht.get_visible_maddrs()]

    def now(self) -> float:
        from hivemind.utils import get_dht_time

        return get_dht_time()

    async def store(self, key: str, subkey: str, value: Any, expiration: float) -> bool:
        future = self.dht.store(key, value, expiration_time=expiration, subkey=subkey, return_future=True)
        try:
            return bool(await asyncio.wait_for(future, self.options.dht_timeout))
        except TimeoutError:
            logger.warning("DHT store of %s timed out", key)
            return False

    async def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Record]]:
        async def one(key: str) -> dict[str, Record]:
            future = self.dht.get(key, latest=True, return_future=True)
            try:
                found = await asyncio.wait_for(future, self.options.dht_timeout)
            except TimeoutError:
                logger.warning("DHT get of %s timed out", key)
                return {}
            if found is None or not isinstance(found.value, dict):
                return {}
            out = {}
            for subkey, item in found.value.items():
                value = getattr(item, "value", None)
                expiration = getattr(item, "expiration_time", None)
                if expiration is not None:
                    out[str(subkey)] = Record(value, float(expiration))
            return out

        results = await asyncio.gather(*(one(key) for key in keys))
        return dict(zip(keys, results, strict=True))

    async def serve(self, protocol: str, handler: StreamHandler) -> None:
        async def on_stream(info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            stream = FrameStream(reader, writer, info.peer_id.to_base58())
            try:
                await handler(stream)
            finally:
                stream.close()

        await self.p2p.add_binary_stream_handler(protocol, on_stream)

    async def connect(self, peer: str, protocol: str) -> FrameStream:
        from hivemind.p2p import PeerID

        try:
            peer_id = PeerID.from_base58(peer)
        except Exception:
            raise TransportError(f"{peer!r} is not a valid libp2p peer id") from None
        try:
            _, reader, writer = await asyncio.wait_for(
                self.p2p.call_binary_stream_handler(peer_id, protocol), self.options.connect_timeout
            )
        except TimeoutError:
            wait = self.options.connect_timeout
            raise TransportError(f"peer {peer} did not answer within {wait}s") from None
        except Exception as exc:
            raise TransportError(f"cannot open a stream to peer {peer}: {exc}") from None
        return FrameStream(reader, writer, peer)

    async def shutdown(self) -> None:
        if self.p2p is not None:
            try:
                await self.p2p.shutdown()
            except Exception:  # noqa: BLE001 - the replica has no daemon of its own
                pass
            self.p2p = None
        if self.dht is not None and self.dht.is_alive() and self.dht._parent_pid == os.getpid():
            dht, self.dht = self.dht, None
            await in_thread(dht.shutdown)  # blocks until the DHT process (and its p2pd) are gone
