"""Drafters: cheap proposals of what the target model will say next, for speculative decoding.

A drafter runs on the client. Each round the speculative decoding strategy gives it the committed tokens
of every sequence of the batch and a budget; it answers, per sequence, a :class:`DraftTree`: candidate
tokens arranged as a tree whose root is the last committed token. The swarm then scores every node of
every tree in one pass (each node sees the committed prefix and its own ancestors) and the strategy
keeps the longest path the target model agrees with. What a drafter proposes never changes the output,
only how many tokens each round yields: a drafter that is always wrong costs a little time, not
correctness.

Kept free of torch at import: listing plugins must stay fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bloombee_core.plugin import Plugin

if TYPE_CHECKING:
    from bloombee_core.client.model import DistributedModelForCausalLM

__all__ = ["DraftTree", "Drafter"]


@dataclass
class DraftTree:
    """Candidate continuations of one sequence, as a tree.

    ``tokens[i]`` is node ``i``'s token; ``parents[i]`` is its parent: ``-1`` for a child of the root (the
    last committed token, which is not part of the tree), else an index ``< i``. So a chain of three
    drafted tokens is ``parents = [-1, 0, 1]``; two alternatives for the next token and one follow-up of
    the first are ``parents = [-1, -1, 0]``. An empty tree (no proposal) is allowed.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError(
                f"a draft tree needs one parent per token, got {len(self.tokens)} tokens and {len(self.parents)} parents"
            )
        for i, parent in enumerate(self.parents):
            if not -1 <= parent < i:
                raise ValueError(
                    f"node {i} of a draft tree has parent {parent}; parents come before their children (-1: the root)"
                )

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        """Each node's depth: 1 for children of the root."""
        out: list[int] = []
        for parent in self.parents:
            out.append(1 if parent < 0 else out[parent] + 1)
        return out


class Drafter(Plugin):
    """Base of every drafter (kind ``"drafters"``).

    Subclasses set ``name`` and implement :meth:`propose`; :meth:`begin` and :meth:`end` bracket one
    ``generate`` call (load a draft model once, keep per-sequence caches across rounds, free them).
    """

    def begin(self, target: DistributedModelForCausalLM, batch_size: int) -> None:
        """A generation starts. ``target`` is the distributed model being decoded (its ``config``, its
        checkpoint ``folder``, its ``dtype``); ``batch_size`` sequences will be drafted for."""

    def propose(self, sequences: Sequence[Sequence[int]], max_nodes: int, max_depth: int) -> list[DraftTree]:
        """One :class:`DraftTree` per sequence, with at most ``max_nodes`` nodes, none deeper than
        ``max_depth``. ``sequences[b]`` are sequence ``b``'s committed tokens, prompt included, without
        padding; its last token is the root of its tree."""
        raise NotImplementedError

    def end(self) -> None:
        """The generation is over: release what :meth:`begin` took."""
