"""Placement: which blocks a server hosts so that the swarm's end-to-end throughput is highest.

A server announces the tokens per second it passes through its whole span, so it adds that much
capacity to each block of its span. A block's capacity is the sum over the servers hosting it; a
token crosses every block, so the swarm's throughput is its weakest block's capacity (the chain's
bottleneck). Spans are compared *leximin*: the sorted capacities the span would leave, weakest first,
compared in order, so the higher bottleneck wins and, at an equal bottleneck, the span that leaves
fewer blocks that weak (then the lowest start).

A server without ``--blocks`` joins on :func:`choose_span`. Movable servers re-check now and then
(:func:`next_move`): all of them compute the same answer from the same records, the one move that
helps the swarm most, so at most one server moves per round; it moves only when the bottleneck rises
by :data:`MIN_GAIN` (or blocks nobody serves become fewer), so servers do not oscillate.

Pure functions, no I/O.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from bloombee_core.swarm.records import ServerRecord

MIN_GAIN = 1.25  # a move must raise the swarm's bottleneck by 25% (or serve a block nobody serves)


def block_throughput(servers: Iterable[ServerRecord], num_blocks: int) -> list[float]:
    """Tokens per second each block can pass: the sum of the throughputs of the servers hosting it."""
    capacity = [0.0] * num_blocks
    for record in servers:
        for index in range(max(record.start, 0), min(record.end, num_blocks)):
            capacity[index] += max(record.throughput, 0.0)
    return capacity


def bottleneck(capacity: Sequence[float]) -> tuple[float, list[int]]:
    """The swarm's throughput (its weakest block's) and the blocks at that throughput."""
    if not capacity:
        return 0.0, []
    weakest = min(capacity)
    return weakest, [i for i, c in enumerate(capacity) if c == weakest]


def candidate_spans(num_blocks: int, length: int, cuts: Iterable[int]) -> list[tuple[int, int]]:
    """Spans of ``length`` blocks that start and end at allowed ``cuts``; where none fits the cuts, the
    longest shorter ones (or, failing that, the shortest longer ones)."""
    length = min(length, num_blocks)
    points = sorted({c for c in cuts if 0 <= c <= num_blocks})
    spans = [(a, b) for i, a in enumerate(points) for b in points[i + 1 :]]
    if not spans:
        raise ValueError(f"no span of blocks starts and ends at allowed cuts {list(cuts)}")
    shorter = [b - a for a, b in spans if b - a <= length]
    size = max(shorter) if shorter else min(b - a for a, b in spans)
    return [(a, b) for a, b in spans if b - a == size]


def with_span(capacity: Sequence[float], start: int, end: int, throughput: float) -> list[float]:
    """``capacity`` after a server of ``throughput`` joins blocks ``start:end``."""
    return [c + throughput if start <= i < end else c for i, c in enumerate(capacity)]


def _rank(capacity: Sequence[float]) -> list[float]:
    return sorted(capacity)


def choose_span(
    capacity: Sequence[float], length: int, cuts: Iterable[int], throughput: float
) -> tuple[int, int]:
    """The span of ``length`` blocks where a server of ``throughput`` raises the swarm's throughput most
    (ties: the one that leaves the fewest weak blocks, then the first)."""
    spans = candidate_spans(len(capacity), length, cuts)
    scale = length / max(spans[0][1] - spans[0][0], 1)  # fewer blocks run faster, more run slower
    throughput = max(throughput, 1e-9) * scale
    return max(spans, key=lambda s: (_rank(with_span(capacity, *s, throughput)), -s[0]))


def estimate_throughput(servers: Iterable[ServerRecord], length: int) -> float:
    """What a new server of ``length`` blocks will likely announce, before it has measured anything:
    the median of the swarm's servers scaled to that length (1.0 in an empty swarm)."""
    per_block = [r.throughput * (r.end - r.start) for r in servers if r.throughput > 0]
    return statistics.median(per_block) / max(length, 1) if per_block else 1.0


@dataclass(frozen=True)
class Move:
    """Server ``peer`` should host ``start:end``; the swarm's bottleneck goes from ``before`` to ``after``."""

    peer: str
    start: int
    end: int
    before: float
    after: float


def best_move(
    servers: Mapping[str, ServerRecord], num_blocks: int, cuts: Iterable[int], peer: str
) -> tuple[Move, list[float]] | None:
    """Where server ``peer`` would help most if it left its span (and the capacities that would leave),
    or None when its best span is the one it has."""
    me = servers[peer]
    length = me.end - me.start
    now = block_throughput(servers.values(), num_blocks)
    without = block_throughput([r for p, r in servers.items() if p != peer], num_blocks)
    start, end = choose_span(without, length, cuts, me.throughput)
    if (start, end) == (me.start, me.end):
        return None
    after = with_span(without, start, end, me.throughput * length / max(end - start, 1))
    return Move(peer, start, end, min(now), min(after)), after


def worth_it(before: Sequence[float], after: Sequence[float], min_gain: float = MIN_GAIN) -> bool:
    """Hysteresis: a clear gain, so that a server does not move back and forth. Serving a block nobody
    served counts; otherwise the bottleneck must grow by ``min_gain``."""
    gaps_before, gaps_after = sum(c <= 0 for c in before), sum(c <= 0 for c in after)
    if gaps_after != gaps_before:
        return gaps_after < gaps_before
    return min(after) > min(before) * min_gain and min(after) > 0


def next_move(
    servers: Mapping[str, ServerRecord],
    num_blocks: int,
    cuts: Iterable[int],
    min_gain: float = MIN_GAIN,
) -> Move | None:
    """The one move among the movable servers that leaves the swarm best off, if it is worth it (ties:
    the lowest peer id). Every server computes this from the same records, so only one moves a round."""
    cuts = list(cuts)
    now = block_throughput(servers.values(), num_blocks)
    best: tuple[list[float], str, Move] | None = None
    for peer in sorted(servers):
        if not servers[peer].movable:
            continue
        found = best_move(servers, num_blocks, cuts, peer)
        if found is None or not worth_it(now, found[1], min_gain):
            continue
        move, after = found
        if best is None or _rank(after) > best[0]:
            best = (_rank(after), peer, move)
    return best[2] if best is not None else None
