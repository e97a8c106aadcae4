"""Gemma 1/2/3 text: sqrt(hidden)-scaled embeddings, (1+w) RMSNorm, soft-capped logits, sliding layers.

The scaling and norms live in transformers' own Gemma modules, which the shared client part reuses;
Gemma 3 computes one rotary table per layer type (local / global rope), so the span asks for both.
"""

from __future__ import annotations

from bloombee_core.family import ModelFamily
from bloombee_core.hookspecs import hookimpl


class GemmaFamily(ModelFamily):
    name = "gemma"
    description = "Gemma, Gemma 2 and Gemma 3 text decoders"
    model_types = ("gemma", "gemma2", "gemma3_text")

    def rotary_takes_layer_type(self, config) -> bool:
        return config.model_type == "gemma3_text"


@hookimpl
def bloombee_register_model_families() -> list[type[ModelFamily]]:
    return [GemmaFamily]
