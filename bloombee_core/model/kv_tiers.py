"""A session's KV cache kept partly off the compute device: per layer on the device, in (pinned) CPU
memory, or in a memory-mapped file.

A :class:`KVPlacement` (chosen by the offload policy, see :func:`kv_placement`) names the tier of each
owned layer; :meth:`BlockSpan.new_cache <bloombee_core.model.span.BlockSpan.new_cache>` gives every layer
kept off the device a :class:`TieredLayer`. Such a layer preallocates its home storage for the session's
``max_length`` tokens, writes each step's new tokens into it, and hands attention the first ``length``
tokens: a view of the home on a CPU device, a device copy elsewhere.

Memory is bounded per layer, not per step: when one tiered layer of a cache is updated its attention
is about to run, so the tiered layer used before it (whose attention is done) gives its pages back —
the device copy of a CPU-tier layer, the resident pages of a disk-tier file — and the next tiered layer
is read ahead. :meth:`SpanCache.settle <bloombee_core.model.span.SpanCache.settle>` gives back the rest
after a forward; :meth:`SpanCache.close <bloombee_core.model.span.SpanCache.close>` deletes the files.

Disk-tier files are :class:`~bloombee_core.model.disk_files.LayerFile` s. Sliding-window layers always stay
on the device: their window bounds them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicLayer

from bloombee_core.family import SLIDING
from bloombee_core.model.disk_files import LayerFile, in_background

if TYPE_CHECKING:
    from transformers.cache_utils import Cache

    from bloombee_core.model.span import BlockSpan

logger = logging.getLogger("bloombee")

DEVICE, CPU, DISK = "device", "cpu", "disk"
TIERS = (DEVICE, CPU, DISK)

__all__ = ["CPU", "DEVICE", "DISK", "TIERS", "KVPlacement", "TieredLayer", "kv_placement"]


@dataclass(frozen=True)
class KVPlacement:
    """Where each owned layer's keys/values live between uses."""

    device: torch.device  # the compute device
    # global layer indices kept in (pinned) CPU memory, copied to the device for their layer (on a CPU
    # device these are simply resident)
    on_cpu: frozenset[int]
    # kept in memory-mapped files under ``directory``, paged in for their layer, dropped from RAM after
    on_disk: frozenset[int]
    directory: Path  # one file per session-layer, removed when the cache is closed
    prefetch: bool = True  # read the next tiered layer ahead (CPU: a background thread; CUDA: a side stream)

    def tier(self, index: int) -> str:
        """``"device"``, ``"cpu"`` or ``"disk"``: where layer ``index`` keeps its keys and values."""
        if index in self.on_disk:
            return DISK
        return CPU if index in self.on_cpu else DEVICE


def kv_placement(
    span: BlockSpan,
    on_device: int,
    on_disk: int,
    directory: Path,
    prefetch: bool = True,
    device: torch.device | None = None,
) -> KVPlacement:
    """Keep ``on_device`` percent of ``span``'s KV-owning full-attention layers on the device and
    ``on_disk`` percent on disk, the rest in CPU memory: the first layers stay on the device, the last
    ones go to disk. ``device``: the compute device (default: where the span's buffers, or else its
    parameters, are).

    :raises ValueError: a percent is outside 0..100 or the two add up to more than 100.
    """
    for name, value in (("on_device", on_device), ("on_disk", on_disk)):
        if not 0 <= value <= 100:
            raise ValueError(f"{name} is a percent of KV-cache layers, between 0 and 100; got {value}")
    if on_device + on_disk > 100:
        raise ValueError(
            f"on_device + on_disk must be at most 100 percent (the rest is kept in CPU memory); "
            f"got {on_device} + {on_disk}"
        )
    layers = tierable_layers(span)
    count = len(layers)
    kept = _share(count, on_device)
    paged = min(_share(count, on_disk), count - kept)
    if device is None:
        tensor = next(span.buffers(), None)
        tensor = tensor if tensor is not None else next(span.parameters())
        device = tensor.device
    return KVPlacement(
        device=torch.device(device),
        on_cpu=frozenset(layers[kept : count - paged]),
        on_disk=frozenset(layers[count - paged :]),
        directory=Path(directory),
        prefetch=prefetch,
    )


def _share(count: int, percent: int) -> int:
    return (count * percent + 50) // 100  # round half up


def tierable_layers(span: BlockSpan) -> list[int]:
    """The span's layers that may live off the device: those owning a KV cache, sliding ones excepted."""
    family, config = span.family, span.config
    return [
        i
        for i in range(span.start, span.end)
        if family.owns_kv(config, i) and family.layer_type(config, i) != SLIDING
    ]


def layer_tiers(span: BlockSpan) -> dict[int, str]:
    """Tier of each of the span's KV-owning layers under its ``kv_placement`` (all ``"device"`` without)."""
    placement = span.kv_placement
    tierable = set(tierable_layers(span)) if placement is not None else set()
    return {
        i: placement.tier(i) if i in tierable else DEVICE
        for i in range(span.start, span.end)
        if span.family.owns_kv(span.config, i)
    }


def install_tiers(span: BlockSpan, kv: Cache, batch_size: int, max_length: int) -> None:
    """Replace, in a new cache ``kv``, every layer that ``span.kv_placement`` keeps off the device by a
    :class:`TieredLayer` (CPU-tier layers only when the device is not the CPU: there they are resident)."""
    placement = span.kv_placement
    if placement is None:
        return
    group = _TierGroup(placement.prefetch)
    dtype = next(span.layers.parameters()).dtype
    for index, tier in layer_tiers(span).items():
        if tier == DEVICE or (tier == CPU and placement.device.type == "cpu"):
            continue
        kv_heads, head_dim = span.family.kv_shape(span.config, index)
        shape = (batch_size, kv_heads, max_length, head_dim)
        layer = TieredLayer(index, tier, shape, dtype, placement, group)
        kv.layers[index] = layer
        group.layers.append(layer)


class TieredLayer(DynamicLayer):
    """A cache layer whose keys and values live in preallocated home storage off the compute device.

    ``keys``/``values`` read as the first ``length`` cached tokens (a view of the home on a CPU device,
    a device copy elsewhere); assigning a tensor to them (as ``SpanCache.keep`` and ``crop`` do) copies
    it into the home. :meth:`update` writes only the new tokens.
    """

    def __init__(
        self,
        index: int,
        tier: str,
        shape: tuple[int, int, int, int],
        dtype: torch.dtype,
        placement: KVPlacement,
        group: _TierGroup,
    ) -> None:
        if tier not in (CPU, DISK):
            raise ValueError(f"a tiered cache layer lives in CPU memory or on disk, not {tier!r}")
        self.index, self.tier, self.shape, self.dtype, self.group = index, tier, shape, dtype, group
        self.remote = placement.device.type != "cpu"  # attention wants device copies
        self.pinned = placement.device.type == "cuda" and tier == CPU
        self.file: LayerFile | None = None
        if tier == DISK:
            self.file = LayerFile(placement.directory, index, shape, dtype)
            self.homes = self.file.views
        else:
            self.homes = [torch.empty(shape, dtype=dtype, pin_memory=self.pinned) for _ in range(2)]
        self.lengths = [0, 0]  # tokens held in the keys' and values' homes
        self.version = 0  # bumped by every write: device copies and read-aheads of older data are stale
        self.copies: dict[int, tuple[int, torch.Tensor]] = {}  # which -> (version, device copy)
        self.ahead: tuple[int, torch.cuda.Stream, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.lock = threading.Lock()  # between a background read-ahead and a release
        self.generation = 0  # bumped by every release: a read-ahead queued before it is cancelled
        self.closed = False
        super().__init__()

    # ---- keys / values -----------------------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor | None:
        return self._read(0)

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._write(0, value)

    @property
    def values(self) -> torch.Tensor | None:
        return self._read(1)

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._write(1, value)

    def _read(self, which: int) -> torch.Tensor | None:
        if not self.is_initialized:
            return None
        view = self.homes[which][:, :, : self.lengths[which]]
        if not self.remote:
            return view
        cached = self.copies.get(which)
        if cached is None or cached[0] != self.version:
            cached = self.version, view.to(self.device, non_blocking=self.pinned)
            self.copies[which] = cached
        return cached[1]

    def _write(self, which: int, value: torch.Tensor | None) -> None:
        self.version += 1
        if value is None or value.numel() == 0:
            self.lengths[which] = 0
            return
        self._check_open()
        self._check_shape(value, "assigned to", 0)
        home = self.homes[which]
        length = value.shape[2]
        if (
            value.device == home.device
            and value.untyped_storage().data_ptr() == home.untyped_storage().data_ptr()
        ):
            if value.data_ptr() == home.data_ptr() and value.stride() == home.stride():
                self.lengths[which] = length  # a prefix of the home itself (crop): nothing to copy
                return
            value = value.clone()  # overlaps the home elsewhere
        self._copy_into(home[:, :, :length], value)
        self.lengths[which] = length

    def _copy_into(self, target: torch.Tensor, source: torch.Tensor) -> None:
        if self.pinned and source.device.type == "cpu":
            torch.cuda.current_stream(self.device).synchronize()  # earlier async reads of the home
        target.copy_(source, non_blocking=self.pinned and source.device.type == "cuda")

    # ---- the transformers layer interface -------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens to the home; the full keys and values (past + new)."""
        self._check_open()
        for name, new, held in (
            ("keys", key_states, self.lengths[0]),
            ("values", value_states, self.lengths[1]),
        ):
            self._check_shape(new, f"new {name} for", held)
            if new.dtype != self.dtype:
                raise ValueError(
                    f"cache layer {self.index} stores {self.dtype}, got new {name} in {new.dtype}"
                )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.group.entering(self)
        prefixes = self._device_prefixes() if self.remote else (None, None)
        self.version += 1
        full = []
        for which, new in enumerate((key_states, value_states)):
            held = self.lengths[which]
            end = held + new.shape[2]
            self._copy_into(self.homes[which][:, :, held:end], new)
            self.lengths[which] = end
            if self.remote:
                tensor = torch.cat([prefixes[which], new], dim=2) if held else new
                self.copies[which] = self.version, tensor
            else:
                tensor = self.homes[which][:, :, :end]
            full.append(tensor)
        return full[0], full[1]

    def get_seq_length(self) -> int:
        return self.lengths[0] if self.is_initialized else 0

    def _check_shape(self, tensor: torch.Tensor, what: str, held: int) -> None:
        batch, heads, capacity, dim = self.shape
        if tensor.ndim != 4 or (tensor.shape[0], tensor.shape[1], tensor.shape[3]) != (batch, heads, dim):
            raise ValueError(
                f"cache layer {self.index} holds [{batch}, {heads}, tokens, {dim}] keys/values, "
                f"got {list(tensor.shape)} {what} it"
            )
        if held + tensor.shape[2] > capacity:
            raise ValueError(
                f"cache layer {self.index} was made for {capacity} tokens; it holds {held} and got "
                f"{tensor.shape[2]} more. Open the session with a larger max_length"
            )

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"cache layer {self.index} belongs to a closed cache; open a new session")

    # ---- paging ------------------------------------------------------------------------------------
    def _device_prefixes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached tokens on the device: the read-ahead copy when it is current, else copied now."""
        ahead, self.ahead = self.ahead, None
        copies = [self.copies.get(which) for which in range(2)]
        if all(copy is not None and copy[0] == self.version for copy in copies):
            return copies[0][1], copies[1][1]  # read through keys/values already (a batched forward)
        if ahead is not None and ahead[0] == self.version:
            _, stream, copies = ahead
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(stream)
            for tensor in copies:
                tensor.record_stream(current)
            return copies
        return tuple(
            self.homes[which][:, :, : self.lengths[which]].to(self.device, non_blocking=self.pinned)
            for which in range(2)
        )

    def read_ahead(self) -> None:
        """Start fetching the cached tokens for this layer's next use; never raises."""
        if not self.is_initialized or self.closed:
            return
        try:
            if self.file is not None:
                generation, lengths = self.generation, list(self.lengths)
                in_background(lambda: self._page_in(generation, lengths))
            elif self.pinned:
                stream = _side_stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    copies = tuple(
                        self.homes[which][:, :, : self.lengths[which]].to(self.device, non_blocking=True)
                        for which in range(2)
                    )
                self.ahead = self.version, stream, copies
        except Exception:  # noqa: BLE001 - a failed read-ahead only costs the wait it would have saved
            logger.debug("KV read-ahead of layer %d failed", self.index, exc_info=True)

    def _page_in(self, generation: int, lengths: list[int]) -> None:
        with self.lock:
            if generation == self.generation and not self.closed and self.file is not None:
                self.file.page_in(lengths)

    def release(self) -> None:
        """Give back what this layer holds only for its use: device copies and resident file pages."""
        with self.lock:
            self.generation += 1
            self.copies.clear()
            self.ahead = None
            if self.file is not None and not self.closed:
                self.file.drop()
        if self.group.last is self:
            self.group.last = None

    def close(self) -> None:
        """Release and delete the home storage; the layer cannot be used afterwards. Idempotent."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.is_initialized = False  # holds nothing now
            self.lengths = [0, 0]
            self.generation += 1
            self.copies.clear()
            self.ahead = None
            self.homes = []
            if self.file is not None:
                self.file.close()

    def held_bytes(self) -> int:
        """Bytes of the tokens cached here (in whichever tier)."""
        batch, heads, _, dim = self.shape
        return sum(self.lengths) * batch * heads * dim * self.dtype.itemsize


class _TierGroup:
    """The tiered layers of one cache, in layer order, and which of them was used last."""

    def __init__(self, prefetch: bool) -> None:
        self.layers: list[TieredLayer] = []
        self.prefetch = prefetch
        self.last: TieredLayer | None = None

    def entering(self, layer: TieredLayer) -> None:
        """``layer``'s attention is about to run: the one before it is done, the one after it is next."""
        if self.last is not None and self.last is not layer:
            self.last.release()
        self.last = layer
        if self.prefetch:
            position = self.layers.index(layer) + 1
            if position < len(self.layers):
                self.layers[position].read_ahead()


_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]
