"""Speculative decoding through real swarms: greedy output equals plain greedy decoding, token for token,
for every family and whatever the drafter proposes — always right (long accepted paths), always wrong,
random trees, prompt lookup — including left-padded batches whose rows accept different numbers of
tokens, and sessions whose servers push to each other."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from bloombee_core import hookimpl, load_plugins
from bloombee_core.client import AutoDistributedModelForCausalLM
from bloombee_core.drafting import Drafter, DraftTree
from bloombee_core.swarm import wire

from .conftest import FAMILY_CONFIGS
from .test_swarm_generation import left_padded

NEW_TOKENS = 14


class ReferenceDrafter(Drafter):
    """Drafts from known continuations: the right ones (``right``), or each token off by one."""

    name = "test-reference"
    continuations: list[list[int]] = []  # full reference sequences (prompt without padding + output)
    right = True

    def propose(self, sequences, max_nodes, max_depth):
        trees = []
        for committed in sequences:
            reference = next((r for r in self.continuations if r[: len(committed)] == list(committed)), None)
            if reference is None:
                trees.append(DraftTree())
                continue
            ahead = reference[len(committed) : len(committed) + min(max_depth, max_nodes - 1)]
            tokens = [t if self.right else (t + 1) % 128 for t in ahead]
            parents = list(range(-1, len(tokens) - 1))
            if tokens and len(tokens) < max_nodes:  # a wrong sibling at depth 1 as well
                tokens.append((ahead[0] + 7) % 128)
                parents.append(-1)
            trees.append(DraftTree(tokens, parents))
        return trees


class WrongDrafter(ReferenceDrafter):
    name = "test-wrong"
    right = False


class RandomDrafter(Drafter):
    name = "test-random"

    def propose(self, sequences, max_nodes, max_depth):
        rng = random.Random(len(sequences[0]))
        trees = []
        for _ in sequences:
            tokens, parents, depths = [], [], []
            for _ in range(rng.randint(0, max_nodes)):
                parent = rng.choice([-1, *[i for i, d in enumerate(depths) if d < max_depth]])
                tokens.append(rng.randrange(128))
                parents.append(parent)
                depths.append(1 if parent < 0 else depths[parent] + 1)
            trees.append(DraftTree(tokens, parents))
        return trees


class DrafterPlugins:
    @hookimpl
    def bloombee_register_drafters(self):
        return [ReferenceDrafter, WrongDrafter, RandomDrafter]


def speculative(plugins, drafter, **options):
    return plugins.create("decoding_strategies", {"name": "speculative", "drafter": drafter, **options})


@pytest.fixture(scope="module")
def drafting_models(swarm):
    """Distributed models whose plugins include the test drafters, by folder."""
    plugins = load_plugins(extra=[DrafterPlugins()])
    models = {}

    def get(folder):
        if folder not in models:
            models[folder] = AutoDistributedModelForCausalLM.from_pretrained(
                folder, swarm.peers, plugins=plugins
            )
        return models[folder]

    yield get
    for model in models.values():
        model.close()


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_speculative_greedy_equals_plain_greedy(family, tiny_models, family_servers, drafting_models):
    family_servers[family]
    folder = tiny_models[family]
    model = drafting_models(folder)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # a prompt that repeats itself, so prompt lookup has something to find
    ids = torch.tensor([[5, 17, 33, 2, 5, 17, 33, 2, 5, 17]])
    ids2, mask2 = left_padded([9, 4])
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        plain2 = model.generate(
            ids2, attention_mask=mask2, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
        assert plain.tolist() == ref.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()
    real2 = [
        [t for t, m in zip(r, k, strict=True) if m] + list(o[ids2.shape[1] :])
        for r, k, o in zip(ids2.tolist(), mask2.tolist(), plain2.tolist(), strict=True)
    ]
    ReferenceDrafter.continuations = [plain[0].tolist(), *real2]
    for drafter in ("test-reference", "test-wrong", "test-random", "prompt-lookup"):
        strategy = speculative(model.plugins, drafter, max_nodes=6, max_depth=4, adaptive=False)
        with torch.no_grad():
            got = strategy.generate(model, ids, max_new_tokens=NEW_TOKENS)
            assert got.tolist() == plain.tolist(), drafter
            got2 = strategy.generate(
                model, ids2, attention_mask=mask2, max_new_tokens=NEW_TOKENS, pad_token_id=0
            )
            assert got2.tolist() == plain2.tolist(), drafter
    stats = speculative(model.plugins, "test-reference", max_nodes=6, max_depth=4, adaptive=False)
    with torch.no_grad():
        stats.generate(model, ids, max_new_tokens=NEW_TOKENS)
    # a drafter that is always right is accepted to the full depth: ~5 tokens per round
    assert stats.last_stats["tokens_per_round"] > 3, stats.last_stats
    assert stats.last_stats["acceptance_by_depth"][0] == 1.0


def test_adaptive_speculation_falls_back_to_plain_steps_when_drafts_fail(
    tiny_models, family_servers, drafting_models
):
    family_servers["llama"]
    model = drafting_models(tiny_models["llama"])
    ids = torch.tensor([[3, 8, 13, 21, 34, 55]])
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=80, do_sample=False)
        ReferenceDrafter.continuations = [plain[0].tolist()]
        wrong = speculative(model.plugins, "test-wrong", max_nodes=8, max_depth=4)  # adaptive by default
        assert wrong.generate(model, ids, max_new_tokens=80).tolist() == plain.tolist()
    stats = wrong.last_stats
    # Acceptance 0: once the estimate of depth 1 is low enough no tree can pay even if extra tokens cost
    # nothing (about a dozen rounds here, whatever the timings), then only probes draft.
    assert stats["plain_rounds"] >= stats["rounds"] * 0.5, stats["planned_depths"]
    assert stats["acceptance_by_depth"][0] == 0.0


def test_speculative_sampling_and_the_generate_keyword(tiny_models, family_servers, drafting_models):
    family_servers["llama"]
    model = drafting_models(tiny_models["llama"])
    ids = torch.tensor([[7, 7, 9, 7, 7, 9, 7]])
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=12, do_sample=False)
        # the Python API: generate(decoding=...) runs the strategy
        got = model.generate(
            ids, max_new_tokens=12, decoding={"name": "speculative", "drafter": "test-random"}
        )
        assert got.tolist() == plain.tolist()
        # sampling restricted to the most likely token is greedy decoding: the sampling path is exact too
        top1 = speculative(model.plugins, "test-random", do_sample=True, top_k=1, seed=1)
        assert top1.generate(model, ids, max_new_tokens=12).tolist() == plain.tolist()
        # a seed makes sampling repeatable
        sampled = [
            speculative(model.plugins, "test-random", do_sample=True, seed=5).generate(
                model, ids, max_new_tokens=12
            )
            for _ in range(2)
        ]
    assert sampled[0].tolist() == sampled[1].tolist()


async def _session_replies(transport, peer, trees, steps):
    """Open a session on ``peer`` (blocks 0:1) and send ``steps``; the replies, up to the first error."""
    stream = await transport.connect(peer, wire.PROTOCOL)
    try:
        header = {
            "type": "open",
            "session_id": "t" * 16,
            "start": 0,
            "end": 1,
            "batch_size": 1,
            "max_length": 64,
        }
        await wire.send(stream, {**header, "push": None, "trees": trees})
        for number, tensors in enumerate(steps):
            await wire.send(stream, {"type": "step", "step": number}, tensors)
        replies = []
        for _ in range(len(steps) + 1):
            message = await asyncio.wait_for(wire.read_header(stream), 20)
            if message is None:
                break
            replies.append(message[0])
            await wire.read_tensors(stream, message[1], wire.compressor_table(), 1 << 24)
            if not message[0].get("ok"):
                break
        return replies
    finally:
        stream.close()


def _step(tokens, tree=None, keep=None, past=0):
    tensors = {"hidden": torch.zeros(1, tokens, 64), "position_ids": torch.arange(past, past + tokens)[None]}
    if tree is not None:
        tensors["tree"] = torch.tensor([tree])
    if keep is not None:
        tensors["keep"] = torch.tensor([keep])
    return tensors


BAD_TREES = {
    "a tree in a plain session": (False, [_step(2, tree=[-1, 0])], "not opened for token trees"),
    "a parent after its child": (True, [_step(2, tree=[-1, 1])], "a parent before it"),
    "a tree of the wrong shape": (True, [_step(2, tree=[-1, 0, 1])], "tree must be int64 [1, 2]"),
    "a tree over the limit": (True, [_step(300, tree=[-1] * 300)], "at most 256 tokens"),
    "keeping rows the last step did not have": (
        True,
        [_step(2, tree=[-1, 0]), _step(1, keep=[0, 5], past=2)],
        "keep must pick, per sequence, rows of the previous step's 2 tokens",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TREES))
def test_bad_trees_are_refused_and_the_server_keeps_serving(case, tiny_models, family_servers, raw_client):
    loop, transport = raw_client
    peer = next(c.ready["peer"] for c in family_servers["llama"] if c.ready["start"] == 0)
    trees, steps, expected = BAD_TREES[case]
    replies = loop.run(_session_replies(transport, peer, trees, steps))
    assert replies[-1]["ok"] is False and expected in replies[-1]["error"], replies[-1]
    good = loop.run(
        _session_replies(transport, peer, True, [_step(3, tree=[-1, 0, 0]), _step(1, keep=[0, 2], past=2)])
    )
    assert [r["ok"] for r in good] == [True, True, True]  # the open, then both steps


class KillDuring:
    """A streamer that SIGKILLs the live route's server of ``blocks`` after ``after`` new tokens."""

    def __init__(self, swarm, servers, model, blocks, after):
        self.swarm, self.servers, self.model, self.blocks, self.after = swarm, servers, model, blocks, after
        self.calls, self.killed = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == self.after + 1:  # the first put is the prompt
            victim = next(h.peer for h in self.model._session.route if (h.start, h.end) == self.blocks)
            self.swarm.kill9(next(c for c in self.servers if c.ready["peer"] == victim))
            self.killed = victim

    def end(self):
        pass


def test_speculative_generation_survives_a_server_killed_mid_generation(
    swarm, tiny_models, family_servers, drafting_models
):
    """The replacement server is rebuilt by replaying the session's steps (trees and kept rows
    included), and the output does not change. Runs last: it kills a server (a spare one starts first)."""
    folder = tiny_models["llama"]
    spare = swarm.serve(folder, "1:3")
    spare.wait_ready()
    model = drafting_models(folder)
    ids = torch.tensor([[5, 17, 33, 2, 5, 17, 33, 2, 5]])
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=20, do_sample=False)
        ReferenceDrafter.continuations = [plain[0].tolist()]
        servers = [*family_servers["llama"], spare]
        killer = KillDuring(swarm, servers, model, (1, 3), after=6)
        strategy = speculative(model.plugins, "test-reference", max_nodes=4, max_depth=3, adaptive=False)
        got = strategy.generate(model, ids, max_new_tokens=20, streamer=killer)
    assert killer.killed is not None
    assert got.tolist() == plain.tolist()
