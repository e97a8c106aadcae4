"""A busy server (no room for another session) is waited for, not banned; when it stays full the client
says the swarm is busy instead of "no route"."""

from __future__ import annotations

import threading

import pytest
import torch
from family_helpers import FAMILY_CONFIGS
from transformers import AutoModelForCausalLM

from bloombee_core.client import AutoDistributedModelForCausalLM
from bloombee_core.client.retry import SwarmBusyError

# a 32-token session of this tiny llama reserves 4 layers x 2 x 2 heads x 16 x 4 bytes x 32 = 32 KiB
ROOM_FOR_ONE = "40000"


@pytest.fixture(scope="module")
def own_llama(tmp_path_factory):
    """A tiny llama of its own (its own weights, so its own model key: no other test's servers join)."""
    torch.manual_seed(11)
    folder = tmp_path_factory.mktemp("busy-llama")
    AutoModelForCausalLM.from_config(FAMILY_CONFIGS["llama"](), dtype=torch.float32).save_pretrained(folder)
    return folder


def test_a_full_server_is_waited_for_then_the_swarm_is_said_to_be_busy(swarm, own_llama, caplog):
    caplog.set_level("WARNING", logger="bloombee_core.client.swarm_client")
    server = swarm.serve(own_llama, "0:4", "--cache-bytes", ROOM_FOR_ONE)
    server.wait_ready()
    holder = AutoDistributedModelForCausalLM.from_pretrained(own_llama, swarm.peers)
    waiter = AutoDistributedModelForCausalLM.from_pretrained(own_llama, swarm.peers)
    ref = AutoModelForCausalLM.from_pretrained(own_llama, dtype=torch.float32).eval()
    ids = torch.randint(1, 128, (1, 8), generator=torch.Generator().manual_seed(5))
    opened, release = threading.Event(), threading.Event()

    def hold() -> None:
        with torch.no_grad(), holder.inference_session(max_length=32) as session:
            session.step_tokens(ids, torch.arange(8)[None])  # the session is open on the server now
            opened.set()
            release.wait(60)

    try:
        first = threading.Thread(target=hold)
        first.start()
        assert opened.wait(60)
        threading.Timer(2.0, release.set).start()  # the holder lets go while the waiter waits
        with torch.no_grad():
            got = waiter.generate(ids, max_new_tokens=24, do_sample=False)
            want = ref.generate(ids, max_new_tokens=24, do_sample=False)
        first.join(60)
        assert got.tolist() == want.tolist()
        peer = server.ready["peer"]
        assert any(f"server {peer} is busy" in r.getMessage() for r in caplog.records)  # it did wait
        assert peer not in waiter.swarm.bans._strikes  # refused as busy, never banned as failing

        release.clear()
        opened.clear()
        second = threading.Thread(target=hold)
        second.start()
        assert opened.wait(60)
        impatient = AutoDistributedModelForCausalLM.from_pretrained(own_llama, swarm.peers, max_retries=1)
        try:
            with pytest.raises(SwarmBusyError, match="the swarm is busy") as caught, torch.no_grad():
                impatient.generate(ids, max_new_tokens=24, do_sample=False)
            assert "busy: a session" in str(caught.value)  # the server's own reason comes with it
        finally:
            impatient.close()
            release.set()
            second.join(60)
    finally:
        release.set()
        holder.close()
        waiter.close()
        server.stop()
