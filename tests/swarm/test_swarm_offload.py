"""A server under a memory budget smaller than its blocks, with half of its KV-cache layers on disk: it
streams the weights that do not fit from disk, keeps its peak memory within the budget, refuses sessions
the budget cannot hold (busy), announces where it keeps what, and its output stays token-identical to
transformers."""

from __future__ import annotations

import json

import msgpack
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from .test_swarm_faults import _exchange

MIB = 1 << 20


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """Few layers but wide ones (about 25 MiB of fp32 weights each): big next to the process itself."""
    torch.manual_seed(5)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=6,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    folder = tmp_path_factory.mktemp("wide-llama")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


def info(model, peer):
    return model.loop.run(model.swarm.info(peer))


@pytest.fixture(scope="module")
def budget_server(swarm, wide_llama, family_servers, remote_model):
    # The budget: what a server process holds before loading any weights (read from a running one,
    # whose own weights are tiny) plus a forward's working memory and a quarter of this model's weights: most of them cannot stay.
    tiny = family_servers["llama"][0]
    base = info(remote_model(family_servers.models["llama"]), tiny.ready["peer"])["placement"]["base"]
    weights = sum(
        p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(wide_llama).model.layers.parameters()
    )
    budget = base + 128 * MIB + weights // 4
    # and half of the KV-cache layers on disk
    offload = json.dumps({"name": "percent", "kv_on_disk": 50})
    child = swarm.serve(wide_llama, "0:6", "--memory-budget", str(budget), "--offload", offload)
    child.wait_ready()
    yield child, budget, weights
    child.stop()


def test_a_budget_smaller_than_the_blocks_holds_and_output_stays_exact(
    budget_server, wide_llama, remote_model, raw_client
):
    child, budget, weights = budget_server
    model = remote_model(wide_llama)
    ref = AutoModelForCausalLM.from_pretrained(wide_llama, dtype=torch.float32).eval()
    ids = torch.randint(1, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=10, do_sample=False)
        got = model.generate(ids, max_new_tokens=10, do_sample=False)
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)
    assert got.tolist() == want.tolist()

    placed = info(model, child.ready["peer"])["placement"]
    assert placed["budget"]["budget"] == budget
    on = placed["weights"]
    assert on["disk"] > weights // 3 and on["device"] + on["disk"] == weights  # most of it streams from disk
    assert 0 < placed["peak"] <= budget  # the measured peak RSS stayed within the budget

    # A session the budget cannot hold is refused as busy, and the server keeps serving.
    open_too_big = msgpack.packb(
        {"type": "open", "session_id": "b" * 16, "start": 0, "end": 6, "batch_size": 64, "max_length": 256},
        use_bin_type=True,
    )
    loop, transport = raw_client
    reply = loop.run(_exchange(transport, child.ready["peer"], [open_too_big]))
    assert reply["ok"] is False and "busy" in reply["error"]
    with torch.no_grad():
        assert model.generate(ids, max_new_tokens=4, do_sample=False).tolist() == want[:, :11].tolist()


def test_status_shows_where_the_server_keeps_its_blocks(budget_server, swarm):
    from bloombee_core.cli.status import collect

    child, budget, weights = budget_server
    from bloombee_hivemind import HivemindTransport

    from bloombee_core.swarm.aio import LoopThread

    loop = LoopThread("status-test")
    transport = HivemindTransport()
    try:
        loop.run(transport.start(initial_peers=swarm.peers, client_mode=True))
        report = loop.run(collect(transport))
    finally:
        loop.run(transport.shutdown(), timeout=20)
        loop.stop()
    record = next(s for m in report["models"] for s in m["servers"] if s["peer"] == child.ready["peer"])
    device, cpu, disk, kv_device, kv_cpu, kv_disk, announced_budget, peak = record["memory"]
    assert device + cpu + disk == weights and disk > 0 and cpu == 0
    assert (kv_device, kv_cpu, kv_disk) == (3, 0, 3)
    assert announced_budget == budget and 0 < peak <= budget
