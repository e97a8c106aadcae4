"""LLaMA 1/2/3 and Mistral-style checkpoints: the shared adapter applies as is."""

from __future__ import annotations

from bloombee_core.family import ModelFamily
from bloombee_core.hookspecs import hookimpl


class LlamaFamily(ModelFamily):
    name = "llama"
    description = "LLaMA 1/2/3, Mistral and SmolLM-style decoders (rotary, RMSNorm, optional sliding window)"
    model_types = ("llama", "mistral")


@hookimpl
def bloombee_register_model_families() -> list[type[ModelFamily]]:
    return [LlamaFamily]
