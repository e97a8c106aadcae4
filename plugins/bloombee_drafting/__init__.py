"""Built-in drafters for speculative decoding: ``prompt-lookup``, ``draft-model`` and ``early-exit``."""

from __future__ import annotations

from bloombee_core.drafting import Drafter
from bloombee_core.hookspecs import hookimpl
from bloombee_drafting.model_drafters import DraftModelDrafter, EarlyExitDrafter
from bloombee_drafting.prompt_lookup import PromptLookupDrafter

__all__ = ["DraftModelDrafter", "EarlyExitDrafter", "PromptLookupDrafter"]

BUILTIN_DRAFTERS: list[type[Drafter]] = [PromptLookupDrafter, DraftModelDrafter, EarlyExitDrafter]


@hookimpl
def bloombee_register_drafters() -> list[type[Drafter]]:
    return list(BUILTIN_DRAFTERS)
