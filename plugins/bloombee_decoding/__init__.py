"""Built-in decoding strategies: ``greedy`` and ``sampling``."""

from __future__ import annotations

from bloombee_core.decoding import DecodingStrategy
from bloombee_core.hookspecs import hookimpl
from bloombee_decoding.strategies import BUILTIN_STRATEGIES, GreedyDecoding, SamplingDecoding

__all__ = ["GreedyDecoding", "SamplingDecoding"]


@hookimpl
def bloombee_register_decoding_strategies() -> list[type[DecodingStrategy]]:
    return list(BUILTIN_STRATEGIES)
