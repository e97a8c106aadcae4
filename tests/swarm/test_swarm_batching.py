"""Concurrent clients through the same servers: their steps are computed in shared forwards, and every
client's greedy tokens still equal local transformers, for every family (fp32).

Each client has its own model and session and a prompt of its own length (one a left-padded batch), so
the sessions sharing a forward have different past lengths, batch sizes and masks. The servers' info
reports how many steps ran in batched forwards: the test fails if none did.
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from bloombee_core.client import AutoDistributedModelForCausalLM

from .conftest import FAMILY_CONFIGS

NEW_TOKENS = 8


def prompts(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, mask) per client: single rows of 3, 6 and 9 tokens, and a left-padded batch of two."""
    gen = torch.Generator().manual_seed(5)
    out = []
    for n in (3, 6, 9):
        ids = torch.randint(1, vocab, (1, n), generator=gen)
        out.append((ids, torch.ones_like(ids)))
    ids = torch.randint(1, vocab, (2, 5), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    out.append((ids, mask))
    return out


def generate_concurrently(models, inputs, new_tokens: int = NEW_TOKENS) -> list[torch.Tensor]:
    """Every client generates at once (threads started together); each one's tokens."""
    results: list[torch.Tensor | BaseException | None] = [None] * len(models)
    start = threading.Barrier(len(models))

    def client(i: int) -> None:
        ids, mask = inputs[i]
        try:
            start.wait(30)
            with torch.no_grad():
                results[i] = models[i].generate(
                    ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
                )
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(models))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


def batched_steps(model, peers: list[str]) -> int:
    return sum(model.loop.run(model.swarm.info(peer))["batching"]["batched_steps"] for peer in peers)


def check_concurrent_clients(swarm, folder, peers: list[str], inputs, new_tokens: int = NEW_TOKENS) -> None:
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    models = [AutoDistributedModelForCausalLM.from_pretrained(folder, swarm.peers) for _ in inputs]
    try:
        before = batched_steps(models[0], peers)
        got = generate_concurrently(models, inputs, new_tokens)
        after = batched_steps(models[0], peers)
    finally:
        for model in models:
            model.close()
    for (ids, mask), tokens in zip(inputs, got, strict=True):
        with torch.no_grad():
            want = ref.generate(
                ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            )
        assert tokens.tolist() == want.tolist()
    assert after > before, "no step was computed in a batched forward: the clients were served one by one"


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_concurrent_clients_match_transformers(family, swarm, tiny_models, family_servers):
    peers = [child.wait_ready()["peer"] for child in family_servers[family]]
    check_concurrent_clients(swarm, tiny_models[family], peers, prompts(128))


def test_concurrent_smollm2_clients_match_transformers(swarm, smollm2, smollm2_servers):
    peers = [child.wait_ready()["peer"] for child in smollm2_servers]
    # The clients' own work (a 49k-token LM head each, three threads sharing two cores) spreads their
    # steps apart; more decode steps than the other tests make it all but certain that some of them meet at a server (one CI
    # run with 8 saw none meet).
    check_concurrent_clients(swarm, smollm2, peers, prompts(4000)[:3], new_tokens=14)
