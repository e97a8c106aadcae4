"""Who sees whom in a forward that may carry a token tree (speculative decoding).

A *tree step* sends ``T`` new tokens per sequence with a parent index each (``parents[b, i] < i``, or
``-1``: the token follows the cached prefix directly). Token ``i`` attends to the cached prefix (minus
padding) and to its own ancestors and itself in the step — never to its siblings or their subtrees. A
plain step of ``T`` tokens is the chain ``parents = [-1, 0, 1, ...]``.

Positions come from the client (``position_ids``: a node's position is the prefix length plus its
depth); the cached keys' positions are recovered from the 2-D padding mask (the running count of real
tokens), which stays right when accepted paths leave holes in the cache. Sliding windows compare
positions, not slots — for every real key this is the slot distance a plain, hole-free decode would see,
so a sliding layer attends to exactly what it would in plain decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass
class TreeAttention:
    """Visibility of every key to every query in one forward, and the keys' positions."""

    visible: torch.Tensor  # bool [batch, queries, keys]: padding, causality / ancestry, self
    query_positions: torch.Tensor  # int64 [batch, queries]
    key_positions: torch.Tensor  # int64 [batch, keys] (meaningless where key_mask is False)
    key_mask: torch.Tensor  # bool [batch, keys]: real tokens

    def mask(self, config: PretrainedConfig, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
        """A 4-D attention mask [batch, 1, queries, keys] in the form the model's attention expects: bool
        (True = attend) for SDPA, additive float (0 / lowest) for eager attention. With ``window``, a
        query sees only keys less than ``window`` positions behind it (itself always: distance 0)."""
        visible = self.visible
        if window:
            distance = self.query_positions[:, :, None] - self.key_positions[:, None, :]
            visible = visible & (distance < window)
        visible = visible[:, None]
        if getattr(config, "_attn_implementation", None) == "sdpa":
            return visible
        zero = torch.zeros((), dtype=dtype, device=visible.device)
        return torch.where(visible, zero, torch.finfo(dtype).min)


def tree_attention(
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    parents: torch.Tensor | None,
    past: int,
) -> TreeAttention:
    """Visibility for ``T = position_ids.shape[1]`` new tokens after ``past`` cached ones.

    :param attention_mask: [batch, past + T] 0/1 (None: no padding).
    :param parents: [batch, T], each ``-1`` or an earlier index (None: a plain chain).
    """
    queries = position_ids.shape[1]
    batch = max(t.shape[0] for t in (position_ids, attention_mask, parents) if t is not None)
    device = position_ids.device
    keys = past + queries
    if attention_mask is None:
        key_mask = torch.ones(batch, keys, dtype=torch.bool, device=device)
    else:
        key_mask = attention_mask.to(device=device, dtype=torch.bool)
    query_positions = position_ids.to(device=device, dtype=torch.int64).expand(batch, queries)
    past_positions = key_mask[:, :past].to(torch.int64).cumsum(-1) - 1
    key_positions = torch.cat([past_positions, query_positions], dim=1)
    if parents is None:
        ancestry = torch.ones(queries, queries, dtype=torch.bool, device=device).tril().expand(batch, -1, -1)
    else:
        ancestry = _ancestry(parents.to(device=device, dtype=torch.int64))
    eye = torch.eye(queries, dtype=torch.bool, device=device)
    in_step = (ancestry & key_mask[:, None, past:]) | eye
    visible = torch.cat([key_mask[:, None, :past].expand(batch, queries, past), in_step], dim=2)
    return TreeAttention(visible, query_positions, key_positions, key_mask)


def _ancestry(parents: torch.Tensor) -> torch.Tensor:
    """bool [batch, T, T]: ``[b, i, j]`` is True when node ``j`` is node ``i`` or one of its ancestors."""
    batch, size = parents.shape
    ancestry = torch.zeros(batch, size, size, dtype=torch.bool, device=parents.device)
    rows = torch.arange(batch, device=parents.device)
    for i in range(size):
        parent = parents[:, i]
        has_parent = parent >= 0
        if bool(has_parent.any()):
            ancestry[:, i] = ancestry[rows, parent.clamp(min=0)] & has_parent[:, None]
        ancestry[:, i, i] = True
    return ancestry


def valid_parents(parents: torch.Tensor) -> bool:
    """Every parent is ``-1`` or an index before its child."""
    index = torch.arange(parents.shape[-1], device=parents.device)
    return bool(((parents >= -1) & (parents < index)).all())


def valid_keep(keep: torch.Tensor, last: int) -> bool:
    """Each kept index lies in ``0..last-1`` (a row that keeps fewer repeats one: the client masks it)."""
    return keep.numel() == 0 or bool(((keep >= 0) & (keep < last)).all())
