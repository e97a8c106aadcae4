"""The client's view of the swarm for one model: which servers host which blocks (from the DHT), how
far away each one is (measured round trips), which ones failed recently (the ban list), the cheapest
chain for a span of blocks, and the one failure policy every call follows (:meth:`SwarmClient.fail`,
:meth:`SwarmClient.retries`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bloombee_core.client.retry import BUSY_PAUSE, Retries, is_busy
from bloombee_core.client.rpc import Tensors, call
from bloombee_core.compression import RAW, Compressor
from bloombee_core.swarm import wire
from bloombee_core.swarm.links import Links
from bloombee_core.swarm.records import ServerRecord, fetch_servers
from bloombee_core.swarm.routing import BanList, Hop, NoRouteError, plan_route
from bloombee_core.transport import Transport

if TYPE_CHECKING:
    from pathlib import Path

    from transformers import PretrainedConfig

    from bloombee_core.family import ModelFamily
    from bloombee_core.registry import PluginSet

logger = logging.getLogger(__name__)


class SwarmClient:
    """Servers of model ``model`` (``num_blocks`` blocks, cut only at ``cuts``) and how to call them."""

    def __init__(
        self,
        transport: Transport,
        model: str,
        num_blocks: int,
        cuts: list[int],
        *,
        compressor: Compressor = RAW,
        compressors: Mapping[str, Compressor] | None = None,
        timeout: float = 60.0,
        max_retries: int = 6,
        refresh_every: float = 5.0,
        push_grace: float = 1.0,
    ) -> None:
        self.transport = transport
        self.model, self.num_blocks, self.cuts = model, num_blocks, cuts
        self.compressor, self.decoders = compressor, wire.compressor_table(compressors)
        self.timeout, self.max_retries, self.refresh_every = timeout, max_retries, refresh_every
        self.push_grace = push_grace  # seconds to wait for a pushed step before sending it ourselves
        self.links = Links()  # bytes and measured speed per server (auto compression decides with it)
        self.bans = BanList()
        self.rtt: dict[str, float] = {}
        self.servers: dict[str, ServerRecord] = {}
        self._fetched_at = 0.0
        self.stale_after = 60.0  # seconds: older records are fetched before they are used
        self._fetching: asyncio.Future | None = None

    async def refresh(self, force: bool = False) -> dict[str, ServerRecord]:
        """The servers from the DHT. Records older than ``refresh_every`` are fetched again; while they
        are younger than ``stale_after``, the fetch runs in the background and this returns them at
        once (a new session need not wait a DHT lookup for them; one a server has left since fails
        over like any other failure, with a forced fetch)."""
        age = time.monotonic() - self._fetched_at
        if force or not self.servers or age > self.stale_after:
            await self._fetch()
        elif age > self.refresh_every and (self._fetching is None or self._fetching.done()):
            self._fetching = asyncio.ensure_future(self._fetch())
            self._fetching.add_done_callback(_log_failure)
        return self.servers

    async def _fetch(self) -> None:
        self.servers = await fetch_servers(self.transport, self.model, self.num_blocks)
        self._fetched_at = time.monotonic()

    async def info(self, peer: str) -> dict[str, Any]:
        """A server's own report (span, cache left, throughput, sessions, resident weight fraction)."""
        link = self.links.get(peer)
        head, _ = await call(self.transport, peer, {"type": "info"}, None, RAW, self.decoders, 5.0, link)
        return head

    async def ping(self, peer: str) -> float:
        begin = time.perf_counter()
        await self.info(peer)
        self.rtt[peer] = time.perf_counter() - begin
        return self.rtt[peer]

    async def route(self, start: int, end: int) -> list[Hop]:
        """The cheapest chain for blocks ``start:end``, measuring servers' latency the first time."""
        for attempt in range(3):
            servers = await self.refresh(force=attempt > 0)
            fresh = [p for p in servers if p not in self.rtt and p not in self.bans.banned()]
            results = await asyncio.gather(*(self.ping(p) for p in fresh), return_exceptions=True)
            for peer, result in zip(fresh, results, strict=True):
                if isinstance(result, BaseException):
                    logger.info("server %s does not answer (%s); banning it for a while", peer, result)
                    self.bans.ban(peer)
            try:
                return plan_route(servers, start, end, self.cuts, self.rtt, self.bans.banned())
            except NoRouteError:
                if attempt == 2:
                    raise
                await asyncio.sleep(1.0 + attempt)
        raise AssertionError("unreachable")

    def fail(self, peer: str, exc: BaseException) -> None:
        """``peer`` failed a call: ban it (longer each time) and measure it afresh once the ban ends. A
        busy server did nothing wrong: it is only left out of routing for a moment."""
        if is_busy(exc):
            self.bans.ban(peer, BUSY_PAUSE)
            logger.warning("server %s is busy (%s); trying another or waiting", peer, exc)
            return
        seconds = self.bans.ban(peer)
        self.rtt.pop(peer, None)
        logger.warning("server %s failed (%s); banned for %.0fs, re-routing", peer, exc, seconds)

    def retries(self) -> Retries:
        """A fresh count of attempts for one call, banning failing servers with :meth:`fail`."""
        return Retries(self.max_retries, self.fail)

    async def call(
        self, hop: Hop, kind: str, tensors: Tensors, extra: dict[str, Any] | None = None
    ) -> Tensors:
        """One stateless request (``forward`` or ``backward``) for blocks ``hop.start:hop.end``; ``extra``:
        more header fields (a tuning method's adapter reference)."""
        header = {"type": kind, "start": hop.start, "end": hop.end, **(extra or {})}
        link = self.links.get(hop.peer)
        _, out = await call(
            self.transport, hop.peer, header, tensors, self.compressor, self.decoders, self.timeout, link
        )
        return out


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.info("refreshing the servers from the DHT failed: %s", task.exception())


def swarm_client_for(
    config: PretrainedConfig,
    folder: Path,
    family: ModelFamily,
    transport: Transport,
    plugins: PluginSet,
    compressor: Compressor | None,
    timeout: float,
    max_retries: int,
) -> SwarmClient:
    """The swarm client of one model, as ``from_pretrained`` makes it."""
    from bloombee_core.swarm.records import model_key

    return SwarmClient(
        transport,
        model_key(config, folder),
        family.num_blocks(config),
        family.allowed_cuts(config),
        compressor=compressor if compressor is not None else plugins.create("compressors", "auto"),
        compressors=plugins.instances_without_options("compressors"),
        timeout=timeout,
        max_retries=max_retries,
    )
