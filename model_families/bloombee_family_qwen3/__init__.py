"""Qwen3 and Qwen3-MoE: rotary + q/k norms inside the block; the shared adapter applies as is."""

from __future__ import annotations

from bloombee_core.family import ModelFamily, fuse_experts
from bloombee_core.hookspecs import hookimpl


class Qwen3Family(ModelFamily):
    name = "qwen3"
    description = "Qwen3 dense and Qwen3-MoE decoders (optional sliding-window layers per config.layer_types)"
    model_types = ("qwen3", "qwen3_moe")

    def convert_layer_state(self, config, index, state):
        return fuse_experts(state, "mlp.experts", gate="gate_proj", up="up_proj", down="down_proj")


@hookimpl
def bloombee_register_model_families() -> list[type[ModelFamily]]:
    return [Qwen3Family]
