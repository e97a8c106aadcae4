"""Offload policies: where a server keeps each block's weights and KV cache, and the streaming they share.

Weights live in one of three tiers: on the compute device (resident), in CPU memory (pinned when the
device is a GPU, so its copy is asynchronous), or on disk (a memory-mapped file per unit, paged in
for the unit's forward and dropped from RAM after it). A policy only says how many bytes each tier
may hold (:meth:`OffloadPolicy.weight_budgets`); :class:`SpanPlacer` assigns every parameter, in
forward order, to the first tier with room for it — so the first units stay resident and the last
ones live on disk. On a CPU device the device *is* CPU memory: the CPU tier is resident there.

A streamed unit — a decoder layer with weights in the CPU or disk tier — gets a forward pre-hook that
puts device copies of those weights in place (on a CPU device, the memory-mapped tensors themselves)
and a forward hook that puts the originals back and drops the unit's disk pages from RAM, so at most
two units' streamed weights occupy memory at a time: the one computing and the next one, fetched
ahead (a side CUDA stream on a GPU, a background thread paging in the file on CPU).

Forwards through one span run on one CUDA stream (overlapping forwards of a unit share its copy,
which is only ordered before the kernels of the stream that made it). Streamed weights are meant to
be frozen (inference, or fine-tuning methods that train other parameters): each forward uses a
temporary device copy of them, so a gradient for them would be computed for that copy and lost.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bloombee_core.plugin import Plugin

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger("bloombee")

__all__ = [
    "OffloadPlan",
    "OffloadPolicy",
    "SpanPlacer",
    "offload_plan",
    "offload_units",
    "place_span",
]

# Where the placer records its plan on the span, so servers can report it without the policy object.
PLAN_ATTRIBUTE = "bloombee_offload_plan"
UNLIMITED = 1 << 62  # a tier budget with no limit


@dataclass
class OffloadPlan:
    """Where one span's weights ended up: bytes per tier, and how many units stream per forward."""

    device: torch.device
    resident_bytes: int = 0  # on the compute device
    cpu_bytes: int = 0  # in CPU memory, copied to the device per forward (a GPU device only)
    disk_bytes: int = 0  # memory-mapped from disk, paged in per forward
    streamed_units: int = 0
    largest_unit_bytes: int = 0  # the most streamed bytes one unit brings in (staging: twice this)
    kv: dict[str, int] = field(default_factory=dict)  # KV-cache layers per tier ("device"/"cpu"/"disk")
    torch_hooks: list[Any] = field(default_factory=list, repr=False)  # forward (pre-)hook handles

    @property
    def streamed_bytes(self) -> int:
        return self.cpu_bytes + self.disk_bytes

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + self.streamed_bytes

    @property
    def resident_fraction(self) -> float:
        """Share of the span's parameter bytes resident on the device (1.0 for a span without weights)."""
        return self.resident_bytes / self.total_bytes if self.total_bytes else 1.0

    def tiers(self) -> dict[str, Any]:
        """What a server reports of this plan (info, DHT record, ``bloombee status``)."""
        return {
            "device": str(self.device),
            "weights": {"device": self.resident_bytes, "cpu": self.cpu_bytes, "disk": self.disk_bytes},
            "kv_layers": dict(self.kv),
        }


class OffloadPolicy(Plugin):
    """Base of every offload policy (kind ``"offload_policies"``).

    Subclasses set ``name`` and override :meth:`weight_budgets` (and :meth:`kv_shares`, :meth:`prefetch`,
    :meth:`directory`); :meth:`apply` places a loaded span, :meth:`placer` places one while it loads.
    """

    def weight_budgets(self, total_bytes: int) -> tuple[int, int]:
        """Of a span's ``total_bytes`` of weights: the bytes that may stay on the device and the bytes
        that may wait in CPU memory (``UNLIMITED``: any); whatever does not fit goes to disk."""
        return total_bytes, UNLIMITED

    def kv_shares(self) -> tuple[int, int]:
        """Percent of the span's KV-cache layers kept on the device and on disk (the rest in CPU memory)."""
        return 100, 0

    def prefetch(self) -> bool:
        """Whether the next unit's streamed weights (and cache layer) are fetched while one computes."""
        return True

    def directory(self) -> Path | None:
        """Where disk-tier files go (None: a folder under the BloomBee cache)."""
        return None

    def placer(self, device: torch.device, total_bytes: int) -> SpanPlacer:
        """A placer for a span of ``total_bytes`` of weights, fed unit by unit as the span loads."""
        device_budget, cpu_budget = self.weight_budgets(total_bytes)
        return SpanPlacer(device, device_budget, cpu_budget, self.directory(), self.prefetch())

    def apply(self, span: nn.Module, device: torch.device) -> nn.Module:
        """Move ``span`` to ``device`` placing its weights and KV cache by this policy; returns the span."""
        import torch

        if offload_plan(span) is not None:
            raise ValueError(
                "an offload policy was already applied to this span; build a fresh span to change it"
            )
        device = torch.device(device)
        total = sum(param_bytes(p) for p in _unique_params(span))
        place_span(span, self.placer(device, total), self.kv_shares())
        return span


def offload_units(span: nn.Module) -> list[nn.Module]:
    """The modules whose weights move together: the span's ``layers`` if it has them, else its children."""
    from torch import nn

    layers = getattr(span, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return list(layers)
    return list(span.children())


def offload_plan(span: nn.Module) -> OffloadPlan | None:
    """The plan recorded on ``span`` when it was placed, or None if no policy was applied."""
    return getattr(span, PLAN_ATTRIBUTE, None)


def param_bytes(param: torch.Tensor) -> int:
    return param.numel() * param.element_size()


def _unique_params(module: nn.Module) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for param in module.parameters():
        seen.setdefault(id(param), param)
    return list(seen.values())


class SpanPlacer:
    """Places a span's weights unit by unit — as the span loads, so that no more than one unit beyond
    the resident share is ever in memory — then installs the streaming hooks (:meth:`finish`).

    Each parameter, in forward order, goes to the first tier with room left: the device
    (``device_budget`` bytes), CPU memory (``cpu_budget``; on a CPU device this *is* the device), else
    disk. A parameter too large for what a tier has left goes further down while smaller later ones
    may still fit.
    """

    def __init__(
        self,
        device: torch.device,
        device_budget: int,
        cpu_budget: int,
        directory: Path | None = None,
        prefetch: bool = True,
    ) -> None:
        import torch

        self.device = torch.device(device)
        if self.device.type == "cpu":  # CPU memory is the device: one tier
            device_budget, cpu_budget = device_budget + cpu_budget, 0
        self.left = {"device": max(device_budget, 0), "cpu": max(cpu_budget, 0)}
        self.all_in_memory = cpu_budget >= UNLIMITED or device_budget >= UNLIMITED
        self.base = directory
        self.prefetch = prefetch
        self.plan = OffloadPlan(device=self.device)
        self.placed: dict[int, nn.Parameter] = {}  # shared weights are moved (and counted) once
        self.streamers: list[tuple[nn.Module, Any]] = []  # (unit, its StreamedWeights)

    def limit_device(self, limit: int) -> None:
        """Keep at most ``limit`` bytes on the device (a memory budget); on a GPU what no longer fits
        there waits in CPU memory, on a CPU device it goes to disk."""
        excess = self.left["device"] - max(limit, 0)
        if excess > 0:
            self.left["device"] -= excess
            if self.device.type != "cpu":
                # all of it, whichever parameters the device budget ends up holding; none to disk
                # unless the policy itself asked for some
                self.left["cpu"] = UNLIMITED if self.all_in_memory else self.left["cpu"] + excess

    def _tier(self, size: int) -> str:
        for tier in ("device", "cpu"):
            if size <= self.left[tier]:
                self.left[tier] -= size
                return tier
        return "disk"

    def add_unit(self, unit: nn.Module) -> None:
        """Place ``unit``'s parameters and buffers (a unit's weights move together)."""
        from bloombee_core.model.disk_files import WeightsFile, offload_directory
        from bloombee_core.model.weight_stream import StreamedWeights, pinned

        owners: list[tuple[nn.Module, str, nn.Parameter]] = []
        to_disk: list[nn.Parameter] = []
        for module in unit.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if id(param) in self.placed:
                    moved = self.placed[id(param)]
                    if moved.device != self.device:  # streamed in an earlier unit: this one needs it too
                        owners.append((module, name, moved))
                    module._parameters[name] = moved
                    continue
                tier = self._tier(param_bytes(param))
                if tier == "device":
                    self.placed[id(param)] = _moved(param, self.device)
                    self.plan.resident_bytes += param_bytes(param)
                    module._parameters[name] = self.placed[id(param)]
                    continue
                home = param.data.to("cpu")
                param.data = pinned(home) if tier == "cpu" and self.device.type == "cuda" else home
                self.placed[id(param)] = param
                if tier == "cpu":
                    self.plan.cpu_bytes += param_bytes(param)
                else:
                    self.plan.disk_bytes += param_bytes(param)
                    to_disk.append(param)
                owners.append((module, name, param))
            for name, buffer in module.named_buffers(recurse=False):
                setattr(module, name, buffer.to(self.device))
        disk = None
        if to_disk:
            disk = WeightsFile(offload_directory(self.base), [p.data for p in to_disk])
            for param, view in zip(to_disk, disk.views, strict=True):
                param.data = view  # the RAM copy goes with the last reference to it
            disk.drop()
        if owners:
            weights = StreamedWeights(owners, self.device, disk)
            self.streamers.append((unit, weights))
            streamed = sum(param_bytes(p) for p in {id(p): p for _, _, p in owners}.values())
            self.plan.largest_unit_bytes = max(self.plan.largest_unit_bytes, streamed)

    def finish(self, span: nn.Module, kv_shares: tuple[int, int] = (100, 0)) -> OffloadPlan:
        """Place what is outside the units (resident), install the hooks, record the plan on ``span``.

        :raises ValueError: a policy was already applied to this span.
        """
        import torch

        if offload_plan(span) is not None:
            raise ValueError(
                "an offload policy was already applied to this span; build a fresh span to change it"
            )
        done = {id(p) for p in self.placed.values()}
        for module in span.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if id(param) in done:
                    continue
                if id(param) in self.placed:
                    module._parameters[name] = self.placed[id(param)]
                else:  # outside every unit: always resident
                    self.placed[id(param)] = _moved(param, self.device)
                    self.plan.resident_bytes += param_bytes(param)
                    module._parameters[name] = self.placed[id(param)]
            for name, buffer in module.named_buffers(recurse=False):
                setattr(module, name, buffer.to(self.device))
        streamers = [weights for _, weights in self.streamers]
        for unit, weights in self.streamers:
            self.plan.torch_hooks.append(unit.register_forward_pre_hook(weights.load))
            # always_call: a forward that raises must still give the memory back.
            self.plan.torch_hooks.append(unit.register_forward_hook(weights.release, always_call=True))
        self.plan.streamed_units = len(streamers)
        if self.prefetch and streamers:
            copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            for weights, following in zip(streamers, streamers[1:] + streamers[:1], strict=True):
                weights.next = following
                weights.copy_stream = copy_stream
                weights.page_ahead = copy_stream is None
        _place_kv(span, self.plan, kv_shares, self.base, self.prefetch)
        setattr(span, PLAN_ATTRIBUTE, self.plan)
        return self.plan


def _place_kv(
    span: nn.Module, plan: OffloadPlan, shares: tuple[int, int], base: Path | None, prefetch: bool
) -> None:
    """Tell a block span where its sessions' KV caches live (see :mod:`bloombee_core.model.kv_tiers`)."""
    from bloombee_core.model.span import BlockSpan

    if not isinstance(span, BlockSpan):
        return
    on_device, on_disk = shares
    if (on_device, on_disk) != (100, 0):
        from bloombee_core.model.disk_files import offload_directory
        from bloombee_core.model.kv_tiers import kv_placement

        folder = offload_directory(base) if on_disk else Path(tempfile.gettempdir())
        span.kv_placement = kv_placement(span, on_device, on_disk, folder, prefetch, device=plan.device)
    placement = getattr(span, "kv_placement", None)
    owned = [i for i in range(span.start, span.end) if span.family.owns_kv(span.config, i)]
    tiers = [placement.tier(i) if placement is not None else "device" for i in owned]
    plan.kv = {tier: tiers.count(tier) for tier in ("device", "cpu", "disk")}


def place_span(span: nn.Module, placer: SpanPlacer, kv_shares: tuple[int, int] = (100, 0)) -> OffloadPlan:
    """Place an already loaded ``span`` unit by unit with ``placer`` (see :class:`SpanPlacer`)."""
    for unit in offload_units(span):
        placer.add_unit(unit)
    return placer.finish(span, kv_shares)


def _moved(param: nn.Parameter, device: torch.device) -> nn.Parameter:
    """``param`` on ``device``: the same object where its storage can be swapped (CPU <-> CUDA), as
    ``nn.Module.to`` does, else a new parameter (e.g. for the meta device)."""
    import torch
    from torch import nn

    data = param.data.to(device)
    if data is param.data:
        return param
    if torch._has_compatible_shallow_copy_type(param.data, data):
        param.data = data
        return param
    return nn.Parameter(data, requires_grad=param.requires_grad)
