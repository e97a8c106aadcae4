"""Placement with real servers: a server started without --blocks joins where the swarm's throughput is
lowest, and when a server leaves it moves to cover the gap while a generation running on it goes on to
the same tokens as local transformers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from family_helpers import SMALL
from rich.console import Console
from transformers import AutoModelForCausalLM, LlamaConfig

from bloombee_core.cli.status import collect, render
from bloombee_core.client.rpc import call
from bloombee_core.compression import RAW
from bloombee_core.swarm import wire
from bloombee_core.swarm.records import fetch_servers

DEADLINE = 120.0  # seconds; generous: two cores shared by the whole suite


@pytest.fixture(scope="module")
def llama8(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama8")
    config = LlamaConfig(**SMALL, intermediate_size=128, num_hidden_layers=8, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


def serve(swarm, folder: Path, *flags: str):
    """A server process of ``folder`` with these flags (``swarm.serve`` always gives --blocks)."""
    argv = ["serve", str(folder), "--initial-peers", *swarm.peers, "--ttl", "15", *flags]
    return swarm._spawn(f"server-placement-{len(swarm.children)}", argv)


def poll(what: str, probe, deadline: float = DEADLINE):
    """``probe()`` until it returns something true; fail naming ``what`` and the last value."""
    end = time.monotonic() + deadline
    while True:
        value = probe()
        if value or time.monotonic() > end:
            break
        time.sleep(0.25)
    assert value, f"not {what} after {deadline:.0f}s (last: {value!r})"
    return value


class StopAfter:
    """A generate streamer that, after ``after`` tokens, stops a server of the live chain cleanly and
    waits until the movable server has moved (``moved()`` is true) before the generation goes on."""

    def __init__(self, model, victim, moved, after: int) -> None:
        self.model, self.victim, self.moved, self.after = model, victim, moved, after
        self.calls, self.route_before = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == self.after + 1:  # the first put is the prompt
            self.route_before = [(h.peer, h.start, h.end) for h in self.model._session.route]
            self.victim.stop()
            poll("moved", self.moved)

    def end(self):
        pass


def test_a_server_joins_the_weakest_blocks_and_moves_to_cover_a_server_that_left(swarm, llama8, raw_client):
    from bloombee_core.client import AutoDistributedModelForCausalLM

    loop, transport = raw_client
    a = serve(swarm, llama8, "--blocks", "0:4", "--throughput", "100")
    b = serve(swarm, llama8, "--blocks", "4:8", "--throughput", "10")  # the slow one: the bottleneck
    children, model = [a, b], None
    try:
        key = a.wait_ready()["model"]
        peer_a, peer_b = a.ready["peer"], b.wait_ready()["peer"]

        def servers():
            return loop.run(fetch_servers(transport, key, 8), timeout=30)

        poll("both announced", lambda: {peer_a, peer_b} <= set(servers()))
        # one server on each half: counting servers ties, throughput does not
        c = serve(swarm, llama8, "--num-blocks", "4", "--throughput", "50", "--rebalance-every", "1")
        children.append(c)
        ready = c.wait_ready()
        peer_c = ready["peer"]
        assert (ready["start"], ready["end"]) == (4, 8)
        poll("c announced", lambda: peer_c in servers())

        def info_c():
            head, _ = loop.run(
                call(transport, peer_c, {"type": "info"}, None, RAW, wire.compressor_table(None), 10.0),
                timeout=30,
            )
            return head

        def c_moved():
            now = servers()
            record = now.get(peer_c)
            moved = record is not None and (record.start, record.end) == (0, 4) and peer_a not in now
            return moved and info_c()["draining"] == [[4, 8, 1]]  # its session on 4:8 still runs there

        model = AutoDistributedModelForCausalLM.from_pretrained(llama8, swarm.peers)
        ref = AutoModelForCausalLM.from_pretrained(llama8, dtype=torch.float32).eval()
        ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(3))
        streamer = StopAfter(model, a, c_moved, after=4)
        with torch.no_grad():
            want = ref.generate(ids, max_new_tokens=12, do_sample=False)
            with model.inference_session(max_length=32) as session:
                got = model.generate(ids, max_new_tokens=12, do_sample=False, streamer=streamer)
                route_after = [(h.peer, h.start, h.end) for h in session.route]
        assert streamer.route_before == [(peer_a, 0, 4), (peer_c, 4, 8)]
        assert got.tolist() == want.tolist()
        # the gap is served by c's new span; the running session stayed on c's old one until it closed
        assert route_after == [(peer_c, 0, 4), (peer_c, 4, 8)]
        # Leaving the swarm closes the client's streams at once. (A session's close alone is written from
        # this thread and reaches the servers only when the client's event loop next wakes up.)
        model.close()
        model = None
        poll("c's old span dropped", lambda: info_c()["draining"] == [])
        assert (info_c()["start"], info_c()["end"]) == (0, 4)

        report = loop.run(collect(transport), timeout=60)
        mine = next(m for m in report["models"] if m["key"] == key)
        assert {(s["peer"], s["start"], s["end"], s["movable"]) for s in mine["servers"]} == {
            (peer_b, 4, 8, False),
            (peer_c, 0, 4, True),
        }
        assert mine["block_throughput"] == [50.0] * 4 + [10.0] * 4
        assert mine["bottleneck"] == {"throughput": 10.0, "blocks": [4, 5, 6, 7]}
        console = Console(record=True, width=160)
        render({"models": [mine]}, console)
        text = console.export_text()
        assert "throughput per block (tok/s): 0:50.0 1:50.0 2:50.0 3:50.0 4:10.0" in text
        assert "swarm throughput: 10.0 tok/s, bottleneck at blocks 4-7" in text
        assert "auto" in text and "fixed" in text
    finally:
        if model is not None:
            model.close()
        for child in children:
            child.stop()
