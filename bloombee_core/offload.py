"""Offload policies: where a server keeps each block's weights, and the streaming they share.

A policy only chooses which parameters stay resident on the compute device; :func:`place_span`
does the placing for every policy. A streamed parameter lives in CPU memory (pinned when the device
is a GPU, so its copy is asynchronous) and is copied to the device by a forward pre-hook on its
unit — a decoder layer — then dropped again by a forward hook, so at most one unit's streamed
weights occupy device memory at a time.

Forwards through one span run on one CUDA stream (overlapping forwards of a unit share its copy,
which is only ordered before the kernels of the stream that made it). Streamed weights are meant to
be frozen (inference, or fine-tuning methods that train other parameters): each forward uses a
temporary device copy of them, so a gradient for them would be computed for that copy and lost.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bloombee_core.plugin import Plugin

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger("bloombee")

__all__ = ["OffloadPlan", "OffloadPolicy", "offload_plan", "offload_units", "place_span"]

# Where place_span records its plan on the span, so servers can report it without the policy object.
PLAN_ATTRIBUTE = "bloombee_offload_plan"


@dataclass
class OffloadPlan:
    """What a policy decided for one span: bytes kept on the device and bytes streamed per forward."""

    device: torch.device
    resident_bytes: int
    streamed_bytes: int
    streamed_units: int
    torch_hooks: list[Any] = field(default_factory=list, repr=False)  # forward (pre-)hook handles

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + self.streamed_bytes

    @property
    def resident_fraction(self) -> float:
        """Share of the span's parameter bytes resident on the device (1.0 for a span without weights)."""
        return self.resident_bytes / self.total_bytes if self.total_bytes else 1.0


class OffloadPolicy(Plugin):
    """Base of every offload policy (kind ``"offload_policies"``).

    Subclasses set ``name`` and implement :meth:`choose_streamed`; :meth:`apply` places the span.
    """

    def choose_streamed(self, span: nn.Module, units: list[nn.Module]) -> Iterable[nn.Parameter]:
        """The parameters (of ``units``) that should stream instead of staying on the device."""
        raise NotImplementedError

    def prefetch(self) -> bool:
        """Whether, on CUDA, the next unit's streamed weights are copied while the current one computes."""
        return True

    def apply(self, span: nn.Module, device: torch.device) -> nn.Module:
        """Move ``span`` to ``device``, streaming what :meth:`choose_streamed` picks; returns the span."""
        import torch

        units = offload_units(span)
        place_span(span, torch.device(device), self.choose_streamed(span, units), prefetch=self.prefetch())
        return span


def offload_units(span: nn.Module) -> list[nn.Module]:
    """The modules whose weights move together: the span's ``layers`` if it has them, else its children."""
    from torch import nn

    layers = getattr(span, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return list(layers)
    return list(span.children())


def offload_plan(span: nn.Module) -> OffloadPlan | None:
    """The plan :func:`place_span` recorded on ``span``, or None if no policy was applied."""
    return getattr(span, PLAN_ATTRIBUTE, None)


def param_bytes(param: torch.Tensor) -> int:
    return param.numel() * param.element_size()


class _StreamedWeights:
    """Copies one unit's streamed weights to the device before its forward and drops them after.

    The unit's modules get a device copy of each streamed parameter for the duration of the forward
    and their original parameter (whose data is the CPU copy) back afterwards. Swapping the
    parameter rather than its ``.data`` works for any pair of devices, and keeps the parameter
    objects the rest of the program holds unchanged at rest. Forwards of one unit that overlap (two
    threads on one CUDA stream) share one copy: it is dropped when the last of them ends.

    On CUDA, while a unit computes, the next streamed unit's weights are copied on a side stream
    (``next`` links the units in forward order, the last one back to the first for the next
    forward), so copies overlap compute; at most two units' streamed weights are on the device.
    """

    def __init__(self, owners: list[tuple[nn.Module, str, nn.Parameter]], device: torch.device) -> None:
        self.owners = owners  # (module, attribute name, original parameter); shared weights appear twice
        self.device = device
        self.users = 0
        self.lock = threading.Lock()
        self.next: _StreamedWeights | None = None
        self.copy_stream: torch.cuda.Stream | None = None  # set for CUDA when prefetching
        self.prefetched: tuple[dict[int, nn.Parameter], torch.cuda.Event] | None = None

    def _copies(self) -> dict[int, nn.Parameter]:
        # From pinned memory the copy is asynchronous but ordered on the current stream, before the
        # kernels that read the weights; on a CPU device .to() returns the CPU tensor itself.
        from torch import nn

        copies: dict[int, nn.Parameter] = {}
        for _, _, param in self.owners:
            if id(param) not in copies:
                device_data = param.data.to(self.device, non_blocking=True)
                copies[id(param)] = nn.Parameter(device_data, requires_grad=param.requires_grad)
        return copies

    def prefetch(self) -> None:
        """Start copying this unit's weights on the side stream, unless they are there already."""
        import torch

        assert self.copy_stream is not None
        with self.lock:
            if self.users or self.prefetched is not None:
                return
            with torch.cuda.stream(self.copy_stream):
                copies = self._copies()
                done = torch.cuda.Event()
                done.record(self.copy_stream)
            self.prefetched = (copies, done)

    def load(self, module: nn.Module, args: Any) -> None:
        import torch

        with self.lock:
            self.users += 1
            if self.users > 1:
                return
            prefetched, self.prefetched = self.prefetched, None
            if prefetched is not None and not torch.is_inference_mode_enabled():
                # Copies made under inference_mode cannot take part in autograd: copy afresh.
                if any(copy.is_inference() for copy in prefetched[0].values()):
                    prefetched = None
            if prefetched is not None:
                copies, done = prefetched
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(done)
                for copy in copies.values():
                    # Made on the side stream, used on this one: the allocator must not hand the
                    # memory out again before this stream is done with it.
                    copy.record_stream(compute)
            else:
                copies = self._copies()
            for owner, name, param in self.owners:
                owner._parameters[name] = copies[id(param)]
        if self.next is not None and self.next is not self:
            self.next.prefetch()

    def release(self, module: nn.Module, args: Any, output: Any) -> None:
        with self.lock:
            self.users -= 1
            if self.users > 0:
                return
            # Dropping the last reference returns the device copy to the caching allocator, which
            # only reuses it after the kernels queued on this stream are done with it.
            for owner, name, param in self.owners:
                owner._parameters[name] = param


def place_span(
    span: nn.Module, device: torch.device, streamed: Iterable[nn.Parameter], prefetch: bool = True
) -> OffloadPlan:
    """Put every parameter and buffer of ``span`` on ``device`` except ``streamed`` parameters,
    which go to (pinned) CPU memory and visit the device only during their unit's forward.

    With ``prefetch`` (CUDA only), the next unit's streamed weights are copied on a side stream
    while the current unit computes.

    :raises ValueError: a policy was already applied to this span, or a streamed parameter is not in
        one of its units (only unit weights can stream: nothing would bring the others in).
    """
    import torch

    if offload_plan(span) is not None:
        raise ValueError(
            "an offload policy was already applied to this span; build a fresh span to change it"
        )
    streamed_ids = {id(param) for param in streamed}
    units = offload_units(span)
    unit_of = {id(module): index for index, unit in enumerate(units) for module in unit.modules()}
    owners: list[list[tuple[nn.Module, str, nn.Parameter]]] = [[] for _ in units]
    placed: dict[int, nn.Parameter] = {}  # shared weights are moved (and counted) once
    plan = OffloadPlan(device=device, resident_bytes=0, streamed_bytes=0, streamed_units=0)
    for module in span.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in streamed_ids:
                if id(param) not in placed:
                    placed[id(param)] = _moved(param, device)
                    plan.resident_bytes += param_bytes(param)
                module._parameters[name] = placed[id(param)]
                continue
            unit = unit_of.get(id(module))
            if unit is None:
                raise ValueError(
                    f"parameter {name!r} of shape {list(param.shape)} cannot stream: it belongs to no unit "
                    "of the span (units are its 'layers' or its children)"
                )
            if id(param) not in placed:
                home = param.data.to("cpu")
                param.data = _pinned(home) if device.type == "cuda" else home
                placed[id(param)] = param
                plan.streamed_bytes += param_bytes(param)
            owners[unit].append((module, name, param))
    streamers: list[_StreamedWeights] = []
    for unit, unit_owners in zip(units, owners, strict=True):
        if unit_owners:
            weights = _StreamedWeights(unit_owners, device)
            streamers.append(weights)
            plan.torch_hooks.append(unit.register_forward_pre_hook(weights.load))
            # always_call: a forward that raises must still give the device memory back.
            plan.torch_hooks.append(unit.register_forward_hook(weights.release, always_call=True))
            plan.streamed_units += 1
    if prefetch and device.type == "cuda" and streamers:
        copy_stream = torch.cuda.Stream(device)
        for weights, following in zip(streamers, streamers[1:] + streamers[:1], strict=True):
            weights.copy_stream, weights.next = copy_stream, following
    for module in span.modules():
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, buffer.to(device))
    setattr(span, PLAN_ATTRIBUTE, plan)
    return plan


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    """A page-locked copy, so host-to-device copies are asynchronous; pageable if pinning is refused."""
    try:
        return tensor.pin_memory()
    except RuntimeError as error:  # e.g. a locked-memory limit (ulimit -l) or a sandbox without it
        logger.warning(
            "cannot pin %d bytes of streamed weights (%s); copies will be synchronous", tensor.nbytes, error
        )
        return tensor


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
