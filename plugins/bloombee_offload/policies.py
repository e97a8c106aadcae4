"""Built-in offload policies: ``none`` (everything on the device) and ``percent``."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator

from bloombee_core.offload import UNLIMITED, OffloadPolicy
from bloombee_core.plugin import PluginOptions


class NoOffload(OffloadPolicy):
    """Every weight and cache layer stays on the device: fastest, needs the whole span in device memory."""

    name: ClassVar[str] = "none"
    description: ClassVar[str] = "all weights and KV cache resident on the device"


def _percent(description: str, default: int) -> int:
    return Field(default=default, ge=0, le=100, description=description)


class PercentOptions(PluginOptions):
    weights_on_device: int = _percent("percent of the span's weight bytes kept on the compute device", 100)
    weights_on_disk: int = _percent(
        "percent of the span's weight bytes memory-mapped from disk (the rest waits in CPU memory)", 0
    )
    kv_on_device: int = _percent("percent of the span's KV-cache layers kept on the compute device", 100)
    kv_on_disk: int = _percent(
        "percent of the span's KV-cache layers memory-mapped from disk (the rest in CPU memory)", 0
    )
    directory: Path | None = Field(
        default=None, description="folder for disk-tier files (default: under the BloomBee cache)"
    )
    prefetch: bool = Field(
        default=True, description="fetch the next block's streamed weights and cache while one computes"
    )

    @model_validator(mode="after")
    def _shares_fit(self) -> PercentOptions:
        for what in ("weights", "kv"):
            device, disk = getattr(self, f"{what}_on_device"), getattr(self, f"{what}_on_disk")
            if device + disk > 100 and f"{what}_on_device" not in self.model_fields_set:
                # only the disk share given: the device keeps the rest
                setattr(self, f"{what}_on_device", device := 100 - disk)
            if device + disk > 100:
                raise ValueError(
                    f"{what}_on_device + {what}_on_disk must be at most 100, got {device} + {disk}"
                )
        return self


class PercentOffload(OffloadPolicy):
    """Keep ``weights_on_device`` percent of the span's weight bytes on the device, ``weights_on_disk``
    percent on disk and the rest in CPU memory; the same for KV-cache layers with ``kv_on_*``.

    Weights are placed in forward order, each in the first tier with room for it (see
    :class:`bloombee_core.offload.SpanPlacer`): the first blocks stay on the device, the last ones on disk.
    """

    name: ClassVar[str] = "percent"
    description: ClassVar[str] = "percentages of weights and KV cache on the device, in CPU memory, on disk"
    Options: ClassVar[type[PluginOptions]] = PercentOptions

    def weight_budgets(self, total_bytes: int) -> tuple[int, int]:
        device = total_bytes * self.options.weights_on_device // 100
        if not self.options.weights_on_disk:
            return device, UNLIMITED  # whatever the device does not hold waits in CPU memory
        return device, total_bytes - device - total_bytes * self.options.weights_on_disk // 100

    def kv_shares(self) -> tuple[int, int]:
        return self.options.kv_on_device, self.options.kv_on_disk

    def prefetch(self) -> bool:
        return self.options.prefetch

    def directory(self) -> Path | None:
        return self.options.directory


BUILTIN_POLICIES: list[type[OffloadPolicy]] = [NoOffload, PercentOffload]
