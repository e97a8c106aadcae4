"""BLOOM: ALiBi position bias instead of rotary, a LayerNorm right after the embeddings (client side)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bloombee_core.family import FULL, LayerContext, ModelFamily, alibi_at, past_length
from bloombee_core.hookspecs import hookimpl

if TYPE_CHECKING:
    import torch

    from bloombee_core.model import BlockSpan, ClientPart
    from bloombee_core.model.tree import TreeAttention


class BloomFamily(ModelFamily):
    name = "bloom"
    description = "BLOOM decoders (ALiBi attention bias, embedding LayerNorm, tied LM head)"
    model_types = ("bloom",)
    layer_prefix = "transformer.h."
    final_norm = "transformer.ln_f"
    rotary = None

    def hidden_from_embeds(self, client: ClientPart, embeds: torch.Tensor) -> torch.Tensor:
        return client.model.transformer.word_embeddings_layernorm(embeds)

    def layer_context(
        self, span: BlockSpan, hidden, position_ids, attention_mask, kv, tree: TreeAttention | None = None
    ) -> LayerContext:
        import torch
        from transformers.models.bloom.modeling_bloom import build_alibi_tensor

        # BLOOM ignores position ids: the ALiBi bias is built from the padding mask (or the key length)
        context = super().layer_context(span, hidden, None, attention_mask, kv, tree)
        heads, batch = span.config.n_head, hidden.shape[0]
        if tree is not None:  # a token tree: each key's bias from its own position
            context.extra["alibi"] = alibi_at(build_alibi_tensor, tree.key_positions, heads, hidden.dtype)
        elif attention_mask is None:
            keys = past_length(span, kv) + hidden.shape[1]
            ones = torch.ones(1, keys, dtype=torch.long, device=hidden.device)
            slopes = build_alibi_tensor(ones, heads, hidden.dtype)
            context.extra["alibi"] = slopes.repeat(batch, 1, 1)
        else:
            context.extra["alibi"] = build_alibi_tensor(attention_mask, heads, dtype=hidden.dtype)
        return context

    def run_layer(self, span, layer, index: int, hidden, context: LayerContext, kv: Any) -> torch.Tensor:
        return layer(
            hidden,
            layer_past=kv,
            attention_mask=context.masks[FULL],
            use_cache=kv is not None,
            alibi=context.extra["alibi"],
        )[0]


@hookimpl
def bloombee_register_model_families() -> list[type[ModelFamily]]:
    return [BloomFamily]
