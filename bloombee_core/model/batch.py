"""One forward over a span for several sessions' steps at once (cross-session batching).

Each session keeps its own KV cache, past length, positions and padding mask. For one batched forward
every layer gets a *temporary* combined cache: each session's cached keys/values, left-padded to the
longest past in the group, stacked along the batch. Who sees whom is spelled out explicitly, as for a
token tree (:class:`~bloombee_core.model.tree.TreeAttention`): every row sees its own real cached keys
and its own new tokens causally, never the padding. Masks, ALiBi biases and rotary tables all come from
the family's own ``layer_context`` on that description, so every family that verifies token trees
(all of them) batches the same way. Sliding-window layers of a plain session cache only the last few
tokens; their key set is described apart and masked by position distance, as the tree path does.

After the forward each session's new keys/values (the last ``tokens`` slots of every combined layer,
its own rows) are appended to its own cache through that cache layer's ``update``, which trims a
sliding layer exactly as a step computed alone would. A failure before that point leaves every
session's cache untouched, so the steps can be retried one by one.

Every step of a group has the same number of new tokens per sequence; sessions made for token trees
are not batched (their ``keep`` rewrites the cache between steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from bloombee_core.family import SLIDING
from bloombee_core.model.span import check_span_inputs, checked_per_layer_inputs
from bloombee_core.model.tree import TreeAttention, tree_attention

if TYPE_CHECKING:
    from transformers.cache_utils import Cache

    from bloombee_core.model.span import BlockSpan, SpanCache


@dataclass
class BatchItem:
    """One session's step: its cache and inputs (already on the span's device and dtype)."""

    cache: SpanCache
    hidden: torch.Tensor  # [batch, tokens, hidden]
    position_ids: torch.Tensor  # [batch, tokens]
    attention_mask: torch.Tensor | None = None  # [batch, past + tokens]
    per_layer: dict[str, torch.Tensor] = field(default_factory=dict)


def check_batch_item(span: BlockSpan, item: BatchItem) -> None:
    """What :func:`batched_forward` needs of one step; raises ValueError naming what is wrong."""
    check_span_inputs(
        span, item.hidden, item.position_ids, item.attention_mask, item.cache, item.cache.length
    )
    checked_per_layer_inputs(span, item.hidden, item.per_layer)
    if item.cache.trees:
        raise ValueError("a session made for token trees is not batched with others")


def batched_forward(span: BlockSpan, items: list[BatchItem]) -> list[torch.Tensor]:
    """Run every item's step through ``span`` in one forward; each item's outputs, in order. Each cache
    grows by its own step's keys and values, as if the steps had been computed one by one."""
    if not items:
        return []
    tokens = items[0].hidden.shape[1]
    for item in items:
        check_batch_item(span, item)
        if item.hidden.shape[1] != tokens:
            raise ValueError(
                f"steps batched together must have equal tokens, got {item.hidden.shape[1]} and {tokens}"
            )
    hidden = torch.cat([item.hidden for item in items])
    position_ids = torch.cat([item.position_ids.expand(item.hidden.shape[0], -1) for item in items])
    owned = [i for i in range(span.start, span.end) if span.family.owns_kv(span.config, i)]
    kinds = {i: span.family.layer_type(span.config, i) for i in owned}
    cached = {
        kind: [_cached_length(item.cache, [i for i in owned if kinds[i] == kind]) for item in items]
        for kind in set(kinds.values())
    }
    full = _combined_attention(items, [item.cache.length for item in items])
    kv = _combined_cache(span, items, owned)
    context = span.family.layer_context(span, hidden, position_ids, None, kv, full)
    for kind, lengths in cached.items():
        if kind in context.masks and lengths != [item.cache.length for item in items]:
            # a sliding layer holds fewer keys than the full past: its own key set and window
            window = span.config.sliding_window if kind == SLIDING else None
            context.masks[kind] = _combined_attention(items, lengths).mask(span.config, hidden.dtype, window)
    context.per_layer = {
        name: torch.cat([item.per_layer[name] for item in items]) for name in items[0].per_layer
    }
    for index, layer in zip(range(span.start, span.end), span.layers, strict=True):
        hidden = span.family.run_layer(span, layer, index, hidden, context, kv)
    _write_back(items, kv, owned, tokens)
    return list(hidden.split([item.hidden.shape[0] for item in items]))


def _cached_length(cache: SpanCache, indices: list[int]) -> int:
    """Keys the cache holds in layers ``indices`` (all of one kind hold the same number)."""
    lengths = {_layer_length(cache, i) for i in indices}
    if len(lengths) > 1:
        raise ValueError(f"layers of one kind hold different numbers of keys: {sorted(lengths)}")
    return lengths.pop() if lengths else cache.length


def _layer_length(cache: SpanCache, index: int) -> int:
    layers = cache.kv.layers
    if index >= len(layers) or not isinstance(getattr(layers[index], "keys", None), torch.Tensor):
        return 0
    keys = layers[index].keys
    return keys.shape[2] if keys.ndim == 4 else 0


def _combined_attention(items: list[BatchItem], cached: list[int]) -> TreeAttention:
    """Visibility of the combined forward whose keys are, per row, ``cached`` past keys (the last ones
    of its past) left-padded to the longest, then the new tokens."""
    width = max(cached)
    parts = []
    for item, keys in zip(items, cached, strict=True):
        past = item.cache.length
        own = tree_attention(item.position_ids, item.attention_mask, None, past)
        pad = width - keys
        cut = past - keys  # keys the cache no longer holds (a sliding window's older tokens)
        parts.append(
            TreeAttention(
                visible=_pad_left(own.visible[:, :, cut:], pad, False),
                query_positions=own.query_positions,
                key_positions=_pad_left(own.key_positions[:, cut:], pad, 0),
                key_mask=_pad_left(own.key_mask[:, cut:], pad, False),
            )
        )
    return TreeAttention(
        *(
            torch.cat([getattr(p, name) for p in parts])
            for name in ("visible", "query_positions", "key_positions", "key_mask")
        )
    )


def _pad_left(t: torch.Tensor, pad: int, value: bool | int) -> torch.Tensor:
    if pad == 0:
        return t
    filler = torch.full((*t.shape[:-1], pad), value, dtype=t.dtype, device=t.device)
    return torch.cat([filler, t], dim=-1)


def _combined_cache(span: BlockSpan, items: list[BatchItem], owned: list[int]) -> Cache:
    """A temporary cache: per owned layer, every session's keys/values left-padded and stacked."""
    from transformers.cache_utils import Cache, DynamicLayer

    kv = Cache(layers=[DynamicLayer() for _ in range(span.end)])
    for index in owned:
        held = [item.cache.kv.layers[index] if _layer_length(item.cache, index) else None for item in items]
        present = [layer for layer in held if layer is not None]
        if not present:
            continue  # nothing cached yet: the layer's update fills it during the forward
        width = max(layer.keys.shape[2] for layer in present)

        layer = kv.layers[index]
        layer.lazy_initialization(present[0].keys, present[0].values)
        layer.keys, layer.values = (_stacked(items, held, name, width) for name in ("keys", "values"))
    return kv


def _stacked(items: list[BatchItem], held: list, name: str, width: int) -> torch.Tensor:
    """Every session's ``name`` tensor of one layer (None: nothing cached) left-padded to ``width``."""
    like = next(getattr(layer, name) for layer in held if layer is not None)
    parts = []
    for item, layer in zip(items, held, strict=True):
        have = getattr(layer, name).shape[2] if layer is not None else 0
        filler = like.new_zeros(item.hidden.shape[0], like.shape[1], width - have, like.shape[3])
        parts.append(torch.cat([filler, getattr(layer, name)], dim=2) if layer is not None else filler)
    return torch.cat(parts)


def _write_back(items: list[BatchItem], kv: Cache, owned: list[int], tokens: int) -> None:
    """Append each session's new keys/values (its rows, the last ``tokens`` slots) to its own cache."""
    for index in owned:
        layer = kv.layers[index]
        if not layer.is_initialized:
            continue
        new_keys = layer.keys[:, :, -tokens:].split([item.hidden.shape[0] for item in items])
        new_values = layer.values[:, :, -tokens:].split([item.hidden.shape[0] for item in items])
        for item, k, v in zip(items, new_keys, new_values, strict=True):
            item.cache.kv.update(k.contiguous(), v.contiguous(), index)
    for item in items:
        item.cache.length += tokens
        item.cache.settle()  # tiered layers give back what the forward paged in
