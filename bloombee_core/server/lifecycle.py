"""A server's life: it measures its span, starts serving (:mod:`bloombee_core.server.dispatch`), keeps its
DHT records fresh while it runs and marks them offline when it stops. It also holds what the requests
share: the span and its views, the open sessions and the cache budget they reserve from."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from bloombee_core.compression import RAW, Compressor
from bloombee_core.server import dispatch
from bloombee_core.server.checks import Limits, SpanChecks, check_values
from bloombee_core.server.compute import ComputeThread, SpanCompute
from bloombee_core.server.sessions import Session
from bloombee_core.server.throughput import measure_throughput
from bloombee_core.swarm import wire
from bloombee_core.swarm.records import ServerRecord, announce
from bloombee_core.swarm.wire import TensorMeta
from bloombee_core.transport import FrameStream, Transport

if TYPE_CHECKING:
    from bloombee_core.model import BlockSpan

logger = logging.getLogger(__name__)


class Server:
    def __init__(
        self,
        transport: Transport,
        span: BlockSpan,
        *,
        model: str,
        model_info: dict[str, Any],
        family_name: str,
        cuts: list[int],
        dtype: torch.dtype,
        cache_budget: int,
        device: str | torch.device = "cpu",
        compressors: Mapping[str, Compressor] | None = None,
        output_compressor: Compressor = RAW,
        public_name: str = "",
        version: str = "",
        limits: Limits | None = None,
        ttl: float = 30.0,
    ) -> None:
        self.transport = transport
        self.span = span
        self.span.requires_grad_(False)
        self.model, self.model_info, self.family_name = model, model_info, family_name
        self.dtype = dtype
        self.device = torch.device(device)
        # per-layer inputs the family needs from the client (Gemma 4): name -> feature size
        self.per_layer_sizes: dict[str, int] = dict(span.family.per_layer_input_sizes(span.config))
        self.cache_budget, self.cache_used = cache_budget, 0
        self.decoders = wire.compressor_table(compressors)
        self.output_compressor = output_compressor
        self.public_name, self.version = public_name, version
        self.limits = limits or Limits()
        self.ttl = ttl
        self.checks = SpanChecks(
            start=span.start,
            end=span.end,
            cuts=frozenset(cuts),
            hidden_size=int(span.config.hidden_size),
            per_layer_sizes=self.per_layer_sizes,
            num_blocks=int(span.family.num_blocks(span.config)),
            limits=self.limits,
        )
        self.compute = SpanCompute(self.device, dtype, self.per_layer_sizes)
        self.compute_thread = ComputeThread()
        self.sessions: dict[str, Session] = {}
        self.throughput = 0.0
        self._views: dict[tuple[int, int], BlockSpan] = {}
        self._announcer: asyncio.Task | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        probe = functools.partial(measure_throughput, self.span, self.dtype, self.device)
        self.throughput = await self.compute_thread.run(probe)
        await self.transport.serve(wire.PROTOCOL, functools.partial(dispatch.handle, self))
        await self._announce()
        self._announcer = asyncio.create_task(self._announce_forever())

    async def stop(self) -> None:
        if self._announcer is not None:
            self._announcer.cancel()
        try:
            await asyncio.wait_for(self._announce(state="offline"), 2)
        except Exception:  # noqa: BLE001 - best effort: the records expire anyway
            pass
        self.compute_thread.shutdown()

    def record(self, state: str = "online") -> ServerRecord:
        return ServerRecord(
            peer=self.transport.peer_id,
            start=self.span.start,
            end=self.span.end,
            throughput=self.throughput,
            cache_left=self.cache_budget - self.cache_used,
            dtype=str(self.dtype).removeprefix("torch."),
            family=self.family_name,
            version=self.version,
            public_name=self.public_name,
            state=state,
        )

    def info(self) -> dict[str, Any]:
        return {
            "peer": self.transport.peer_id,
            "model": self.model,
            "start": self.span.start,
            "end": self.span.end,
            "family": self.family_name,
            "dtype": str(self.dtype).removeprefix("torch."),
            "cache_left": self.cache_budget - self.cache_used,
            "throughput": self.throughput,
            "version": self.version,
            "sessions": len(self.sessions),
            "resident_fraction": self._resident_fraction(),
        }

    async def _announce(self, state: str = "online") -> None:
        ttl = self.ttl if state == "online" else 5.0
        ok = await announce(self.transport, self.model, self.record(state), ttl, self.model_info)
        if not ok:
            logger.warning("could not store every DHT record; retrying at the next refresh")

    async def _announce_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self._announce()
            except Exception:  # noqa: BLE001 - keep serving; the next refresh may work
                logger.exception("announcing to the DHT failed")

    def _resident_fraction(self) -> float:
        """Share of the span's weight bytes kept on the device (below 1 with an offload policy)."""
        from bloombee_core.offload import offload_plan

        plan = offload_plan(self.span)
        return float(plan.resident_fraction) if plan is not None else 1.0

    # ---- what requests share ---------------------------------------------------------------------
    def view(self, header: dict[str, Any]) -> BlockSpan:
        """The part of the span a request's ``start``/``end`` name (checked), made once per range."""
        key = self.checks.blocks(header)
        if key not in self._views:
            self._views[key] = self.span.sub_span(*key)
        return self._views[key]

    async def read_inputs(
        self,
        stream: FrameStream,
        metas: list[TensorMeta],
        kind: str,
        view: BlockSpan,
        batch: int | None = None,
        max_mask: int = 0,
    ) -> dict[str, torch.Tensor]:
        """A ``kind`` request's tensors for ``view``: descriptions checked, payloads read, values checked."""
        self.checks.metas(metas, kind, view, batch, max_mask)
        tensors = await wire.read_tensors(stream, metas, self.decoders, self.limits.max_tensor_bytes)
        check_values(tensors)
        return tensors
