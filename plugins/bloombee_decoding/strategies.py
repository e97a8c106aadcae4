"""Built-in decoding strategies: ``greedy`` and ``sampling``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

from pydantic import Field

from bloombee_core.decoding import DecodingStrategy
from bloombee_core.plugin import PluginOptions


class GreedyDecoding(DecodingStrategy):
    """Always the most likely token: output equals local ``transformers`` token for token."""

    name: ClassVar[str] = "greedy"
    description: ClassVar[str] = "most likely token at every step (deterministic)"

    def generation_kwargs(self) -> dict[str, Any]:
        return {"do_sample": False, "num_beams": 1}


class SamplingOptions(PluginOptions):
    # Defaults are transformers' own, so "sampling" without options matches generate(do_sample=True).
    temperature: float = Field(default=1.0, gt=0.0, description="logits are divided by this")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus mass kept; 1.0 keeps all")
    top_k: int = Field(default=50, ge=0, description="most likely tokens kept; 0 keeps all")
    seed: int | None = Field(
        default=None, ge=0, description="seeds every generate call, so equal inputs give equal outputs"
    )


class SamplingDecoding(DecodingStrategy):
    """Multinomial sampling with temperature, top-p and top-k.

    With ``seed`` set, each ``generate`` call runs in a forked torch RNG seeded with it: the same
    prompt gives the same tokens every time, exactly what ``torch.manual_seed(seed)`` followed by
    ``generate(do_sample=True, ...)`` gives locally, and the caller's random state is left as it was.
    """

    name: ClassVar[str] = "sampling"
    description: ClassVar[str] = "multinomial sampling (temperature, top_p, top_k, seed)"
    Options: ClassVar[type[PluginOptions]] = SamplingOptions

    def generation_kwargs(self) -> dict[str, Any]:
        options = self.options
        return {
            "do_sample": True,
            "num_beams": 1,
            "temperature": options.temperature,
            "top_p": options.top_p,
            "top_k": options.top_k,
        }

    @contextlib.contextmanager
    def random_state(self) -> Iterator[None]:
        if self.options.seed is None:
            yield
            return
        import torch

        # The logits may live on a GPU: fork (and seed) its generator as well as the CPU one.
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.options.seed)
            yield


BUILTIN_STRATEGIES: list[type[DecodingStrategy]] = [GreedyDecoding, SamplingDecoding]
