"""The throughput a server announces: measured once at start by decoding through its span."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from bloombee_core.model import BlockSpan


def measure_throughput(span: BlockSpan, dtype: torch.dtype, device: torch.device, steps: int = 4) -> float:
    """Tokens per second through ``span`` in batch-1 decoding (one warm-up step, then ``steps`` timed)."""
    hidden = torch.zeros(1, 1, int(span.config.hidden_size), dtype=dtype, device=device)
    n = span.end - span.start
    per_layer_sizes = span.family.per_layer_input_sizes(span.config)
    per_layer = {k: hidden.new_zeros(1, 1, n, size) for k, size in per_layer_sizes.items()}
    cache = span.new_cache(1, steps + 1)
    with torch.inference_mode():
        pos = torch.zeros(1, 1, dtype=torch.long, device=device)
        span(hidden, position_ids=pos, cache=cache, per_layer_inputs=per_layer)
        begin = time.perf_counter()
        for i in range(steps):
            pos = torch.full((1, 1), i + 1, dtype=torch.long, device=device)
            span(hidden, position_ids=pos, cache=cache, per_layer_inputs=per_layer)
    return steps / max(time.perf_counter() - begin, 1e-6)
