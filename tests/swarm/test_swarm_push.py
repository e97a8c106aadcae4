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
