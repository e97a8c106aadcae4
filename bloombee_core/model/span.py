"""A span of decoder layers runnable on its own, and a session's KV cache for it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from bloombee_core.family import SLIDING, span_problem
from bloombee_core.model.kv_tiers import TIERS, TieredLayer, install_tiers, layer_tiers
from bloombee_core.model.tree import tree_attention, valid_parents

if TYPE_CHECKING:
    from transformers import PretrainedConfig
    from transformers.cache_utils import Cache

    from bloombee_core.family import ModelFamily
    from bloombee_core.model.kv_tiers import KVPlacement


class SpanCache:
    """A session's KV cache for one span. Wraps a transformers ``Cache`` indexed by global layer number.

    A cache made for token trees (``trees=True``) keeps every token in every layer, sliding ones too (the
    window is applied by the mask), so that :meth:`keep` can drop a rejected branch and still hold what
    the next step's window needs.

    Layers the span's ``kv_placement`` keeps off the device are :class:`TieredLayer` s: :meth:`settle`
    gives back what they hold only while in use, :meth:`close` deletes their files.
    """

    def __init__(
        self, kv: Cache, batch_size: int, max_length: int, layer_indices: Iterable[int], trees: bool = False
    ) -> None:
        self.kv = kv
        self.batch_size = batch_size
        self.max_length = max_length
        self.layer_indices = list(layer_indices)
        self.trees = trees
        self.length = 0  # tokens already cached
        self.closed = False

    def _tiered(self) -> list[TieredLayer]:
        return [layer for layer in self.kv.layers if isinstance(layer, TieredLayer)]

    def settle(self) -> None:
        """Give back the pages and device copies tiered layers hold for a forward (it is over)."""
        for layer in self._tiered():
            layer.release()

    def close(self) -> None:
        """Free what the cache holds, in every tier, and delete its files; the cache cannot be used
        after. Idempotent; the server calls it when a session ends (a cache collected unclosed still
        deletes its files)."""
        if self.closed:
            return
        self.closed = True
        for layer in self.kv.layers:
            if isinstance(layer, TieredLayer):
                layer.close()
            else:
                layer.reset()

    def __del__(self) -> None:
        try:  # only the files: a forgotten cache's ``kv`` may still be in use elsewhere
            for layer in self._tiered():
                layer.close()
        except Exception:  # noqa: BLE001 - at interpreter exit the modules it needs may be gone
            pass

    def _tensors(self) -> list[object]:
        """The cache layers of this span that hold keys and values."""
        layers = [self.kv.layers[i] for i in self.layer_indices if i < len(self.kv.layers)]
        return [layer for layer in layers if isinstance(getattr(layer, "keys", None), torch.Tensor)]

    def nbytes(self) -> int:
        """Bytes of the keys and values cached, in whichever tier."""
        return sum(
            layer.held_bytes()
            if isinstance(layer, TieredLayer)
            else sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
            for layer in self._tensors()
        )

    def keep(self, rows: torch.Tensor, last: int) -> None:
        """Of the last ``last`` cached tokens keep, for each sequence ``b``, those at ``rows[b]`` (in that
        order) and drop the others: the rejected branches of a token tree."""
        base = self.length - last
        for layer in self._tensors():
            if layer.keys.numel() == 0:
                continue
            heads, dim = layer.keys.shape[1], layer.keys.shape[3]
            index = (rows.to(layer.keys.device) + base)[:, None, :, None].expand(-1, heads, -1, dim)
            layer.keys = torch.cat([layer.keys[:, :, :base], layer.keys.gather(2, index)], dim=2)
            index = index[..., :1].expand(-1, -1, -1, layer.values.shape[3])
            layer.values = torch.cat([layer.values[:, :, :base], layer.values.gather(2, index)], dim=2)
        self.length = base + rows.shape[1]


class BlockSpan(nn.Module):
    """Decoder layers ``start:end`` of one model, runnable on their own with or without a KV cache."""

    # where sessions' caches keep each layer's keys/values (set by the offload policy; None: on the device)
    kv_placement: KVPlacement | None = None

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
        span = BlockSpan(self.family, self.config, start, end, layers, self.rotary)
        span.kv_placement = self.kv_placement
        return span

    def new_cache(self, batch_size: int, max_length: int, trees: bool = False) -> SpanCache:
        """An empty KV cache for a session; ``trees``: one that token trees may be verified against."""
        kv = self.family.new_kv(self.config)
        if trees:  # every layer keeps every token (see SpanCache)
            from transformers.cache_utils import DynamicLayer

            kv.layers = [DynamicLayer() if type(layer) is not DynamicLayer else layer for layer in kv.layers]
        install_tiers(self, kv, batch_size, max_length)
        return SpanCache(kv, batch_size, max_length, range(self.start, self.end), trees)

    def cache_bytes(self, batch_size: int, max_length: int, trees: bool = False) -> int:
        return sum(self.cache_bytes_by_tier(batch_size, max_length, trees).values())

    def cache_bytes_by_tier(self, batch_size: int, max_length: int, trees: bool = False) -> dict[str, int]:
        """A session's KV-cache bytes at ``max_length`` tokens, per tier (``"device"``, ``"cpu"``,
        ``"disk"``) under :attr:`kv_placement`."""
        itemsize = next(self.layers.parameters()).element_size()
        total = dict.fromkeys(TIERS, 0)
        for index, tier in layer_tiers(self).items():
            kv_heads, head_dim = self.family.kv_shape(self.config, index)
            length = max_length
            if (
                not trees
                and self.family.layer_type(self.config, index) == SLIDING
                and self.config.sliding_window
            ):
                length = min(max_length, self.config.sliding_window)
            total[tier] += 2 * batch_size * kv_heads * head_dim * length * itemsize
        return total

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: SpanCache | None = None,
        per_layer_inputs: dict[str, torch.Tensor] | None = None,
        tree: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the span. ``tree`` [batch, tokens] makes the new tokens a token tree (each one's parent
        index, ``-1`` for the cached prefix; see :mod:`bloombee_core.model.tree`); a cache made for trees
        treats every step that way (a plain step is a chain). ``prompts`` [batch or 1, blocks, prefix,
        hidden] (deep prompt tuning) is added to the first ``prefix`` positions before each block."""
        batch, length = hidden.shape[:2]
        past = cache.length if cache is not None else 0
        check_span_inputs(self, hidden, position_ids, attention_mask, cache, past)
        per_layer_inputs = checked_per_layer_inputs(self, hidden, per_layer_inputs or {})
        kv = cache.kv if cache is not None else None
        attention = None
        if tree is not None or (cache is not None and cache.trees):
            if tree is not None and (tuple(tree.shape) != (batch, length) or not valid_parents(tree)):
                raise ValueError(
                    f"tree must be [{batch}, {length}] parent indices, each -1 or an earlier index"
                )
            attention = tree_attention(position_ids, attention_mask, tree, past)
        context = self.family.layer_context(self, hidden, position_ids, attention_mask, kv, attention)
        context.per_layer = per_layer_inputs
        prefix = check_prompts(self, hidden, prompts)
        try:
            for index, layer in zip(range(self.start, self.end), self.layers, strict=True):
                if prefix:
                    deep = prompts[:, index - self.start].to(hidden.dtype)
                    hidden = torch.cat([hidden[:, :prefix] + deep, hidden[:, prefix:]], dim=1)
                hidden = self.family.run_layer(self, layer, index, hidden, context, kv)
        finally:
            if cache is not None:
                cache.settle()
        if cache is not None:
            cache.length += length
        return hidden


def check_prompts(span: BlockSpan, hidden: torch.Tensor, prompts: torch.Tensor | None) -> int:
    """The deep-prompt prefix length (0: none); raises ValueError for prompts that do not fit."""
    if prompts is None:
        return 0
    batch, length, width = hidden.shape
    blocks = span.end - span.start
    if (
        prompts.ndim != 4
        or prompts.shape[0] not in (1, batch)
        or prompts.shape[1] != blocks
        or not 1 <= prompts.shape[2] <= length
        or prompts.shape[3] != width
    ):
        raise ValueError(
            f"prompts must be [{batch} or 1, {blocks}, prefix <= {length}, {width}], got {list(prompts.shape)}"
        )
    return int(prompts.shape[2])


def check_span_inputs(
    span: BlockSpan,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: SpanCache | None,
    past: int,
) -> None:
    if cache is not None and cache.closed:
        raise ValueError("this cache was closed when its session ended; open a new session")
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


def checked_per_layer_inputs(span: BlockSpan, hidden: torch.Tensor, given: dict) -> dict[str, torch.Tensor]:
    wanted = span.family.per_layer_input_sizes(span.config)
    if set(given) != set(wanted):
        raise ValueError(f"this span needs per-layer inputs {sorted(wanted)}, got {sorted(given)}")
    for name, size in wanted.items():
        shape = (*hidden.shape[:2], span.end - span.start, size)
        if tuple(given[name].shape) != shape:
            raise ValueError(f"per-layer input {name!r} must be {list(shape)}, got {list(given[name].shape)}")
    return given
