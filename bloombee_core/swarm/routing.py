"""Routing: the cheapest chain of servers covering blocks ``start:end``, and the ban list.

A chain is a shortest path over block boundaries. Using server S (hosting ``a:b``) from boundary
``s`` to ``e`` (``a <= s < e <= b``, both allowed cuts) costs one round trip to S (measured), a fixed
per-hop overhead (so fewer hops win ties) and S's compute time for ``e - s`` blocks (announced
throughput). A little random jitter spreads clients over equally good replicas.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bloombee_core.swarm.records import ServerRecord

HOP_COST = 0.005  # seconds; also the default latency of a server not measured yet
DEFAULT_RTT = 0.010


class NoRouteError(RuntimeError):
    """No chain of (non-banned) servers covers the blocks."""


@dataclass(frozen=True)
class Hop:
    peer: str
    start: int
    end: int


def plan_route(
    servers: Mapping[str, ServerRecord],
    start: int,
    end: int,
    cuts: Iterable[int],
    rtt: Mapping[str, float] | None = None,
    banned: Iterable[str] = (),
    rng: random.Random | None = None,
) -> list[Hop]:
    rtt = rtt or {}
    banned = set(banned)
    rng = rng or random.Random()
    points = sorted({c for c in cuts if start <= c <= end} | {start, end})
    usable = [r for r in servers.values() if r.peer not in banned and r.state == "online"]
    best: dict[int, float] = {start: 0.0}
    back: dict[int, tuple[int, Hop]] = {}
    queue: list[tuple[float, int]] = [(0.0, start)]
    while queue:
        cost, here = heapq.heappop(queue)
        if here == end:
            break
        if cost > best.get(here, float("inf")):
            continue
        for record in usable:
            if not record.start <= here < record.end:
                continue
            per_block = 1.0 / max(record.throughput, 1e-6) / max(record.end - record.start, 1)
            for there in points:
                if there <= here or there > min(record.end, end):
                    continue
                step = rtt.get(record.peer, DEFAULT_RTT) + HOP_COST + per_block * (there - here)
                step *= 1.0 + 0.01 * rng.random()
                if cost + step < best.get(there, float("inf")):
                    best[there] = cost + step
                    back[there] = (here, Hop(record.peer, here, there))
                    heapq.heappush(queue, (cost + step, there))
    if end not in back and start != end:
        reached = max(best)
        raise NoRouteError(
            f"no chain of servers covers blocks {start}:{end}: nothing serves block {reached} "
            f"(known servers: {len(servers)}, banned: {len(banned)}); start a server for it or wait"
        )
    hops: list[Hop] = []
    here = end
    while here != start:
        here, hop = back[here]
        hops.append(hop)
    return hops[::-1]


class BanList:
    """Peers that failed recently; each ban doubles in length on repeated failures (capped)."""

    def __init__(self, base: float = 15.0, cap: float = 300.0) -> None:
        self.base, self.cap = base, cap
        self._until: dict[str, float] = {}
        self._strikes: dict[str, int] = {}

    def ban(self, peer: str, seconds: float | None = None) -> float:
        """Ban ``peer``; ``seconds``: for that long, not counted as a strike (a busy server)."""
        if seconds is None:
            strikes = self._strikes.get(peer, 0) + 1
            self._strikes[peer] = strikes
            seconds = min(self.base * 2 ** (strikes - 1), self.cap)
        self._until[peer] = max(self._until.get(peer, 0.0), time.monotonic() + seconds)
        return seconds

    def banned(self) -> set[str]:
        now = time.monotonic()
        return {peer for peer, until in self._until.items() if until > now}

    def forgive(self, peer: str) -> None:
        self._strikes.pop(peer, None)

    def lift(self, peer: str) -> None:
        """End a ban now (and forget its strikes)."""
        self._until.pop(peer, None)
        self._strikes.pop(peer, None)
