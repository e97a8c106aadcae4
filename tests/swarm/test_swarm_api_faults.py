"""The API in front of a swarm that is missing blocks, then loses a server mid-request: a 503 naming the
blocks, a stream that survives through fault tolerance, and one that fails cleanly when nothing is left."""

from __future__ import annotations

import time

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bloombee_core.stack import Child

from .test_swarm_api import sessions_on

PROMPT = "The swarm"


@pytest.mark.slow
def test_missing_blocks_then_a_server_dying_mid_stream(swarm, tiny_with_tokenizer, raw_client):
    first = swarm.serve(tiny_with_tokenizer, "0:1")
    first.wait_ready()
    api = Child(
        "api-tiny",
        [
            "bloombee_core.cli",
            "api",
            str(tiny_with_tokenizer),
            "--initial-peers",
            *swarm.peers,
            "--port",
            "0",
        ],
        swarm.log_dir,
    )
    replicas: list[Child] = []
    try:
        url = api.wait_ready()["url"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        name = client.models.list().data[0].id

        def complete(**kwargs):
            return client.completions.create(model=name, prompt=PROMPT, temperature=0, **kwargs)

        with pytest.raises(openai.InternalServerError) as caught:
            complete(max_tokens=4)
        assert caught.value.status_code == 503 and caught.value.code == "blocks_missing"
        assert "no server holds blocks 1:3 (of 0:3)" in caught.value.message

        replicas = [swarm.serve(tiny_with_tokenizer, "1:3") for _ in range(2)]
        peers = [r.wait_ready()["peer"] for r in replicas]
        deadline = time.monotonic() + 60
        while True:  # until the API's view of the DHT has them
            try:
                complete(max_tokens=2)
                break
            except openai.InternalServerError:
                assert time.monotonic() < deadline, "the API never saw the new servers"
                time.sleep(1.0)

        tokenizer = AutoTokenizer.from_pretrained(tiny_with_tokenizer)
        ref = AutoModelForCausalLM.from_pretrained(tiny_with_tokenizer, dtype=torch.float32).eval()
        ids = tokenizer(PROMPT, return_tensors="pt")
        with torch.no_grad():
            out = ref.generate(**ids, max_new_tokens=200, do_sample=False)
        want = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

        parts, killed = [], None
        for chunk in complete(max_tokens=200, stream=True):
            parts.append(chunk.choices[0].text if chunk.choices else "")
            if killed is None and len(parts) == 3:
                busy = [i for i, n in enumerate(sessions_on(raw_client, peers)) if n]
                assert busy, "no replica holds the request's session"
                killed = busy[0]
                swarm.kill9(replicas[killed])  # mid-stream: the client side of the API replays on the other
        assert "".join(parts) == want
        assert f"server {peers[killed]} failed" in api.log.read_text()  # it was re-routed, not finished

        survivor = replicas[1 - killed]
        stream = complete(max_tokens=200, stream=True)
        with pytest.raises(openai.APIError) as failed:
            for count, _ in enumerate(stream):
                if count == 3:
                    swarm.kill9(survivor)  # nothing left serves blocks 1:3: the stream ends with an error
        assert failed.value.message
        assert client.models.list().data[0].id == name  # the API itself is still up
    finally:
        api.stop()
        for child in [first, *replicas]:
            child.stop()
