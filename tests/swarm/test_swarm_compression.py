"""``auto`` compression on every path of a real swarm: client -> server, server -> server push, server ->
client replies, stateless forward and backward. The servers and the client start from a slow-link
estimate (1 kB/s), so every floating-point message is worth compressing; outputs and gradients must
still be exactly those of local ``transformers``, and the byte counts in the session stats, the
servers' own report and ``bloombee status`` show fewer bytes on the wire than raw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.family_helpers import FAMILY_CONFIGS, save_tiny
from tests.swarm.test_swarm_cli import cli

SLOW = '{"name": "auto", "bandwidth_bytes_per_s": 1000}'


@pytest.fixture(scope="module")
def compressed_swarm(swarm, tmp_path_factory):
    # its own weights (seed 5): a model key no other test's servers share
    folder = save_tiny(FAMILY_CONFIGS["llama"](), tmp_path_factory.mktemp("tiny-llama-auto"), seed=5)
    servers = [swarm.serve(folder, blocks, "--compressor", SLOW) for blocks in ("0:2", "2:4")]
    for child in servers:
        child.wait_ready()
    from bloombee_compress.auto import AutoCompressor, AutoOptions

    from bloombee_core.client import AutoDistributedModelForCausalLM

    client = AutoDistributedModelForCausalLM.from_pretrained(
        folder, swarm.peers, compressor=AutoCompressor(AutoOptions(bandwidth_bytes_per_s=1000))
    )
    yield folder, servers, client
    client.close()
    for child in servers:
        child.stop()


def _smaller_on_the_wire(traffic: dict[str, int], *directions: str) -> None:
    for direction in directions:
        raw, wire = traffic[f"{direction}_raw"], traffic[f"{direction}_wire"]
        assert 0 < wire < raw, (direction, traffic)


def test_every_path_compresses_and_stays_exact(swarm, compressed_swarm):
    folder, servers, model = compressed_swarm
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), model.inference_session(max_length=40) as session:
        got = model.generate(ids, max_new_tokens=8, do_sample=False)
        stats = session.stats()
    assert got.tolist() == ref.generate(ids, max_new_tokens=8, do_sample=False).tolist()
    first, second = stats
    _smaller_on_the_wire(first["traffic"], "sent", "received")  # client -> server 0 -> client
    _smaller_on_the_wire(second["traffic"], "received")  # server 1's replies (its input came by push)
    assert second["computed_from"]["push"] == second["steps"]

    # stateless forward and backward (training): the loss and input gradients of local autograd
    embeds = ref.get_input_embeddings()(ids).detach()
    mine, theirs = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
    loss = model(inputs_embeds=mine, labels=ids).loss
    want = ref(inputs_embeds=theirs, labels=ids).loss
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    loss.backward()
    want.backward()
    torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-4)

    # the servers' own report: the push link from server 0 to server 1 carried compressed bytes
    peers = [child.ready["peer"] for child in servers]
    info = model.loop.run(model.swarm.info(peers[0]))
    links = {link["peer"]: link for link in info["traffic"]["links"]}
    _smaller_on_the_wire(links[peers[1]], "sent")

    # bloombee status shows raw and wire bytes per server (from their DHT records, refreshed every ttl/3)
    result = cli("status", "--initial-peers", *swarm.peers, "--json")
    assert result.returncode == 0, result.stderr
    [entry] = [m for m in json.loads(result.stdout)["models"] if m["name"] == Path(folder).name]
    assert {s["peer"] for s in entry["servers"]} == set(peers)
    assert all(len(s["traffic"]) == 4 for s in entry["servers"])

    # the client's own links carried the forward and backward compressed too
    for peer in peers:
        _smaller_on_the_wire(model.swarm.links.get(peer).traffic.as_dict(), "sent", "received")


def test_status_shows_wire_and_raw_bytes_per_server_and_link():
    from rich.console import Console

    from bloombee_core.cli.status import render

    server = {
        "peer": "12D3KooWserverA",
        "public_name": "",
        "start": 0,
        "end": 2,
        "movable": False,
        "throughput": 10.0,
        "cache_left": 1 << 20,
        "dtype": "bfloat16",
        "version": "x",
        "traffic": [2048, 1400, 4096, 4096],
        "links": [["12D3KooWclientB", 2048, 1400, 4096, 4096]],
    }
    report = {"models": [{"key": "k", "name": "m", "family": "llama", "num_blocks": 2, "coverage": [1, 1],
                          "servers": [server]}]}  # fmt: skip
    console = Console(record=True, width=200)
    render(report, console)
    text = console.export_text()
    assert "1.4 KiB / 2.0 KiB (0.68)" in text and "4.0 KiB / 4.0 KiB (1.00)" in text
    assert "link 3KooWserverA -> 3KooWclientB: sent 1.4 KiB / 2.0 KiB (0.68)" in text
