"""A span of decoder layers runnable on its own, and a session's KV cache for it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from bloombee_core.family import SLIDING, span_problem

if TYPE_CHECKING:
    from transformers import PretrainedConfig
    from transformers.cache_utils import Cache

    from bloombee_core.family import ModelFamily


class SpanCache:
    """A session's KV cache for one span. Wraps a transformers ``Cache`` indexed by global layer number."""

    def __init__(self, kv: Cache, batch_size: int, max_length: int, layer_indices: Iterable[int]) -> None:
        self.kv = kv
        self.batch_size = batch_size
        self.max_length = max_length
        self.layer_indices = list(layer_indices)
        self.length = 0  # tokens already cached

    def nbytes(self) -> int:
        total = 0
        for i in self.layer_indices:
            layer = self.kv.layers[i]
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


class BlockSpan(nn.Module):
    """Decoder layers ``start:end`` of one model, runnable on their own with or without a KV cache."""

    def __init__(
        self,
        family: ModelFamily,
        config: PretrainedConfig,
        start: int,
        end: int,
        layers: list[nn.Module],
        rotary: nn.Module | None,
    ) -> None:
        super().__init__()
        self.family = family
        self.config = config
        self.start = start
        self.end = end
        self.layers = nn.ModuleList(layers)
        self.rotary = rotary

    def sub_span(self, start: int, end: int) -> BlockSpan:
        """Blocks start:end of this span, sharing its modules (a server serving part of what it holds)."""
        problem = span_problem(
            start, end, (self.start, self.end), self.family.allowed_cuts(self.config), "this span"
        )
        if problem:
            raise ValueError(problem)
        if (start, end) == (self.start, self.end):
            return self
        layers = list(self.layers)[start - self.start : end - self.start]
        return BlockSpan(self.family, self.config, start, end, layers, self.rotary)

    def new_cache(self, batch_size: int, max_length: int) -> SpanCache:
        return SpanCache(self.family.new_kv(self.config), batch_size, max_length, range(self.start, self.end))

    def cache_bytes(self, batch_size: int, max_length: int) -> int:
        itemsize = next(self.layers.parameters()).element_size()
        total = 0
        for index in range(self.start, self.end):
            if not self.family.owns_kv(self.config, index):
                continue
            kv_heads, head_dim = self.family.kv_shape(self.config, index)
            length = max_length
            if self.family.layer_type(self.config, index) == SLIDING and self.config.sliding_window:
                length = min(max_length, self.config.sliding_window)
            total += 2 * batch_size * kv_heads * head_dim * length * itemsize
        return total

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: SpanCache | None = None,
        per_layer_inputs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        batch, length = hidden.shape[:2]
        past = cache.length if cache is not None else 0
        _check_inputs(self, hidden, position_ids, attention_mask, cache, past)
        per_layer_inputs = _checked_per_layer_inputs(self, hidden, per_layer_inputs or {})
        kv = cache.kv if cache is not None else None
        context = self.family.layer_context(self, hidden, position_ids, attention_mask, kv)
        context.per_layer = per_layer_inputs
        for index, layer in zip(range(self.start, self.end), self.layers, strict=True):
            hidden = self.family.run_layer(self, layer, index, hidden, context, kv)
        if cache is not None:
            cache.length += length
        return hidden


def _check_inputs(
    span: BlockSpan,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: SpanCache | None,
    past: int,
) -> None:
    if hidden.ndim != 3 or hidden.shape[-1] != span.config.hidden_size:
        raise ValueError(
            f"hidden states must be [batch, tokens, {span.config.hidden_size}], got {list(hidden.shape)}"
        )
    batch, length = hidden.shape[:2]
    if position_ids.ndim != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != length:
        raise ValueError(f"position_ids must be [{batch} or 1, {length}], got {list(position_ids.shape)}")
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, past + length):
        raise ValueError(
            f"attention_mask must be [batch, past+tokens] = [{batch}, {past + length}], "
            f"got {list(attention_mask.shape)}"
        )
    if cache is not None:
        if cache.batch_size != batch:
            raise ValueError(f"this cache was made for batch size {cache.batch_size}, got {batch}")
        if past + length > cache.max_length:
            raise ValueError(
                f"the session would hold {past + length} tokens but its cache was made for {cache.max_length}; "
                "open the session with a larger max_length"
            )


def _checked_per_layer_inputs(span: BlockSpan, hidden: torch.Tensor, given: dict) -> dict[str, torch.Tensor]:
    wanted = span.family.per_layer_input_sizes(span.config)
    if set(given) != set(wanted):
        raise ValueError(f"this span needs per-layer inputs {sorted(wanted)}, got {sorted(given)}")
    for name, size in wanted.items():
        shape = (*hidden.shape[:2], span.end - span.start, size)
        if tuple(given[name].shape) != shape:
            raise ValueError(f"per-layer input {name!r} must be {list(shape)}, got {list(given[name].shape)}")
    return given
