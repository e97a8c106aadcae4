"""Rebalancing: a server that chose its blocks itself re-checks now and then whether it would serve the
swarm better elsewhere (a server left, a slow one joined) and, if so, moves there without interrupting
anyone (:meth:`bloombee_core.server.lifecycle.Server.move_to`). The choice is
:func:`bloombee_core.swarm.placement.next_move`: the same for every server reading the same records,
so only one server moves at a time, and only for a clear gain."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from bloombee_core.swarm.placement import Move, next_move
from bloombee_core.swarm.records import fetch_servers

if TYPE_CHECKING:
    from bloombee_core.model import BlockSpan
    from bloombee_core.server.lifecycle import Server

logger = logging.getLogger(__name__)

SpanLoader = Callable[[int, int], Awaitable["BlockSpan"]]


class Rebalancer:
    """Every ``every`` seconds (±25% jitter, so servers do not check in lockstep), move ``server`` if
    :func:`next_move` names it. ``load(start, end)`` loads a span the way the server loaded its own."""

    def __init__(
        self,
        server: Server,
        load: SpanLoader,
        every: float,
        num_blocks: int,
        cuts: Sequence[int],
        rng: random.Random | None = None,
    ) -> None:
        self.server, self.load, self.every = server, load, every
        self.num_blocks, self.cuts = num_blocks, list(cuts)
        self.rng = rng or random.Random()
        self.moves: list[Move] = []

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every * (0.75 + 0.5 * self.rng.random()))
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep serving where we are; try again next time
                logger.exception("re-checking this server's blocks failed")

    async def check(self) -> Move | None:
        """Move if this server is the one that should; the move made, or None."""
        server = self.server
        if server.draining:  # at most two spans in memory: finish the last move first
            return None
        servers = await fetch_servers(server.transport, server.model, self.num_blocks)
        servers[server.transport.peer_id] = server.record()  # our own view of ourselves is the latest
        move = next_move(servers, self.num_blocks, self.cuts)
        if move is None or move.peer != server.transport.peer_id:
            return None
        logger.info(
            "moving from blocks %d:%d to %d:%d: the swarm's bottleneck would go from %.1f to %.1f tok/s",
            server.span.start,
            server.span.end,
            move.start,
            move.end,
            move.before,
            move.after,
        )
        span = await self.load(move.start, move.end)
        await server.move_to(span, await server.measure(span))
        self.moves.append(move)
        return move
