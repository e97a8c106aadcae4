"""Mixtral: a mixture of experts inside each block; router and experts travel with the block."""

from __future__ import annotations

from bloombee_core.family import ModelFamily, fuse_experts
from bloombee_core.hookspecs import hookimpl


class MixtralFamily(ModelFamily):
    name = "mixtral"
    description = "Mixtral sparse mixture-of-experts decoders (rotary, optional sliding window)"
    model_types = ("mixtral",)

    def convert_layer_state(self, config, index, state):
        # hub checkpoints call the MoE block "block_sparse_moe" and its expert matrices w1 (gate), w3 (up), w2
        state = {name.replace("block_sparse_moe.", "mlp.", 1): t for name, t in state.items()}
        return fuse_experts(state, "mlp.experts", gate="w1", up="w3", down="w2")


@hookimpl
def bloombee_register_model_families() -> list[type[ModelFamily]]:
    return [MixtralFamily]
