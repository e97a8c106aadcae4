"""Growing a :class:`DraftTree` node by node within a node budget, merging equal paths like a trie."""

from __future__ import annotations

from collections.abc import Iterable

from bloombee_core.drafting import DraftTree

ROOT = -1  # the parent of depth-1 nodes: the last committed token


class TreeBuilder:
    """A draft tree under construction: at most ``max_nodes`` nodes, one node per (parent, token)."""

    def __init__(self, max_nodes: int) -> None:
        self.max_nodes = max_nodes
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self._index: dict[tuple[int, int], int] = {}

    @property
    def full(self) -> bool:
        return len(self.tokens) >= self.max_nodes

    def child(self, parent: int, token: int) -> int | None:
        """The node of ``token`` under ``parent``: the existing one, else a new one; ``None`` once the
        budget is spent."""
        key = (parent, token)
        if key in self._index:
            return self._index[key]
        if self.full:
            return None
        self.tokens.append(token)
        self.parents.append(parent)
        self._index[key] = len(self.tokens) - 1
        return self._index[key]

    def add_path(self, tokens: Iterable[int]) -> int:
        """Merge a path that starts under the root, sharing the nodes of any equal prefix; it is cut where
        the budget runs out. Returns how many nodes it added."""
        before, node = len(self.tokens), ROOT
        for token in tokens:
            found = self.child(node, token)
            if found is None:
                break
            node = found
        return len(self.tokens) - before

    def tree(self) -> DraftTree:
        return DraftTree(list(self.tokens), list(self.parents))
