"""Falcon: rotary or ALiBi, parallel attention/MLP, multi-query or grouped KV (new_decoder_architecture)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from bloombee_core.family import FULL, LayerContext, ModelFamily, alibi_at, past_length
from bloombee_core.hookspecs import hookimpl

if TYPE_CHECKING:
    import torch

    from bloombee_core.model import BlockSpan
    from bloombee_core.model.tree import TreeAttention


class FalconFamily(ModelFamily):
    name = "falcon"
    description = "Falcon decoders: rotary or ALiBi, parallel attention, multi-query / grouped KV"
    model_types = ("falcon",)
    layer_prefix = "transformer.h."
    final_norm = "transformer.ln_f"
    rotary = "transformer.rotary_emb"

    def kv_shape(self, config, index: int) -> tuple[int, int]:
        head_dim = config.hidden_size // config.num_attention_heads
        if config.new_decoder_architecture:
            return config.num_kv_heads, head_dim
        return (1 if config.multi_query else config.num_attention_heads), head_dim

    def layer_context(
        self, span: BlockSpan, hidden, position_ids, attention_mask, kv, tree: TreeAttention | None = None
    ) -> LayerContext:
        import torch
        from transformers.masking_utils import create_causal_mask
        from transformers.models.falcon.modeling_falcon import build_alibi_tensor

        config = span.config
        context = LayerContext(position_ids=position_ids)
        if tree is not None:
            mask = tree.mask(config, hidden.dtype)
        else:  # Falcon always materialises the mask so the ALiBi bias can be folded into it
            mask = create_causal_mask(
                config=config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                cache=kv,
                position_ids=position_ids,
                allow_is_causal_skip=False,
                layer_idx=span.start,
            )
        alibi = None
        if config.alibi and tree is not None:
            heads = config.num_attention_heads
            alibi = alibi_at(build_alibi_tensor, tree.key_positions, heads, hidden.dtype)
            mask = _fold_alibi(mask, alibi, hidden.shape[0], config, hidden.dtype)
        elif config.alibi:
            batch, length = hidden.shape[:2]
            if attention_mask is None:
                keys = length + past_length(span, kv)
                attention_mask = torch.ones(batch, keys, dtype=torch.long, device=hidden.device)
            alibi = build_alibi_tensor(attention_mask, config.num_attention_heads, dtype=hidden.dtype)
            if mask is not None and mask.ndim == 4:
                mask = _fold_alibi(mask, alibi, batch, config, hidden.dtype)
        context.masks[FULL] = mask
        context.extra["alibi"] = alibi
        context.position_embeddings[FULL] = span.rotary(hidden, position_ids=position_ids)
        return context

    def run_layer(self, span, layer, index: int, hidden, context: LayerContext, kv: Any) -> torch.Tensor:
        return layer(
            hidden,
            layer_past=kv,
            attention_mask=context.masks[FULL],
            position_ids=context.position_ids,
            use_cache=kv is not None,
            alibi=context.extra["alibi"],
            position_embeddings=context.position_embeddings[FULL],
        )[0]


def _fold_alibi(mask: torch.Tensor, alibi: torch.Tensor, batch: int, config, dtype) -> torch.Tensor:
    """The additive mask Falcon's model builds: ALiBi scaled by 1/sqrt(head_dim), -inf where masked."""
    import torch

    lowest = torch.finfo(dtype).min
    if mask.dtype == torch.bool:
        mask = torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), lowest)
    alibi = alibi.reshape(batch, -1, *alibi.shape[1:])
    head_dim = config.hidden_size // config.num_attention_heads
    return torch.masked_fill(alibi / math.sqrt(head_dim), mask < -1, lowest)


@hookimpl
def bloombee_register_model_families() -> list[type[ModelFamily]]:
    return [FalconFamily]
