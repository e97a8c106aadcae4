"""Built-in tuning methods: ``lora``, ``prompt``, ``deep-prompt`` and ``classifier``."""

from __future__ import annotations

from bloombee_core.hookspecs import hookimpl
from bloombee_core.tuning import TuningMethod
from bloombee_tuning.methods import BUILTIN_METHODS, Classifier, DeepPrompt, Lora, Prompt

__all__ = ["Classifier", "DeepPrompt", "Lora", "Prompt"]


@hookimpl
def bloombee_register_tuning_methods() -> list[type[TuningMethod]]:
    return list(BUILTIN_METHODS)
