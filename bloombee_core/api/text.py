"""Streaming text from token ids: incremental detokenization, and stop strings that never leak."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class TokenText:
    """Text of a growing list of tokens, handed out piece by piece once it is final.

    Each call decodes only a short window: the tokens since the previous piece plus the ones before
    them, and returns what the new tokens added to that window's text. The window keeps tokenizers
    that drop a leading space at the start of a decode (SentencePiece) and multi-token characters
    (bytes of one UTF-8 character split over tokens: held back while they decode to U+FFFD) right.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens whose text has been handed out

    def add(self, token: int) -> None:
        self.ids.append(token)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def final(self, flush: bool = False) -> str:
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) and not flush:
            return ""
        if after.endswith("\ufffd") and not flush:
            return ""  # an incomplete character: wait for its other bytes
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :] if after.startswith(before) else after


class StopFinder:
    """Cuts a text stream at the first stop string. Text that could be the start of a stop string is
    held back until it is known not to be, so no part of a stop string is ever handed out."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.done = False

    def feed(self, text: str, flush: bool = False) -> tuple[str, bool]:
        """``(text that is final, whether a stop string was reached)``."""
        if self.done:
            return "", True
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.done = self.pending[: min(hits)], "", True
            return out, True
        keep = 0 if flush else self._partial()
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def _partial(self) -> int:
        """Length of the longest end of the pending text that begins some stop string."""
        best = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:size]):
                    best = size
                    break
        return best
