"""Gemma 1/2/3/4 text: sqrt(hidden)-scaled embeddings, (1+w) RMSNorm, soft-capped logits, sliding layers.

The scaling and norms live in transformers' own Gemma modules, which the shared client part reuses;
Gemma 3/4 compute one rotary table per layer type (local / global rope), so the span asks for each.

Gemma 4 adds two things a span needs from outside its own weights:

* per-layer inputs: the client turns the token ids (and their embeddings) into a small vector per token
  and per layer, and sends each span the slice for its layers (``per_layer_inputs``);
* KV sharing: the last ``num_kv_shared_layers`` layers reuse the keys/values of the last earlier layer of
  the same type, so a model may not be cut between such a source and its consumers (``allowed_cuts``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bloombee_core.family import LayerContext, ModelFamily
from bloombee_core.hookspecs import hookimpl

if TYPE_CHECKING:
    import torch

    from bloombee_core.model import BlockSpan, ClientPart
    from bloombee_core.model.tree import TreeAttention

PER_LAYER = "per_layer_inputs"


class GemmaFamily(ModelFamily):
    name = "gemma"
    description = "Gemma, Gemma 2, Gemma 3 and Gemma 4 text decoders"
    model_types = ("gemma", "gemma2", "gemma3_text", "gemma4_text")

    def rotary_takes_layer_type(self, config) -> bool:
        return config.model_type in ("gemma3_text", "gemma4_text")

    # ---- Gemma 4 only: every method below is a no-op for the earlier generations -----------------
    def allowed_cuts(self, config) -> list[int]:
        cuts = super().allowed_cuts(config)
        modes = getattr(config, "kv_sharing_modes", None) if config.model_type == "gemma4_text" else None
        if not modes:
            return cuts
        forbidden: set[int] = set()
        for consumer, mode in enumerate(modes):
            if mode == "reuse":
                source = _kv_source(config, consumer)
                forbidden.update(range(source + 1, consumer + 1))  # keep source..consumer in one span
        return [cut for cut in cuts if cut not in forbidden]

    def owns_kv(self, config, index: int) -> bool:
        modes = getattr(config, "kv_sharing_modes", None) if config.model_type == "gemma4_text" else None
        return not modes or modes[index] != "reuse"

    def kv_shape(self, config, index: int) -> tuple[int, int]:
        if config.model_type != "gemma4_text":
            return super().kv_shape(config, index)
        layer = config.per_layer_config[index]  # full-attention layers use a wider head
        return layer.num_key_value_heads, layer.head_dim

    def per_layer_input_sizes(self, config) -> dict[str, int]:
        size = (
            getattr(config, "hidden_size_per_layer_input", None)
            if config.model_type == "gemma4_text"
            else None
        )
        return {PER_LAYER: size} if size else {}

    def compute_per_layer_inputs(
        self, client: ClientPart, input_ids: torch.Tensor, hidden: torch.Tensor
    ) -> dict:
        if not self.per_layer_input_sizes(client.config):
            return {}
        text_model = client.model.model
        token_part = text_model.get_per_layer_inputs(input_ids, hidden)
        return {PER_LAYER: text_model.project_per_layer_inputs(hidden, token_part)}

    def convert_layer_state(self, config, index: int, state: dict[str, torch.Tensor]) -> dict:
        if self.owns_kv(config, index):
            return state
        # KV-consuming layers have no key/value weights; hub checkpoints may still carry them
        return {name: t for name, t in state.items() if name.split(".")[:2] not in _UNUSED_KV}

    def build_client_model(self, config, dtype: torch.dtype, device: str) -> torch.nn.Module:
        if config.model_type != "gemma4_text":
            return super().build_client_model(config, dtype, device)
        import torch
        from transformers import AutoModelForCausalLM

        # The per-layer embedding's width depends on the layer count, so keep the real config, build on
        # meta (no memory), drop the decoder layers, then materialise what is left.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.model.layers = torch.nn.ModuleList()
        model.to_empty(device=device)
        with torch.no_grad():
            for module in model.modules():  # non-persistent buffers (embedding scales, rope tables)
                if any(True for _ in module.buffers(recurse=False)):
                    model._init_weights(module)
        return model

    def layer_context(
        self, span: BlockSpan, hidden, position_ids, attention_mask, kv, tree: TreeAttention | None = None
    ) -> LayerContext:
        from transformers.cache_utils import KVSharingDict

        context = super().layer_context(span, hidden, position_ids, attention_mask, kv, tree)
        context.extra["shared_kv"] = KVSharingDict()  # filled by source layers, read by consumers, per call
        return context

    def run_layer(self, span, layer, index: int, hidden, context: LayerContext, kv: Any) -> torch.Tensor:
        if span.config.model_type != "gemma4_text":
            return super().run_layer(span, layer, index, hidden, context, kv)
        kind = self.layer_type(span.config, index)
        per_layer = context.per_layer.get(PER_LAYER)
        return layer(
            hidden,
            per_layer[:, :, index - span.start] if per_layer is not None else None,
            shared_kv_states=context.extra["shared_kv"],
            position_embeddings=context.position_embeddings[kind],
            attention_mask=context.masks[kind],
            position_ids=context.position_ids,
            cache=kv,
        )


def _kv_source(config, consumer: int) -> int:
    modes, types = config.kv_sharing_modes, config.layer_types
    sources = [i for i in range(consumer) if modes[i] == "store" and types[i] == types[consumer]]
    if not sources:
        raise ValueError(
            f"Gemma 4 layer {consumer} reuses keys/values but no earlier {types[consumer]} layer stores them"
        )
    return sources[-1]


_UNUSED_KV = [["self_attn", part] for part in ("k_proj", "v_proj", "k_norm", "v_norm")]


@hookimpl
def bloombee_register_model_families() -> list[type[ModelFamily]]:
    return [GemmaFamily]
