"""Drafters: the tree format, prompt lookup, and the local-model drafters against transformers' own greedy.

Tiny random models are saved to temporary folders; the target is a stand-in with the three attributes
a drafter may use (``config``, ``folder``, ``dtype``).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from bloombee_drafting import BUILTIN_DRAFTERS
from family_helpers import TINY, save_tiny
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from bloombee_core import ConfigError, load_plugins
from bloombee_core.drafting import DraftTree
from bloombee_core.model import load_config

NO_EOS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # greedy runs never stop early
CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**{**TINY, **NO_EOS, **kw}),
    # layers from 2 on see a 4-token window: their cache cannot always be cropped back
    "qwen3_sliding": lambda **kw: Qwen3Config(
        **{**TINY, **NO_EOS, "head_dim": 16, "use_sliding_window": True, "sliding_window": 4, **kw},
        max_window_layers=2,
    ),
}


def drafter(choice: str | dict):
    plugins = load_plugins(extra=[__import__("bloombee_drafting")], entry_points=False)
    return plugins.create("drafters", choice)


def stand_in_target(folder: Path, dtype: torch.dtype = torch.float32) -> SimpleNamespace:
    return SimpleNamespace(config=load_config(folder), folder=folder, dtype=dtype)


def assert_valid(tree: DraftTree, max_nodes: int, max_depth: int) -> None:
    DraftTree(tree.tokens, tree.parents)  # parents come before their children
    assert len(tree) <= max_nodes
    assert max(tree.depths(), default=0) <= max_depth
    edges = list(zip(tree.parents, tree.tokens, strict=True))
    assert len(set(edges)) == len(edges), f"two siblings carry the same token: {tree}"


def path_to(tree: DraftTree, node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(tree.tokens[node])
        node = tree.parents[node]
    return path[::-1]


@torch.no_grad()
def greedy(model, prefix: list[int], steps: int) -> list[int]:
    out = model.generate(torch.tensor([prefix]), do_sample=False, max_new_tokens=steps)
    return out[0, len(prefix) :].tolist()


# --- the tree format ---------------------------------------------------------------------------------


def test_draft_tree_needs_one_earlier_parent_per_token() -> None:
    assert DraftTree([5, 6, 7], [-1, -1, 0]).depths() == [1, 1, 2]
    assert len(DraftTree()) == 0
    with pytest.raises(ValueError, match="one parent per token"):
        DraftTree([5, 6], [-1])
    with pytest.raises(ValueError, match="node 1 .* parent 1"):
        DraftTree([5, 6], [-1, 1])
    with pytest.raises(ValueError, match="node 0 .* parent -2"):
        DraftTree([5], [-2])


def test_every_builtin_drafter_is_registered() -> None:
    assert {cls.name for cls in BUILTIN_DRAFTERS} <= set(load_plugins().classes("drafters"))


# --- prompt lookup -----------------------------------------------------------------------------------


def test_prompt_lookup_drafts_what_followed_the_repeated_ngram() -> None:
    (tree,) = drafter("prompt-lookup").propose([[5, 6, 7, 8, 9, 1, 2, 5, 6, 7]], max_nodes=8, max_depth=4)
    assert (tree.tokens, tree.parents) == ([8, 9, 1, 2], [-1, 0, 1, 2])


def test_prompt_lookup_merges_matches_into_a_trie_most_recent_first() -> None:
    # "7" was followed by 2 3 4 ..., later by 2 5 9 ...: both share the node "2"
    (tree,) = drafter("prompt-lookup").propose([[1, 7, 2, 3, 4, 7, 2, 5, 9, 7]], max_nodes=16, max_depth=4)
    assert_valid(tree, 16, 4)
    assert (tree.tokens, tree.parents) == ([2, 5, 9, 7, 3, 4, 7], [-1, 0, 1, 2, 0, 4, 5])
    (one,) = drafter({"name": "prompt-lookup", "max_candidates": 1}).propose(
        [[1, 7, 2, 3, 4, 7, 2, 5, 9, 7]], max_nodes=16, max_depth=4
    )
    assert one.tokens == [2, 5, 9, 7]


def test_prompt_lookup_tries_longer_ngrams_first() -> None:
    # the 2-gram "3 4" matches only the oldest occurrence; the 1-gram "4" also matches a newer one
    (tree,) = drafter("prompt-lookup").propose([[3, 4, 8, 9, 4, 6, 2, 3, 4]], max_nodes=16, max_depth=3)
    assert path_to(tree, 2) == [8, 9, 4]
    assert path_to(tree, 5) == [6, 2, 3]


def test_prompt_lookup_respects_the_budget_and_finds_nothing_without_a_match() -> None:
    sequence = [1, 7, 2, 3, 4, 7, 2, 5, 9, 7]
    for max_nodes, max_depth in [(3, 4), (5, 2), (1, 1), (0, 4), (4, 0)]:
        (tree,) = drafter("prompt-lookup").propose([sequence], max_nodes, max_depth)
        assert_valid(tree, max_nodes, max_depth)
        assert len(tree) == min(max_nodes, 2 * max_depth - (max_depth > 0))  # both branches share node 1
    assert [len(t) for t in drafter("prompt-lookup").propose([[1, 2, 3, 4], [9]], 8, 4)] == [0, 0]


def test_prompt_lookup_rejects_an_empty_ngram_range() -> None:
    with pytest.raises(ConfigError, match="min_ngram"):
        drafter({"name": "prompt-lookup", "min_ngram": 4, "max_ngram": 2})


# --- draft model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny_pair(request, tmp_path_factory) -> tuple[Path, Path]:
    """A target and a smaller draft model of one family, sharing a vocabulary."""
    make = CONFIGS[request.param]
    target = save_tiny(make(), tmp_path_factory.mktemp("target"), seed=0)
    draft = save_tiny(make(num_hidden_layers=3), tmp_path_factory.mktemp("draft"), seed=1)
    return target, draft


def test_draft_model_chain_is_its_own_greedy_continuation_across_rounds(tiny_pair) -> None:
    target, draft = tiny_pair
    reference = AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float32).eval()
    drafting = drafter({"name": "draft-model", "path": str(draft), "branch": 0})
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (4, 9)]
    drafting.begin(stand_in_target(target), batch_size=2)
    fed: list[int] = []
    drafting.model.register_forward_pre_hook(
        lambda _, args, kwargs: fed.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    # each round fed only what the cache lacks: the prompt (then the target's token, and the last drafted
    # token when all were accepted) plus the four chain tokens whose successors were drafted
    want_fed = [4 + 4 + 9 + 4]
    # accepted tokens of the last chain per round (then one token of the target's own): the committed
    # sequences grow by different amounts, and a rejected chain leaves the cache to crop
    for accepted in [(2, 0), (5, 3), (0, 5), (1, 1)]:
        fed.clear()
        trees = drafting.propose(rows, max_nodes=5, max_depth=5)
        assert sum(fed) == want_fed[-1]
        want_fed.append(sum(1 + (a == 5) + 4 for a in accepted))
        for row, tree in zip(rows, trees, strict=True):
            assert_valid(tree, 5, 5)
            assert tree.parents == [-1, 0, 1, 2, 3]
            assert tree.tokens == greedy(reference, row, 5)
        for b, (row, tree) in enumerate(zip(rows, trees, strict=True)):
            other = (tree.tokens[accepted[b]] + 1) % 128 if accepted[b] < 5 else 17
            row.extend([*tree.tokens[: accepted[b]], other])
    drafting.end()


def test_draft_model_adds_the_next_likely_tokens_as_leaf_siblings(tiny_pair) -> None:
    target, draft = tiny_pair
    reference = AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float32).eval()
    drafting = drafter({"name": "draft-model", "path": str(draft), "branch": 2})
    prefix = [5, 9, 11, 40, 7]
    drafting.begin(stand_in_target(target), batch_size=1)
    (tree,) = drafting.propose([prefix], max_nodes=12, max_depth=3)
    assert_valid(tree, 12, 3)
    chain = greedy(reference, prefix, 3)
    assert tree.parents == [-1, -1, -1, 0, 0, 0, 3, 3, 3]
    assert tree.tokens[::3] == chain
    with torch.no_grad():
        for depth in range(3):
            logits = reference(torch.tensor([prefix + chain[:depth]])).logits[0, -1]
            assert tree.tokens[3 * depth : 3 * depth + 3] == logits.topk(3).indices.tolist()
    # the chain comes first; siblings get what budget is left, shallow ones first
    (small,) = drafting.propose([prefix], max_nodes=4, max_depth=3)
    assert (small.tokens, small.parents) == ([chain[0], tree.tokens[1], chain[1], chain[2]], [-1, -1, 0, 2])
    (tiny,) = drafting.propose([prefix], max_nodes=2, max_depth=3)
    assert (tiny.tokens, tiny.parents) == (chain[:2], [-1, 0])
    drafting.end()


def test_draft_model_with_another_vocabulary_is_refused(tmp_path) -> None:
    target = save_tiny(CONFIGS["llama"](), tmp_path / "target")
    draft = save_tiny(CONFIGS["llama"](vocab_size=96), tmp_path / "draft")
    drafting = drafter({"name": "draft-model", "path": str(draft)})
    with pytest.raises(ValueError, match="vocabulary of 96 tokens, the target 128"):
        drafting.begin(stand_in_target(target), batch_size=1)


def test_draft_model_runs_in_the_targets_dtype_unless_told(tiny_pair) -> None:
    target, draft = tiny_pair
    drafting = drafter({"name": "draft-model", "path": str(draft)})
    drafting.begin(stand_in_target(target, torch.bfloat16), batch_size=1)
    assert drafting.model.dtype == torch.bfloat16
    drafting = drafter({"name": "draft-model", "path": str(draft), "dtype": "float32"})
    drafting.begin(stand_in_target(target, torch.bfloat16), batch_size=1)
    assert drafting.model.dtype == torch.float32


# --- early exit ----------------------------------------------------------------------------------------


def test_early_exit_with_every_block_drafts_the_targets_own_greedy(tiny_pair) -> None:
    target, _ = tiny_pair
    reference = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    drafting = drafter({"name": "early-exit", "blocks": TINY["num_hidden_layers"], "branch": 0})
    rows = [[5, 9, 11, 40, 7], [3, 3, 8]]
    drafting.begin(stand_in_target(target), batch_size=2)
    for _ in range(2):
        trees = drafting.propose(rows, max_nodes=6, max_depth=6)
        for row, tree in zip(rows, trees, strict=True):
            assert tree.tokens == greedy(reference, row, 6)
            row.extend(tree.tokens[:3])


def test_early_exit_carries_the_targets_first_blocks(tiny_pair) -> None:
    target, _ = tiny_pair
    by_hand = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    by_hand.model.layers = by_hand.model.layers[:2]  # the full model, cut after two blocks
    by_hand.config.num_hidden_layers = 2
    if getattr(by_hand.config, "layer_types", None):
        by_hand.config.layer_types = by_hand.config.layer_types[:2]
    drafting = drafter({"name": "early-exit", "blocks": 2})
    drafting.begin(stand_in_target(target), batch_size=1)
    ids = torch.tensor([[5, 9, 11, 40, 7, 3, 8]])
    with torch.no_grad():
        assert torch.equal(drafting.model(ids).logits, by_hand(ids).logits)


def test_a_drafter_kept_between_generations_loads_its_model_once(tiny_pair) -> None:
    target, _ = tiny_pair
    drafting = drafter({"name": "early-exit", "blocks": 2})
    drafting.begin(stand_in_target(target), batch_size=1)
    first = drafting.model
    drafting.end()
    assert drafting.model is None  # nothing to draft with between generations
    drafting.begin(stand_in_target(target), batch_size=2)
    assert drafting.model is first  # the same weights, not loaded again
    drafting.begin(stand_in_target(target, torch.bfloat16), batch_size=1)
    assert drafting.model is not first and next(drafting.model.parameters()).dtype == torch.bfloat16


def test_early_exit_defaults_to_a_quarter_of_the_blocks_and_refuses_too_many(tiny_pair) -> None:
    target, _ = tiny_pair
    drafting = drafter("early-exit")
    drafting.begin(stand_in_target(target), batch_size=1)
    assert drafting.model.config.num_hidden_layers == 1  # 5 // 4
    with pytest.raises(ValueError, match="blocks = 6, but the target .* has 5 blocks; choose 1 to 5"):
        drafter({"name": "early-exit", "blocks": 6}).begin(stand_in_target(target), batch_size=1)
