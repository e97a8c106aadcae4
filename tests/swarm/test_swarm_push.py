"""Server->server push: in a chain of three servers, the 2nd and 3rd get every input from the previous
server, and the client sends them nothing but the session's opening."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM


def test_later_servers_get_their_inputs_by_push(tiny_models, family_servers, remote_model):
    family_servers["llama"]  # blocks 0:1, 1:3 (twice), 3:4: every chain has three hops
    folder = tiny_models["llama"]
    model = remote_model(folder)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(1, 128, (1, 7), generator=torch.Generator().manual_seed(11))
    with torch.no_grad(), model.inference_session(max_length=32) as session:
        got = model.generate(ids, max_new_tokens=10, do_sample=False)
        stats = session.stats()
    assert got.tolist() == ref.generate(ids, max_new_tokens=10, do_sample=False).tolist()

    assert [s["blocks"] for s in stats] == [(0, 1), (1, 3), (3, 4)]
    steps = 1 + 9  # the prefill and 9 decode steps (the 10th token is never fed back)
    first, *later = stats
    assert first["steps"] == steps and first["computed_from"] == {"client": steps, "push": 0}
    assert first["server_received"] == {"from_client": steps, "from_push": 0}
    for hop in later:
        assert hop["steps"] == steps
        assert hop["computed_from"] == {"client": 0, "push": steps}, hop
        assert hop["sent_by_client"] == 0, hop  # the client never sent this server a hidden state
        assert hop["server_received"] == {"from_client": 0, "from_push": steps}, hop


def test_only_the_server_before_it_may_push_into_a_session(
    tiny_models, family_servers, remote_model, raw_client
):
    """A session id is no key: a stranger who learned it cannot inject steps; the chain still works."""
    from bloombee_core.client.rpc import RemoteError, request
    from bloombee_core.compression import RAW
    from bloombee_core.swarm import wire

    family_servers["llama"]
    folder = tiny_models["llama"]
    model = remote_model(folder)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    loop, transport = raw_client
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(12))
    with torch.no_grad(), model.inference_session(max_length=16) as session:
        first = model.generate(ids, max_new_tokens=2, do_sample=False)
        second = session.inner.hops[1]  # blocks 1:3: fed by the first server's pushes
        forged = {"hidden": torch.randn(1, 1, 64), "position_ids": torch.tensor([[7]])}

        async def inject():
            stream = await transport.connect(second.hop.peer, wire.PROTOCOL)
            try:
                header = {"type": "push", "session_id": second.id, "step": 2}
                return await request(stream, header, forged, RAW, wire.compressor_table(None))
            finally:
                stream.close()

        try:
            loop.run(inject(), timeout=30)
            raise AssertionError("a stranger's push was accepted")
        except RemoteError as exc:
            assert exc.code == "bad_request" and "push refused" in str(exc), exc
        more = model.generate(first, max_new_tokens=3, do_sample=False)  # the session goes on, exact
    assert more.tolist() == ref.generate(ids, max_new_tokens=5, do_sample=False).tolist()


def test_a_server_pushes_only_to_a_server_of_the_next_blocks(tiny_models, family_servers, raw_client, swarm):
    """A request naming any peer as its push target does not make the server dial it."""
    from bloombee_core.client.rpc import read_reply
    from bloombee_core.compression import RAW
    from bloombee_core.swarm import wire

    first = family_servers["llama"][0]  # blocks 0:1
    loop, transport = raw_client
    stranger = {"peer": swarm.peers[0].rsplit("/p2p/", 1)[1], "session_id": "abcdefgh"}  # the bootstrap node

    async def session_with_a_stranger_as_push_target():
        stream = await transport.connect(first.ready["peer"], wire.PROTOCOL)
        try:
            header = {
                "type": "open",
                "session_id": "stranger-target-1",
                "start": 0,
                "end": 1,
                "batch_size": 1,
            }
            await wire.send(stream, {**header, "max_length": 8, "push": stranger, "upstream": None})
            tensors = {"hidden": torch.randn(1, 2, 64), "position_ids": torch.tensor([[0, 1]])}
            await wire.send(stream, {"type": "step", "step": 0}, tensors, RAW)
            opened, _ = await read_reply(stream, wire.compressor_table(None))
            reply, out = await read_reply(stream, wire.compressor_table(None))
            return opened, reply, out
        finally:
            stream.close()

    opened, reply, out = loop.run(session_with_a_stranger_as_push_target(), timeout=60)
    assert opened["ok"] and reply["ok"] and out["hidden"].shape == (1, 2, 64)
    assert reply["pushed"] is False  # computed and answered, but not sent to the stranger
    assert "will not push to" in first.log.read_text()
