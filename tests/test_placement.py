"""Placement: a server without --blocks goes where the swarm's end-to-end throughput is lowest, and a
movable server moves only when that raises the swarm's throughput clearly, one server at a time."""

from __future__ import annotations

from bloombee_core.swarm.placement import (
    block_throughput,
    bottleneck,
    candidate_spans,
    choose_span,
    estimate_throughput,
    next_move,
)
from bloombee_core.swarm.records import ServerRecord

CUTS = range(9)


def rec(peer: str, start: int, end: int, throughput: float, movable: bool = False) -> ServerRecord:
    return ServerRecord(peer, start, end, throughput, 1 << 30, "float32", "llama", "0.1", movable=movable)


def swarm(*records: ServerRecord) -> dict[str, ServerRecord]:
    return {r.peer: r for r in records}


def test_a_block_can_pass_what_its_servers_pass_together():
    capacity = block_throughput([rec("a", 0, 4, 100), rec("b", 2, 8, 10)], 8)
    assert capacity == [100, 100, 110, 110, 10, 10, 10, 10]
    assert bottleneck(capacity) == (10, [4, 5, 6, 7])


def test_in_an_empty_swarm_a_server_takes_the_first_span():
    assert choose_span([0.0] * 8, 4, CUTS, 1.0) == (0, 4)
    assert estimate_throughput([], 4) == 1.0


def test_a_new_server_joins_the_blocks_a_slow_server_holds():
    # one server on each half: the slow one (10 tok/s) is the swarm's bottleneck, whatever the counts say
    capacity = block_throughput([rec("fast", 0, 4, 100), rec("slow", 4, 8, 10)], 8)
    assert choose_span(capacity, 4, CUTS, 50) == (4, 8)
    # two servers on the first half still pass less than one fast server on the second
    capacity = block_throughput([rec("a", 0, 4, 10), rec("b", 0, 4, 10), rec("c", 4, 8, 100)], 8)
    assert choose_span(capacity, 4, CUTS, 50) == (0, 4)


def test_missing_blocks_come_first():
    capacity = block_throughput([rec("a", 0, 3, 100)], 8)
    assert choose_span(capacity, 4, CUTS, 50) == (3, 7)  # fills 4 of the 5 missing blocks, the first of them


def test_ties_go_to_the_span_that_leaves_the_fewest_weak_blocks():
    # blocks 0:2 and 6:8 are weak; covering 4:8 lifts 6:8 and leaves two weak blocks, as covering 0:4
    # would; both bottlenecks are 10, so the first span wins. With block 3 weak too, 0:4 leaves fewer.
    capacity = [10, 10, 50, 50, 50, 50, 10, 10]
    assert choose_span(capacity, 4, CUTS, 100) == (0, 4)
    capacity = [10, 10, 50, 50, 50, 50, 10, 10]
    assert choose_span(capacity, 2, CUTS, 100) == (0, 2)
    capacity = [10, 10, 50, 50, 50, 10, 10, 10]
    assert choose_span(capacity, 4, CUTS, 100) == (4, 8)  # lifts 3 of the weak blocks, 0:4 only 2


def test_spans_honour_allowed_cuts():
    # Gemma 4 style: blocks 2..5 share KV and stay together, so the only cuts are 0, 1, 2, 6
    cuts = [0, 1, 2, 6]
    assert candidate_spans(6, 4, cuts) == [(2, 6)]
    assert candidate_spans(6, 3, cuts) == [(0, 2)]  # no 3-block span: the longest shorter one
    assert candidate_spans(6, 3, [0, 6]) == [(0, 6)]  # nothing shorter: the shortest longer one
    assert choose_span([1, 1, 0, 0, 0, 0], 4, cuts, 5) == (2, 6)


def test_a_movable_server_moves_to_cover_a_server_that_left():
    # a and c shared 0:4... then the server of 4:8 left: c moves there, a (given --blocks) never does
    servers = swarm(rec("a", 0, 4, 100), rec("c", 0, 4, 50, movable=True))
    move = next_move(servers, 8, CUTS)
    assert move is not None and (move.peer, move.start, move.end) == ("c", 4, 8)
    assert move.before == 0 and move.after == 50
    servers = swarm(rec("a", 0, 4, 100), rec("c", 0, 4, 50))  # nobody may move
    assert next_move(servers, 8, CUTS) is None


def test_a_move_needs_a_clear_gain():
    # moving c from 0:4 to 4:8 would lift the bottleneck from 100 to 110 only: not worth a move
    servers = swarm(rec("a", 0, 4, 100), rec("c", 0, 4, 50, movable=True), rec("b", 4, 8, 100))
    assert next_move(servers, 8, CUTS) is None
    # a slow server on 4:8 instead: the bottleneck goes from 10 to 60
    servers = swarm(rec("a", 0, 4, 100), rec("c", 0, 4, 50, movable=True), rec("b", 4, 8, 10))
    move = next_move(servers, 8, CUTS)
    assert move is not None and (move.peer, move.start, move.end, move.after) == ("c", 4, 8, 60)


def test_after_a_move_nobody_moves_back():
    servers = swarm(rec("a", 0, 4, 100), rec("c", 4, 8, 50, movable=True), rec("b", 4, 8, 10))
    assert next_move(servers, 8, CUTS) is None


def test_only_one_server_moves_at_a_time():
    # two movable servers could each cover the gap; every server picks the same one (the best move,
    # then the lowest peer id), so only it moves
    servers = swarm(rec("a", 0, 4, 100), rec("m1", 0, 4, 50, movable=True), rec("m2", 0, 4, 50, movable=True))
    move = next_move(servers, 8, CUTS)
    assert move is not None and move.peer == "m1"
    servers = swarm(rec("a", 0, 4, 100), rec("m1", 0, 4, 20, movable=True), rec("m2", 0, 4, 50, movable=True))
    assert next_move(servers, 8, CUTS).peer == "m2"  # the faster one fills the gap better


def test_a_slow_server_joining_makes_nobody_move_without_gain():
    # a slow server joins the well-served half: the bottleneck does not change, so nothing moves
    servers = swarm(
        rec("a", 0, 4, 100), rec("b", 4, 8, 100), rec("c", 0, 4, 50, movable=True), rec("s", 0, 4, 1)
    )
    assert next_move(servers, 8, CUTS) is None
