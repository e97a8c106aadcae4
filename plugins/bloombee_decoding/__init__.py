"""Built-in decoding strategies: ``greedy``, ``sampling`` and ``speculative``."""

from __future__ import annotations

from bloombee_core.decoding import DecodingStrategy
from bloombee_core.hookspecs import hookimpl
from bloombee_decoding.speculative import SpeculativeDecoding
from bloombee_decoding.strategies import BUILTIN_STRATEGIES, GreedyDecoding, SamplingDecoding

__all__ = ["GreedyDecoding", "SamplingDecoding", "SpeculativeDecoding"]


@hookimpl
def bloombee_register_decoding_strategies() -> list[type[DecodingStrategy]]:
    return [*BUILTIN_STRATEGIES, SpeculativeDecoding]
