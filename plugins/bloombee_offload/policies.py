"""Built-in offload policies: ``none`` (all weights on the device) and ``percent``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from bloombee_core.offload import OffloadPolicy, param_bytes
from bloombee_core.plugin import PluginOptions

if TYPE_CHECKING:
    from torch import nn


class NoOffload(OffloadPolicy):
    """Every weight stays on the device: fastest, needs the whole span's weights in device memory."""

    name: ClassVar[str] = "none"
    description: ClassVar[str] = "all weights resident on the device"

    def choose_streamed(self, span: nn.Module, units: list[nn.Module]) -> Iterable[nn.Parameter]:
        return []


class PercentOptions(PluginOptions):
    weights_on_device: int = Field(
        default=100, ge=0, le=100, description="percent of the span's parameter bytes kept on the device"
    )
    prefetch: bool = Field(
        default=True, description="on CUDA, copy the next block's streamed weights while one computes"
    )


class PercentOffload(OffloadPolicy):
    """Keep ``weights_on_device`` percent of the span's parameter bytes resident; stream the rest.

    Parameters are taken in order (first unit first) and kept while they fit in the budget, so the
    first units stay whole on the device and the remaining ones stream; a parameter too large for
    what is left of the budget streams while smaller later ones may still fit.
    """

    name: ClassVar[str] = "percent"
    description: ClassVar[str] = "a percentage of weight bytes resident, the rest streamed per forward"
    Options: ClassVar[type[PluginOptions]] = PercentOptions

    def prefetch(self) -> bool:
        return self.options.prefetch

    def choose_streamed(self, span: nn.Module, units: list[nn.Module]) -> list[nn.Parameter]:
        unit_params: list[nn.Parameter] = []
        seen: set[int] = set()
        for unit in units:
            for param in unit.parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    unit_params.append(param)
        # Weights outside the units cannot stream; they count against the budget first.
        outside = sum(param_bytes(p) for p in span.parameters() if id(p) not in seen)
        total = outside + sum(param_bytes(p) for p in unit_params)
        budget = total * self.options.weights_on_device // 100 - outside
        streamed = []
        for param in unit_params:
            size = param_bytes(param)
            if size <= budget:
                budget -= size
            else:
                streamed.append(param)
        return streamed


BUILTIN_POLICIES: list[type[OffloadPolicy]] = [NoOffload, PercentOffload]
