"""``prompt-lookup``: draft what followed earlier occurrences of the sequence's last few tokens.

No model: it pays off where the output repeats its input (summaries, code edits, quoting), and costs
next to nothing elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar

from pydantic import Field, model_validator

from bloombee_core.drafting import Drafter, DraftTree
from bloombee_core.plugin import PluginOptions
from bloombee_drafting.trees import TreeBuilder


class PromptLookupOptions(PluginOptions):
    max_ngram: int = Field(
        default=3, ge=1, description="longest run of the sequence's last tokens looked up earlier in it"
    )
    min_ngram: int = Field(
        default=1, ge=1, description="shortest run looked up when longer ones match nowhere"
    )
    max_candidates: int = Field(
        default=4, ge=1, description="most continuations merged into one tree (its branches)"
    )

    @model_validator(mode="after")
    def _ngram_range(self) -> PromptLookupOptions:
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) is above max_ngram ({self.max_ngram})")
        return self


class PromptLookupDrafter(Drafter):
    """Find earlier occurrences of the last ``n`` tokens (``n`` from ``max_ngram`` down to ``min_ngram``);
    what followed each is a candidate continuation. Candidates from longer matches come first, then the
    most recent; they are merged into a trie (shared prefixes share nodes). No match: an empty tree."""

    name: ClassVar[str] = "prompt-lookup"
    description: ClassVar[str] = "continuations of earlier matches of the last n-gram (no model)"
    Options: ClassVar[type[PluginOptions]] = PromptLookupOptions

    def propose(self, sequences: Sequence[Sequence[int]], max_nodes: int, max_depth: int) -> list[DraftTree]:
        return [self._tree(list(sequence), max_nodes, max_depth) for sequence in sequences]

    def _tree(self, sequence: list[int], max_nodes: int, max_depth: int) -> DraftTree:
        builder = TreeBuilder(max_nodes)
        if max_depth < 1:
            return builder.tree()
        branches = 0
        for start in self._continuation_starts(sequence):
            if branches == self.options.max_candidates or builder.full:
                break
            if builder.add_path(sequence[start : start + max_depth]):
                branches += 1
        return builder.tree()

    def _continuation_starts(self, sequence: list[int]) -> Iterator[int]:
        """Where the continuation of each earlier match of a suffix starts, each position once: longest
        suffix first, then the most recent match."""
        length, seen = len(sequence), set()
        for n in range(min(self.options.max_ngram, length - 1), self.options.min_ngram - 1, -1):
            suffix = sequence[length - n :]
            for start in range(length - 1, n - 1, -1):  # the match is sequence[start - n : start]
                if start not in seen and sequence[start - n : start] == suffix:
                    seen.add(start)
                    yield start
