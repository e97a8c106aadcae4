"""Pure logic of the swarm: wire format and its validation, records, routing, bans (block choice: test_placement.py)."""

from __future__ import annotations

import asyncio
import random

import msgpack
import pytest
import torch

from bloombee_core.compression import RAW
from bloombee_core.swarm import wire
from bloombee_core.swarm.records import ServerRecord
from bloombee_core.swarm.routing import BanList, NoRouteError, plan_route
from bloombee_core.transport import FrameStream


class Pipe:
    """An in-memory FrameStream pair endpoint (bytes written are readable by the same object)."""

    def __init__(self) -> None:
        self.reader = asyncio.StreamReader()

    def stream(self) -> FrameStream:
        pipe = self

        class Writer:
            def write(self, data):
                pipe.reader.feed_data(bytes(data))

            async def drain(self):
                pass

            def close(self):
                pipe.reader.feed_eof()

        return FrameStream(self.reader, Writer(), "peer")


def roundtrip(tensors, compressor=RAW, max_bytes=1 << 30):
    async def go():
        stream = Pipe().stream()
        await wire.send(stream, {"type": "x"}, tensors, compressor)
        header, metas = await wire.read_header(stream)
        return header, await wire.read_tensors(stream, metas, wire.compressor_table(), max_bytes)

    return asyncio.run(go())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensors_survive_the_wire_bit_for_bit(dtype):
    hidden = torch.randn(2, 3, 8).to(dtype)
    header, out = roundtrip({"hidden": hidden, "position_ids": torch.arange(6).view(2, 3)})
    assert header["type"] == "x"
    assert out["hidden"].dtype == dtype and torch.equal(
        out["hidden"].view(torch.int16 if dtype != torch.float32 else torch.int32),
        hidden.view(torch.int16 if dtype != torch.float32 else torch.int32),
    )
    assert torch.equal(out["position_ids"], torch.arange(6).view(2, 3))


def test_large_tensors_travel_in_chunks():
    big = torch.randn(3, wire.CHUNK // 4 + 7)
    _, out = roundtrip({"hidden": big})
    assert torch.equal(out["hidden"], big)


def test_size_limits_are_checked_before_reading_payloads():
    with pytest.raises(wire.ProtocolError, match="exceeds the limit"):
        roundtrip({"hidden": torch.zeros(100, 100)}, max_bytes=1000)


@pytest.mark.parametrize(
    "header, message",
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb("text"), "must be a map"),
        (
            msgpack.packb(
                {"tensors": [{"name": "h", "dtype": "int8", "shape": [1], "compressor": "none", "nbytes": 1}]}
            ),
            "dtype 'int8'",
        ),
        (
            msgpack.packb(
                {
                    "tensors": [
                        {"name": "h", "dtype": "float32", "shape": [1, -2], "compressor": "none", "nbytes": 1}
                    ]
                }
            ),
            "shape",
        ),
        (
            msgpack.packb(
                {
                    "tensors": [
                        {"name": "h", "dtype": "float32", "shape": [1] * 9, "compressor": "none", "nbytes": 4}
                    ]
                }
            ),
            "shape",
        ),
        (msgpack.packb({"tensors": "nope"}), "'tensors' must be a list"),
        *[  # a dtype of the wrong type is refused like an unknown one (it was an internal TypeError)
            (
                msgpack.packb(
                    {
                        "tensors": [
                            {"name": "h", "dtype": bad, "shape": [1], "compressor": "none", "nbytes": 4}
                        ]
                    }
                ),
                "is not one of",
            )
            for bad in (["float32"], {"a": 1}, 3, None)
        ],
    ],
)
def test_malformed_headers_are_refused_with_a_reason(header, message):
    async def go():
        stream = Pipe().stream()
        await stream.write_frame(header)
        await wire.read_header(stream)

    with pytest.raises(wire.ProtocolError, match=message):
        asyncio.run(go())


def test_unknown_compressor_is_refused():
    async def go():
        stream = Pipe().stream()
        meta = {"name": "h", "dtype": "float32", "shape": [1], "compressor": "zip9000", "nbytes": 4}
        await stream.write_frame(msgpack.packb({"tensors": [meta]}))
        _, metas = await wire.read_header(stream)
        await wire.read_tensors(stream, metas, wire.compressor_table(), 1 << 20)

    with pytest.raises(wire.ProtocolError, match="unknown compressor 'zip9000'"):
        asyncio.run(go())


def rec(peer, start, end, throughput=100.0):
    return ServerRecord(peer, start, end, throughput, 1 << 30, "float32", "llama", "0.1")


def test_route_covers_all_blocks_with_fewest_hops_and_lowest_latency():
    servers = {r.peer: r for r in [rec("a", 0, 4), rec("b", 4, 8), rec("c", 0, 8), rec("d", 0, 8)]}
    rtt = {"a": 0.001, "b": 0.001, "c": 0.050, "d": 0.002}
    hops = plan_route(servers, 0, 8, range(9), rtt, rng=random.Random(0))
    assert [(h.peer, h.start, h.end) for h in hops] == [("d", 0, 8)]
    hops = plan_route(servers, 0, 8, range(9), rtt, banned={"d"}, rng=random.Random(0))
    assert [(h.peer, h.start, h.end) for h in hops] == [("a", 0, 4), ("b", 4, 8)]


def test_route_for_a_sub_span_uses_part_of_a_server():
    servers = {"x": rec("x", 0, 8)}
    assert [(h.start, h.end) for h in plan_route(servers, 2, 5, range(9))] == [(2, 5)]


def test_no_route_names_the_missing_block():
    servers = {"a": rec("a", 0, 3), "b": rec("b", 4, 8)}
    with pytest.raises(NoRouteError, match="nothing serves block 3"):
        plan_route(servers, 0, 8, range(9))


def test_route_respects_allowed_cuts():
    servers = {"a": rec("a", 0, 4), "b": rec("b", 2, 8)}
    hops = plan_route(servers, 0, 8, [0, 2, 4, 8])
    assert all(h.start in (0, 2, 4, 8) and h.end in (0, 2, 4, 8) for h in hops)


def test_bans_grow_with_repeated_failures():
    bans = BanList(base=10, cap=25)
    assert bans.ban("p") == 10 and bans.ban("p") == 20 and bans.ban("p") == 25
    assert bans.banned() == {"p"}


def test_records_from_the_dht_are_validated():
    good = rec("p", 1, 3).to_value()
    assert ServerRecord.from_value("p", good).end == 3
    assert ServerRecord.from_value("p", {**good, "start": "x"}) is None
    assert ServerRecord.from_value("p", {**good, "start": 5, "end": 2}) is None
    assert ServerRecord.from_value("p", [1, 2]) is None
    # a row cost is advisory: a bad one is dropped, the record kept
    assert ServerRecord.from_value("p", {**good, "row_cost": 0.25}).row_cost == 0.25
    for bad in (float("nan"), -1, 11, "0.2", True, None):
        assert ServerRecord.from_value("p", {**good, "row_cost": bad}).row_cost is None


def test_hidden_states_can_travel_compressed_and_the_header_names_the_compressor():
    from bloombee_core.registry import load_plugins

    zstd = load_plugins().create("compressors", "zstd")
    hidden = torch.randn(2, 5, 16).to(torch.bfloat16)

    async def go():
        stream = Pipe().stream()
        await wire.send(
            stream, {}, {"hidden": hidden, "position_ids": torch.zeros(2, 5, dtype=torch.long)}, zstd
        )
        _, metas = await wire.read_header(stream)
        out = await wire.read_tensors(stream, metas, wire.compressor_table({"zstd": zstd}), 1 << 20)
        return metas, out

    metas, out = asyncio.run(go())
    assert {m.name: m.compressor for m in metas} == {"hidden": "zstd", "position_ids": "none"}
    assert torch.equal(out["hidden"].view(torch.int16), hidden.view(torch.int16))


def test_server_records_are_refreshed_in_the_background_until_they_are_stale(monkeypatch):
    """A new session does not wait for a DHT lookup while the records it has are recent; old ones are
    fetched before use, and a forced refresh always fetches."""
    from bloombee_core.client import swarm_client

    fetched: list[int] = []

    async def fetch(transport, model, num_blocks):
        fetched.append(len(fetched))
        await asyncio.sleep(0.05)
        return {f"peer{len(fetched)}": len(fetched)}

    monkeypatch.setattr(swarm_client, "fetch_servers", fetch)
    client = swarm_client.SwarmClient(None, "m", 4, [0, 4], refresh_every=5.0)

    async def scenario():
        assert await client.refresh() == {"peer1": 1}  # nothing yet: fetched before answering
        assert await client.refresh() == {"peer1": 1} and len(fetched) == 1  # fresh: no fetch
        client._fetched_at -= 10  # older than refresh_every, younger than stale_after
        assert await client.refresh() == {"peer1": 1}  # answered at once ...
        await asyncio.sleep(0.1)
        assert client.servers == {"peer2": 2}  # ... and refreshed behind it
        client._fetched_at -= 100  # stale: fetched first
        assert await client.refresh() == {"peer3": 3}
        assert await client.refresh(force=True) == {"peer4": 4}

    asyncio.run(scenario())


def test_a_record_names_a_local_model_without_its_path(tmp_path):
    from bloombee_core.swarm.records import public_model_name

    folder = tmp_path / "secret-place" / "my-model"
    folder.mkdir(parents=True)
    assert public_model_name(folder) == "my-model"
    assert public_model_name(str(folder / "weights.gguf")) == "weights.gguf"  # absolute: never shown whole
    assert public_model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
