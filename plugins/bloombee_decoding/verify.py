"""Verification of draft trees: which drafted tokens the target model keeps, and the token it adds.

Each round the swarm scores the root (the last committed token) and every node of a sequence's
:class:`~bloombee_core.drafting.DraftTree`: row ``0`` of the logits is the root's, row ``1 + i`` node
``i``'s. Verification walks from the root: at each node it decides the next token from that node's
target distribution; if that token is one of the node's children it moves there and goes on, otherwise
it stops and the decided token is the *bonus* token. A round therefore always emits
``len(accepted) + 1`` tokens, and what the drafter proposed changes how many, never which.

torch and transformers are imported where they are used, so importing this module stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from bloombee_core.drafting import DraftTree

__all__ = [
    "Processing",
    "emitted_tokens",
    "verify_batch",
    "verify_greedy",
    "verify_sampling",
]


@dataclass(frozen=True)
class Processing:
    """How sampling reshapes the target's logits; the defaults are transformers' own
    (``generate(do_sample=True)`` without options)."""

    temperature: float = 1.0
    top_k: int = 50  # 0 keeps every token
    top_p: float = 1.0  # 1.0 keeps every token

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1.0 keeps every token), got {self.top_p}")

    def target_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution ``generate(do_sample=True, ...)`` samples from, for logits ``[..., V]``.

        Same steps as transformers: logits in float32, then its own temperature, top-k and top-p
        warpers, in that order and under the same conditions, then a softmax.
        """
        import torch
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        warpers = LogitsProcessorList()
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k != 0:
            warpers.append(TopKLogitsWarper(top_k=self.top_k, min_tokens_to_keep=1))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=self.top_p, min_tokens_to_keep=1))
        scores = logits.to(dtype=torch.float32).reshape(-1, logits.shape[-1])  # the warpers want [N, V]
        scores = warpers(None, scores.clone())
        return torch.softmax(scores, dim=-1).reshape(logits.shape)


def _children(tree_parents: Sequence[int], tree_tokens: Sequence[int]) -> list[list[int]]:
    """``children[1 + i]``: node ``i``'s children in index order (``children[0]``: the root's), each
    token once: a later child repeating a sibling's token can never be chosen, so it is left out."""
    if len(tree_parents) != len(tree_tokens):
        raise ValueError(
            f"a draft tree needs one parent per token, got {len(tree_tokens)} tokens and {len(tree_parents)} parents"
        )
    children: list[list[int]] = [[] for _ in range(len(tree_parents) + 1)]
    seen: list[set[int]] = [set() for _ in range(len(tree_parents) + 1)]
    for node, parent in enumerate(tree_parents):
        if not -1 <= parent < node:
            raise ValueError(
                f"node {node} has parent {parent}; parents come before their children (-1: the root)"
            )
        if tree_tokens[node] not in seen[parent + 1]:
            seen[parent + 1].add(tree_tokens[node])
            children[parent + 1].append(node)
    return children


def _check_rows(scores: torch.Tensor, n_nodes: int) -> None:
    """A tensor of scores must hold the root's row and one per node (a lazy table of rows, whose rows are
    computed only where verification goes, is taken as it is)."""
    if not hasattr(scores, "dim"):
        return
    if scores.dim() != 2 or scores.shape[0] < 1 + n_nodes:
        raise ValueError(
            f"verification needs one row for the root and one per node ([{1 + n_nodes}, V]), got {list(scores.shape)}"
        )


def verify_greedy(
    tree_parents: Sequence[int], tree_tokens: Sequence[int], logits: torch.Tensor
) -> tuple[list[int], int]:
    """Greedy verification: the next token at each node is the target's argmax.

    ``logits`` is ``[1 + n, V]`` (root first), or anything whose ``[row]`` gives one row: only the rows
    along the accepted path are read. Returns the accepted nodes along the path, in order (0-based tree
    node indices, the root not counted), and the bonus token. The emitted tokens equal plain greedy
    decoding token for token.
    """
    _check_rows(logits, len(tree_parents))
    children = _children(tree_parents, tree_tokens)
    accepted: list[int] = []
    row = 0
    while True:
        best = int(logits[row].argmax())
        match = next((c for c in children[row] if tree_tokens[c] == best), None)
        if match is None:
            return accepted, best
        accepted.append(match)
        row = match + 1


def verify_sampling(
    tree_parents: Sequence[int],
    tree_tokens: Sequence[int],
    probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[list[int], int]:
    """Multi-candidate speculative sampling for deterministic drafts (each candidate a point mass).

    ``probs`` is ``[1 + n, V]``: the target distribution (:meth:`Processing.target_probs`) at the root
    and at each node. At a node with distribution ``p`` and distinct children ``c_1..c_k`` (index
    order): ``r = p``; for each ``c_i``, accept it with probability ``r(c_i)`` (``u < r(c_i)``, ``u``
    uniform from ``generator``) and move to it; else set ``r(c_i) = 0`` and renormalise ``r``. If no
    child is accepted, the bonus token is sampled from ``r``. Returns the accepted nodes (0-based tree
    node indices, the root not counted) and the bonus token.

    Each step emits ``x`` with probability exactly ``p(x)``. Write ``S_i = p(c_1) + ... + p(c_i)``;
    after ``c_1..c_{i-1}`` are rejected, ``r = p / (1 - S_{i-1})`` off them. So
    ``P(reach c_i) = prod_{j<i} (1 - p(c_j) / (1 - S_{j-1})) = prod_{j<i} (1 - S_j) / (1 - S_{j-1})
    = 1 - S_{i-1}`` (telescoping), and ``P(emit c_i) = (1 - S_{i-1}) * p(c_i) / (1 - S_{i-1}) = p(c_i)``.
    A non-candidate ``x`` is emitted only when all are rejected, with probability
    ``(1 - S_k) * p(x) / (1 - S_k) = p(x)``. By induction along the path every emitted token follows
    the target's conditional distribution given those before it, as plain sampling would.
    """
    import torch

    _check_rows(probs, len(tree_parents))
    children = _children(tree_parents, tree_tokens)
    accepted: list[int] = []
    row = 0
    while True:
        p = probs[row].to(dtype=torch.float64)
        r = p.clone()
        rejected: list[int] = []
        move = None
        for child in children[row]:
            token = tree_tokens[child]
            if torch.rand((), dtype=torch.float64, generator=generator) < r[token]:
                move = child
                break
            rejected.append(token)
            r[token] = 0.0
            total = r.sum()
            if total > 0:
                r /= total
            else:  # only if all mass sat on rejected tokens (rounding): p without them, else p itself
                r = p.clone()
                r[rejected] = 0.0
                if not r.sum() > 0:
                    r = p.clone()
        if move is None:
            bonus = torch.multinomial(r, 1, generator=generator)
            return accepted, int(bonus)
        accepted.append(move)
        row = move + 1


def emitted_tokens(tree_tokens: Sequence[int], accepted: Sequence[int], bonus: int) -> list[int]:
    """The tokens a round commits: the accepted nodes' tokens, then the bonus."""
    return [tree_tokens[node] for node in accepted] + [bonus]


def verify_batch(
    trees: Sequence[DraftTree],
    logits: torch.Tensor,
    processing: Processing | None = None,
    generator: torch.Generator | None = None,
) -> list[tuple[list[int], int]]:
    """Verify every sequence of a batch: ``logits[b]`` is ``[1 + n_max, V]`` for ``trees[b]`` (rows
    past ``1 + len(trees[b])`` are padding). ``processing=None`` verifies greedily; otherwise by
    speculative sampling of :meth:`Processing.target_probs`. One ``(accepted, bonus)`` per sequence."""
    if logits.dim() != 3 or logits.shape[0] != len(trees):
        raise ValueError(
            f"verify_batch needs logits [batch={len(trees)}, 1 + nodes, V], got {list(logits.shape)}"
        )
    results = []
    for tree, rows in zip(trees, logits, strict=True):
        rows = rows[: 1 + len(tree)]
        if processing is None:
            results.append(verify_greedy(tree.parents, tree.tokens, rows))
        else:
            results.append(
                verify_sampling(tree.parents, tree.tokens, processing.target_probs(rows), generator)
            )
    return results
