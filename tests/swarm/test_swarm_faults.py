"""Failures: a server killed mid-generation, and malformed requests sent straight to a server."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import torch
from transformers import AutoModelForCausalLM

from bloombee_core.client.rpc import RemoteError, request
from bloombee_core.compression import RAW
from bloombee_core.swarm import wire
from bloombee_core.transport import TransportError


class KillAfter:
    """A generate streamer that SIGKILLs the server serving ``blocks`` in the live route after n tokens."""

    def __init__(self, swarm, servers, model, blocks: tuple[int, int], after: int) -> None:
        self.swarm, self.servers, self.model, self.blocks, self.after = swarm, servers, model, blocks, after
        self.calls, self.killed = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == self.after + 1:  # the first put is the prompt
            route = self.model._session.route
            victim = next(h.peer for h in route if (h.start, h.end) == self.blocks)
            child = next(c for c in self.servers if c.ready["peer"] == victim)
            self.swarm.kill9(child)
            self.killed = victim

    def end(self):
        pass


def test_generation_survives_a_server_killed_mid_generation(swarm, tiny_models, family_servers, remote_model):
    folder = tiny_models["llama"]
    model = remote_model(folder)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(5))
    streamer = KillAfter(swarm, family_servers["llama"], model, (1, 3), after=4)
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=16, do_sample=False)
        got = model.generate(ids, max_new_tokens=16, do_sample=False, streamer=streamer)
    assert streamer.killed is not None
    assert got.tolist() == want.tolist()
    assert streamer.killed in model.swarm.bans.banned()


def test_backward_after_a_span_was_re_split(swarm, tiny_models, family_servers, remote_model):
    """The forward ran blocks 1:3 on one server; by the backward no server hosting all of 1:3 is usable,
    only servers of 1:2 and 2:3: the client recomputes the pieces' inputs and chains the backward."""
    whole = [
        c.ready["peer"] for c in family_servers["llama"] if c.ready["start"] == 1 and c.proc.poll() is None
    ]
    folder = tiny_models["llama"]
    model = remote_model(folder)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    halves = [swarm.serve(folder, blocks) for blocks in ("1:2", "2:3")]
    bans = model.swarm.bans
    try:
        split = [child.wait_ready()["peer"] for child in halves]
        ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(9))
        embeds = ref.get_input_embeddings()(ids).detach()
        mine = embeds.clone().requires_grad_(True)
        theirs = embeds.clone().requires_grad_(True)
        for peer in split:  # the forward: 1:3 in one piece
            bans.ban(peer)
        loss = model(inputs_embeds=mine, labels=ids).loss
        for peer in split:  # the backward: 1:3 only in two pieces
            bans.lift(peer)
        for peer in whole:
            bans.ban(peer)
        loss.backward()
        ref(inputs_embeds=theirs, labels=ids).loss.backward()
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-4)
    finally:
        for peer in whole:
            bans.lift(peer)
        for child in halves:
            child.stop()


async def _exchange(transport, peer, frames: list[bytes]) -> dict:
    """Send raw frames on a new stream and return the server's reply header."""
    stream = await transport.connect(peer, wire.PROTOCOL)
    try:
        try:
            for frame in frames:
                await stream.write_frame(frame)
        except TransportError:
            pass  # the server may refuse and close before the rest of a bad request is written
        reply = await asyncio.wait_for(wire.read_header(stream), 20)
        assert reply is not None, "the server closed the stream without an answer"
        return reply[0]
    finally:
        stream.close()


def _header(**fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def _meta(name, dtype, shape, nbytes=None, compressor="none"):
    size = {"float32": 4, "int64": 8, "bfloat16": 2, "float16": 2}[dtype]
    count = 1
    for d in shape:
        count *= d
    return {
        "name": name,
        "dtype": dtype,
        "shape": shape,
        "compressor": compressor,
        "nbytes": count * size if nbytes is None else nbytes,
    }


def _forward_frames(start, end, hidden_meta, pos_meta, payloads=True) -> list[bytes]:
    frames = [_header(type="forward", start=start, end=end, tensors=[hidden_meta, pos_meta])]
    if payloads:
        frames += [b"\0" * hidden_meta["nbytes"], b"\0" * pos_meta["nbytes"]]
    return frames


BAD_REQUESTS = {
    "garbage bytes": ([b"\x93\xff\x00garbage"], "not valid msgpack"),
    "not a map": ([msgpack.packb([1, 2, 3])], "must be a map"),
    "unknown type": ([_header(type="explode")], "unknown request type"),
    "wrong hidden size": (
        _forward_frames(1, 3, _meta("hidden", "float32", [1, 2, 65]), _meta("position_ids", "int64", [1, 2])),
        "hidden must be [batch, tokens, 64]",
    ),
    "wrong dtype": (
        _forward_frames(1, 3, _meta("hidden", "int64", [1, 2, 64]), _meta("position_ids", "int64", [1, 2])),
        "hidden must be floating point",
    ),
    "unknown dtype": (
        _forward_frames(
            1,
            3,
            _meta("hidden", "float32", [1, 2, 64]) | {"dtype": "complex64"},
            _meta("position_ids", "int64", [1, 2]),
        ),
        "dtype 'complex64' is not one of",
    ),
    "position ids of the wrong shape": (
        _forward_frames(1, 3, _meta("hidden", "float32", [1, 2, 64]), _meta("position_ids", "int64", [1, 3])),
        "position_ids must be int64 [1, 2]",
    ),
    "size above limits": (
        _forward_frames(
            1,
            3,
            _meta("hidden", "float32", [64, 4096, 64]),
            _meta("position_ids", "int64", [64, 4096]),
            False,
        ),
        "outside the limits",
    ),
    "declared bytes disagree with the shape": (
        _forward_frames(
            1,
            3,
            _meta("hidden", "float32", [1, 2, 64], nbytes=10),
            _meta("position_ids", "int64", [1, 2]),
            False,
        ),
        "raw bytes declared",
    ),
    "out-of-range blocks": (
        _forward_frames(
            0, 9, _meta("hidden", "float32", [1, 2, 64]), _meta("position_ids", "int64", [1, 2]), False
        ),
        "out of range",
    ),
    "unknown session id (push)": (
        [_header(type="push", session_id="no-such-session-123", step=0, tensors=[])],
        "unknown session id",
    ),
    "session that does not fit the cache budget": (
        [
            _header(
                type="open", session_id="s" * 16, start=1, end=3, batch_size=64, max_length=8192, push=None
            )
        ],
        "busy",
    ),
    "absurd batch": (
        [
            _header(
                type="open", session_id="t" * 16, start=1, end=3, batch_size=10**9, max_length=8, push=None
            )
        ],
        "batch_size must be an integer",
    ),
    "header frame above the limit": ([b"\0" * (wire.MAX_HEADER + 1)], "header too large"),
}


def test_malformed_requests_get_clear_errors_while_the_server_keeps_serving(
    swarm, tiny_models, family_servers, remote_model, raw_client
):
    loop, transport = raw_client
    folder = tiny_models["llama"]
    model = remote_model(folder)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    target = next(
        c.ready["peer"]
        for c in family_servers["llama"]
        if (c.ready["start"], c.ready["end"]) == (1, 3) and c.proc.poll() is None
    )
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=12, do_sample=False)
        with model.inference_session(max_length=32) as session:
            # a well-behaved client is mid-session on the same server while the bad requests arrive
            first = model.generate(ids, max_new_tokens=4, do_sample=False)
            for name, (frames, expected) in BAD_REQUESTS.items():
                reply = loop.run(_exchange(transport, target, frames))
                assert reply.get("ok") is False, name
                assert expected in reply["error"], f"{name}: {reply['error']}"
            got = model.generate(first, max_new_tokens=8, do_sample=False)
            assert session.position == 5 + 11
    assert got.tolist() == want.tolist()


def test_a_valid_raw_forward_still_works_after_bad_requests(tiny_models, family_servers, raw_client):
    loop, transport = raw_client
    peer = next(c.ready["peer"] for c in family_servers["llama"] if c.ready["start"] == 0)

    async def call():
        stream = await transport.connect(peer, wire.PROTOCOL)
        try:
            hidden = torch.randn(1, 3, 64)
            pos = torch.arange(3).unsqueeze(0)
            return await request(
                stream,
                {"type": "forward", "start": 0, "end": 1},
                {"hidden": hidden, "position_ids": pos},
                RAW,
                wire.compressor_table(),
            )
        finally:
            stream.close()

    head, tensors = loop.run(call())
    assert head["ok"] and tensors["hidden"].shape == (1, 3, 64)

    async def bad():
        stream = await transport.connect(peer, wire.PROTOCOL)
        try:
            return await request(
                stream,
                {"type": "forward", "start": 0, "end": 2},
                {"hidden": torch.randn(1, 3, 64), "position_ids": torch.zeros(1, 3, dtype=torch.long)},
                RAW,
                wire.compressor_table(),
            )
        finally:
            stream.close()

    with pytest.raises(RemoteError, match="out of range: this server holds blocks 0:1"):
        loop.run(bad())
