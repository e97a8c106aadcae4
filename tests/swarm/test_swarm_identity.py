"""Model identity and offloading servers: checkpoint B (the llama test model's config, other weights)
served by one server that streams half its weights; B's client uses only B's server and matches B."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from bloombee_core.model import load_config

from .conftest import FAMILY_CONFIGS

OFFLOAD = json.dumps({"name": "percent", "weights_on_device": 50, "weights_on_disk": 50})


@pytest.fixture(scope="module")
def checkpoint_b(tmp_path_factory):
    torch.manual_seed(123)  # the same config as the session's tiny llama, different weights
    folder = tmp_path_factory.mktemp("tiny-llama-b")
    AutoModelForCausalLM.from_config(FAMILY_CONFIGS["llama"](), dtype=torch.float32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server_b(swarm, checkpoint_b, family_servers):
    family_servers["llama"]  # checkpoint A is served too, by four servers
    child = swarm.serve(checkpoint_b, "0:4", "--offload", OFFLOAD)
    child.wait_ready()
    yield child
    child.stop()


def test_same_config_other_weights_is_another_model(
    tiny_models, checkpoint_b, server_b, family_servers, remote_model
):
    from bloombee_core.swarm.records import model_key

    folder_a = tiny_models["llama"]
    config_a, config_b = load_config(folder_a), load_config(checkpoint_b)
    assert model_key(config_a) == model_key(config_b)  # the configs alone cannot tell them apart
    assert model_key(config_a, folder_a) != model_key(config_b, checkpoint_b)

    model_b, model_a = remote_model(checkpoint_b), remote_model(folder_a)
    ref_b = AutoModelForCausalLM.from_pretrained(checkpoint_b, dtype=torch.float32).eval()
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        # exact through a server that streams half of its weights (offload policy "percent")
        torch.testing.assert_close(model_b(ids).logits, ref_b(ids).logits, atol=1e-5, rtol=0)
        with model_b.inference_session(max_length=24) as session:
            got = model_b.generate(ids, max_new_tokens=8, do_sample=False)
            route_b = [hop.peer for hop in session.route]
        with model_a.inference_session(max_length=24) as session:
            model_a.generate(ids, max_new_tokens=2, do_sample=False)
            route_a = [hop.peer for hop in session.route]
    assert got.tolist() == ref_b.generate(ids, max_new_tokens=8, do_sample=False).tolist()
    peer_b = server_b.ready["peer"]
    assert model_b.loop.run(model_b.swarm.info(peer_b))["resident_fraction"] == pytest.approx(0.5, abs=0.2)
    assert route_b == [peer_b]
    assert peer_b not in route_a
    assert set(model_a.loop.run(model_a.swarm.refresh(force=True))).isdisjoint({peer_b})
    assert set(model_b.loop.run(model_b.swarm.refresh(force=True))) == {peer_b}
