"""Streaming one unit's offloaded weights through the device for its forward (see
:mod:`bloombee_core.offload`, which places spans and installs these hooks)."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from bloombee_core.model.disk_files import WeightsFile, in_background

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger("bloombee")

__all__ = ["StreamedWeights", "pinned"]


class StreamedWeights:
    """Brings one unit's streamed weights to the device before its forward and drops them after.

    The unit's modules get a device copy of each streamed parameter for the duration of the forward
    and their original parameter (whose data is the CPU or memory-mapped copy) back afterwards.
    Swapping the parameter rather than its ``.data`` works for any pair of devices, and keeps the
    parameter objects the rest of the program holds unchanged at rest. Forwards of one unit that
    overlap (two threads on one CUDA stream) share one copy: it is dropped when the last of them ends.

    While a unit computes, the next streamed unit's weights are fetched (``next`` links the units in
    forward order, the last one back to the first for the next forward): copied on a side stream on
    CUDA, paged in from disk by a background thread on CPU.
    """

    def __init__(
        self,
        owners: list[tuple[nn.Module, str, nn.Parameter]],
        device: torch.device,
        disk: WeightsFile | None,
    ) -> None:
        self.owners = owners  # (module, attribute name, original parameter); shared weights appear twice
        self.device = device
        self.disk = disk
        self.users = 0
        self.lock = threading.Lock()
        self.next: StreamedWeights | None = None
        self.copy_stream: torch.cuda.Stream | None = None  # set for CUDA when prefetching
        self.page_ahead = False  # set for a CPU device when prefetching
        self.wanted = False  # a read-ahead of the disk pages is queued
        self.prefetched: tuple[dict[int, nn.Parameter], torch.cuda.Event] | None = None

    def _copies(self) -> dict[int, nn.Parameter]:
        # From pinned memory the copy is asynchronous but ordered on the current stream, before the
        # kernels that read the weights; on a CPU device .to() returns the (mapped) tensor itself.
        from torch import nn

        copies: dict[int, nn.Parameter] = {}
        for _, _, param in self.owners:
            if id(param) not in copies:
                device_data = param.data.to(self.device, non_blocking=True)
                copies[id(param)] = nn.Parameter(device_data, requires_grad=param.requires_grad)
        return copies

    def prefetch(self) -> None:
        """Start fetching this unit's weights, unless they are in use or fetched already."""
        if self.page_ahead:
            if self.disk is not None:
                with self.lock:
                    if self.users or self.wanted:
                        return
                    self.wanted = True
                in_background(self._page_in)
            return
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

    def _page_in(self) -> None:
        # Under the lock, and only while still wanted: a read-ahead that came too late (the unit has
        # run and dropped its pages since) must not bring them back until its next forward.
        with self.lock:
            if self.wanted and not self.users and self.disk is not None:
                self.disk.page_in()
            self.wanted = False

    def load(self, module: nn.Module, args: Any) -> None:
        import torch

        with self.lock:
            self.wanted = False
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
            if self.disk is not None:
                # The forward read the mapped pages (on CPU) or copied them (CUDA): out of RAM again.
                self.disk.drop()


def pinned(tensor: torch.Tensor) -> torch.Tensor:
    """A page-locked copy, so host-to-device copies are asynchronous; pageable if pinning is refused."""
    try:
        return tensor.pin_memory()
    except RuntimeError as error:  # e.g. a locked-memory limit (ulimit -l) or a sandbox without it
        logger.warning(
            "cannot pin %d bytes of streamed weights (%s); copies will be synchronous", tensor.nbytes, error
        )
        return tensor
