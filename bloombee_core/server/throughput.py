"""The throughput a server announces: measured once at start by decoding through its span."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from bloombee_core.model import BlockSpan


def measure_throughput(span: BlockSpan, dtype: torch.dtype, device: torch.device, steps: int = 4) -> float:
    """Tokens per second through ``span`` in batch-1 decoding (one warm-up step, then ``steps`` timed)."""
    return steps / _decode_seconds(span, dtype, device, 1, steps)


def measure_row_cost(span: BlockSpan, dtype: torch.dtype, device: torch.device, rows: int = 8) -> float:
    """What one more row adds to a decode step, as a fraction of a 1-row step (0: rows are free, 1: a
    step costs its rows times a 1-row step). The micro-batch pipeline's ``auto`` plans with it. Each
    size's fastest step counts: a burst of load from elsewhere only ever slows a step down."""
    one = min(_step_seconds(span, dtype, device, 1, 5))
    many = min(_step_seconds(span, dtype, device, rows, 5))
    return max(many / one - 1, 0.0) / (rows - 1)


def _decode_seconds(
    span: BlockSpan, dtype: torch.dtype, device: torch.device, rows: int, steps: int
) -> float:
    """Seconds of ``steps`` decode steps of ``rows`` rows through ``span``, after one warm-up step."""
    return sum(_step_seconds(span, dtype, device, rows, steps))


def _step_seconds(
    span: BlockSpan, dtype: torch.dtype, device: torch.device, rows: int, steps: int
) -> list[float]:
    """Each of ``steps`` decode steps' seconds, ``rows`` rows through ``span``, after a warm-up step."""
    hidden = torch.zeros(rows, 1, int(span.config.hidden_size), dtype=dtype, device=device)
    n = span.end - span.start
    per_layer_sizes = span.family.per_layer_input_sizes(span.config)
    per_layer = {k: hidden.new_zeros(rows, 1, n, size) for k, size in per_layer_sizes.items()}
    cache = span.new_cache(rows, steps + 1)
    times = []
    with torch.inference_mode():
        pos = torch.zeros(rows, 1, dtype=torch.long, device=device)
        span(hidden, position_ids=pos, cache=cache, per_layer_inputs=per_layer)
        for i in range(steps):
            pos = torch.full((rows, 1), i + 1, dtype=torch.long, device=device)
            begin = time.perf_counter()
            span(hidden, position_ids=pos, cache=cache, per_layer_inputs=per_layer)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(max(time.perf_counter() - begin, 1e-9))
    return times
