"""What the same work costs without a network, measured in the benchmark's own process.

* :func:`span_compute` runs the client part and the very spans the servers host (the family adapter's
  ``load_client`` / ``load_span``), chained in one process: Σ compute for the floors.
* :func:`timed_generate` times any transformers ``generate`` (local reference or the swarm client) token
  by token with a streamer, so prefill (time to the first token) and decode are told apart.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.models import BenchModel


class TimingStreamer:
    """A transformers streamer that only notes when each ``put`` arrives (prompt first, then each step)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class GenerateTiming:
    prefill_s: float  # prompt handed over -> first new token
    step_s: list[float] = field(default_factory=list)  # one entry per later decode step

    @property
    def decode_s_per_step(self) -> float:
        return statistics.median(self.step_s) if self.step_s else float("nan")

    @property
    def decode_total_s(self) -> float:
        return sum(self.step_s)


def timed_generate(model: Any, input_ids: torch.Tensor, new_tokens: int) -> GenerateTiming:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens, timed per step."""
    streamer = TimingStreamer()
    with torch.inference_mode():
        model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # EOS must not end a benchmark early
            do_sample=False,
            streamer=streamer,
            pad_token_id=0,
        )
    times = streamer.times
    if len(times) != new_tokens + 1:
        raise RuntimeError(f"expected {new_tokens + 1} streamer calls (prompt + tokens), got {len(times)}")
    steps = [b - a for a, b in zip(times[1:-1], times[2:], strict=True)]
    return GenerateTiming(prefill_s=times[1] - times[0], step_s=steps)


def load_reference(model: BenchModel) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model.path, dtype=model.dtype).eval()


@dataclass
class SplitCompute:
    """Seconds spent by each part of one step when the split runs locally (client + spans)."""

    client_s: float
    spans_s: list[float]

    @property
    def total_s(self) -> float:
        return self.client_s + sum(self.spans_s)


class LocalSplit:
    """The client part and the spans of one split, loaded through the model-family adapter."""

    def __init__(self, model: BenchModel, cuts: list[int]) -> None:
        from bloombee_core.model import load_config
        from bloombee_core.registry import load_plugins

        config = load_config(model.path)
        family = load_plugins().family_for(config)
        self.client = family.load_client(model.path, config, model.dtype)
        self.spans = [
            family.load_span(model.path, config, a, b, model.dtype)
            for a, b in zip(cuts[:-1], cuts[1:], strict=True)
        ]

    @torch.inference_mode()
    def _step(
        self, ids: torch.Tensor, mask: torch.Tensor, caches: list[Any]
    ) -> tuple[torch.Tensor, SplitCompute]:
        length = ids.shape[1]
        position_ids = (mask.long().cumsum(-1) - 1)[:, -length:]
        t0 = time.perf_counter()
        hidden = self.client.embed(ids)
        client = time.perf_counter() - t0
        spans = []
        for span, cache in zip(self.spans, caches, strict=True):
            t = time.perf_counter()
            hidden = span(hidden, position_ids=position_ids, attention_mask=mask, cache=cache)
            spans.append(time.perf_counter() - t)
        t = time.perf_counter()
        next_ids = self.client.logits(hidden[:, -1:]).argmax(-1)
        client += time.perf_counter() - t
        return next_ids, SplitCompute(client, spans)

    def run(self, input_ids: torch.Tensor, new_tokens: int) -> tuple[SplitCompute, list[SplitCompute]]:
        """Prefill then ``new_tokens - 1`` cached decode steps; the cost of each part of each step."""
        batch, prompt = input_ids.shape
        caches = [span.new_cache(batch, prompt + new_tokens) for span in self.spans]
        mask = torch.ones_like(input_ids)
        ids, prefill = self._step(input_ids, mask, caches)
        steps = []
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            ids, cost = self._step(ids, mask, caches)
            steps.append(cost)
        return prefill, steps


def median_split(costs: list[SplitCompute]) -> SplitCompute:
    """Part-wise medians (robust to the odd slow step on a shared machine)."""
    return SplitCompute(
        client_s=statistics.median(c.client_s for c in costs),
        spans_s=[statistics.median(c.spans_s[i] for c in costs) for i in range(len(costs[0].spans_s))],
    )
