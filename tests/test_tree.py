"""Token trees on a span, for every family's attention: each node's logits equal transformers' on the
sequence prefix + its own path, and after keeping each row's accepted path the cache continues exactly
like a cache that only ever saw that path.

Rotary (LLaMA, Qwen3, Mixtral, Falcon), ALiBi (BLOOM, Falcon), sliding windows (Mistral, Gemma 2/4, smaller
than the sequences here), soft-capping and eager attention (Gemma 2), per-layer inputs and KV sharing
(Gemma 4). Rows of a batch carry different trees, a left-padded prompt, and keep paths of different
lengths (the shorter one padded with a dropped row, masked out afterwards).
"""

from __future__ import annotations

import pytest
import torch
from family_helpers import FAMILY_CONFIGS, SMALL, TINY, client_and_two_spans, load_reference, save_tiny
from transformers import (
    FalconConfig,
    Gemma2Config,
    MistralConfig,
)

from bloombee_core.model.tree import tree_attention

# every family's tiny model, and attention variants besides: a Mistral sliding window, Falcon's ALiBi,
# Gemma 2's attention soft-capping (eager attention)
CONFIGS = {
    **FAMILY_CONFIGS,
    "mistral-sliding": lambda: MistralConfig(**TINY, sliding_window=4),
    "falcon-alibi": lambda: FalconConfig(
        **SMALL, num_hidden_layers=3, alibi=True, new_decoder_architecture=False, multi_query=True
    ),
    "gemma2-softcap": lambda: Gemma2Config(
        **TINY, head_dim=16, sliding_window=4, final_logit_softcapping=30.0, attn_logit_softcapping=50.0
    ),
}
ATOL = 1e-4  # fp32; a tree computes each node in a differently shaped batch than the reference
# two rows: row 1 has two left pads; different trees (index 0 is the root, -1 its parent)
PROMPTS = [[5, 9, 17, 3, 44, 8], [0, 0, 61, 2, 90, 7]]
PROMPT_MASK = [[1] * 6, [0, 0, 1, 1, 1, 1]]
TREE = [[-1, 0, 0, 1, 1, 3, 5], [-1, 0, 1, 0, 3, 3, 2]]
TREE_TOKENS = [[11, 23, 31, 42, 57, 64, 70], [13, 29, 36, 41, 58, 62, 77]]
KEEP = [[0, 1, 3, 5], [0, 3, 4, 6]]  # row 1 accepted root, 3, 4; row 6 is padding it drops
KEPT = [4, 3]
NEXT = [[99], [88]]


def path(parents: list[int], node: int) -> list[int]:
    out = []
    while node >= 0:
        out.append(node)
        node = parents[node]
    return out[::-1]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def split(request, tmp_path_factory):
    folder = save_tiny(CONFIGS[request.param](), tmp_path_factory.mktemp(request.param))
    client, spans = client_and_two_spans(folder)
    return client, spans, load_reference(folder)


def run(client, spans, caches, tokens, positions, mask, tree=None):
    hidden = client.embed(tokens)
    per_layer = client.per_layer_inputs(tokens, hidden)
    for span, cache in zip(spans, caches, strict=True):
        hidden = span(
            hidden,
            position_ids=positions,
            attention_mask=mask,
            cache=cache,
            per_layer_inputs={k: v[:, :, span.start : span.end] for k, v in per_layer.items()},
            tree=tree,
        )
    return client.logits(hidden)


def reference_last(ref, tokens: list[int]) -> torch.Tensor:
    return ref(input_ids=torch.tensor([tokens])).logits[0, -1]


@torch.no_grad()
def test_tree_nodes_and_kept_paths_match_transformers(split):
    client, spans, ref = split
    caches = [span.new_cache(2, 32, trees=True) for span in spans]
    prompt, prompt_mask = torch.tensor(PROMPTS), torch.tensor(PROMPT_MASK)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    logits = run(client, spans, caches, prompt, positions, prompt_mask)
    real = [
        [t for t, m in zip(row, mask, strict=True) if m]
        for row, mask in zip(PROMPTS, PROMPT_MASK, strict=True)
    ]
    for b in range(2):
        torch.testing.assert_close(logits[b, -1], reference_last(ref, real[b]), atol=ATOL, rtol=0)

    # one tree step per row: each node's logits are the reference's on prefix + its path
    tree, tokens = torch.tensor(TREE), torch.tensor(TREE_TOKENS)
    depth = torch.tensor([[len(path(parents, i)) - 1 for i in range(len(parents))] for parents in TREE])
    lengths = prompt_mask.sum(-1, keepdim=True)
    mask = torch.cat([prompt_mask, torch.ones_like(tokens)], dim=1)
    logits = run(client, spans, caches, tokens, lengths + depth, mask, tree)
    for b in range(2):
        for node in range(len(TREE[b])):
            sequence = real[b] + [TREE_TOKENS[b][i] for i in path(TREE[b], node)]
            torch.testing.assert_close(logits[b, node], reference_last(ref, sequence), atol=ATOL, rtol=0)

    # keep each row's accepted path (row 1 one shorter, padded), then a plain step continues from it
    for cache in caches:
        cache.keep(torch.tensor(KEEP), last=len(TREE[0]))
    kept_mask = torch.tensor([[1] * KEPT[0], [1] * KEPT[1] + [0] * (len(KEEP[0]) - KEPT[1])])
    mask = torch.cat([prompt_mask, kept_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    positions = lengths + torch.tensor([[KEPT[0]], [KEPT[1]]])
    logits = run(client, spans, caches, torch.tensor(NEXT), positions, mask)
    for b in range(2):
        accepted = [TREE_TOKENS[b][i] for i in KEEP[b][: KEPT[b]]]
        sequence = real[b] + accepted + NEXT[b]
        torch.testing.assert_close(logits[b, -1], reference_last(ref, sequence), atol=ATOL, rtol=0)
    assert all(cache.length == len(PROMPTS[0]) + len(KEEP[0]) + 1 for cache in caches)


def test_tree_visibility_is_ancestry_padding_and_self():
    attention = tree_attention(
        torch.tensor([[2, 3, 3, 4]]),
        torch.tensor([[0, 1, 1, 1, 1, 1, 1]]),
        torch.tensor([[-1, 0, 0, 1]]),
        past=3,
    )
    assert attention.visible[0].int().tolist() == [
        [0, 1, 1, 1, 0, 0, 0],  # the root: the prefix (minus its pad) and itself
        [0, 1, 1, 1, 1, 0, 0],  # a child of the root
        [0, 1, 1, 1, 0, 1, 0],  # its sibling: not the first child
        [0, 1, 1, 1, 1, 0, 1],  # a grandchild through the first child
    ]
    assert attention.key_positions[0, 1:].tolist() == [0, 1, 2, 3, 3, 4]
