"""A server's life: it measures its span, starts serving (:mod:`bloombee_core.server.dispatch`), keeps its
DHT records fresh while it runs and marks them offline when it stops. It also holds what the requests
share: the span and its views, the open sessions and the cache budget they reserve from.

A server may move to other blocks (:meth:`Server.move_to`, driven by :mod:`bloombee_core.server.rebalance`)
without interrupting anyone: sessions keep the view of the span they opened on, so the old span's
weights stay until its last session closes, and only then are they dropped."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from bloombee_core.compression import RAW, Compressor
from bloombee_core.server import dispatch
from bloombee_core.server.adapters import AdapterStore
from bloombee_core.server.batching import StepBatcher
from bloombee_core.server.budget import MemoryPlan, peak_memory
from bloombee_core.server.checks import Limits, SpanChecks, check_values
from bloombee_core.server.compute import ComputeThread, SpanCompute
from bloombee_core.server.sessions import Session
from bloombee_core.server.throughput import measure_row_cost, measure_throughput
from bloombee_core.swarm import wire
from bloombee_core.swarm.links import Links
from bloombee_core.swarm.records import ServerRecord, announce, fetch_servers, withdraw
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
        memory: MemoryPlan | None = None,
        base_memory: int = 0,
        ttl: float = 30.0,
        batch_wait_ms: float = 2.0,
        max_batch_tokens: int = 256,
        movable: bool = False,
        throughput: float | None = None,
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
        self.links = Links()  # bytes and measured speed per peer (auto compression decides with it)
        self.public_name, self.version = public_name, version
        self.limits = limits or Limits()
        self.adapters = AdapterStore()  # clients' LoRA adapters, while their sessions last
        self.memory = memory  # the split of a memory budget, if the server has one
        self.base_memory = base_memory  # memory in use before the span loaded
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
        self.batcher = StepBatcher(
            self.compute, self.compute_thread, self.sessions, batch_wait_ms, max_batch_tokens
        )
        self.movable = movable  # chose its blocks itself: it may move (never with explicit --blocks)
        self._servers: tuple[float, dict[str, ServerRecord]] = (0.0, {})  # (when fetched, the swarm's)
        self.fixed_throughput = throughput  # announced as given instead of measured
        self.throughput = throughput or 0.0
        self.row_cost: float | None = None  # measured at start unless the throughput is given
        self.addrs: list[str] = []  # where peers reach it (announced: clients see who shares a host)
        self._views: dict[tuple[int, int], BlockSpan] = {}
        self.draining: list[Draining] = []  # old spans kept for the sessions opened on them
        self._tasks: list[asyncio.Task] = []

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self.throughput = await self.measure(self.span)
        self.addrs = [str(a) for a in await self.transport.addresses()][:8]
        if self.fixed_throughput is None:
            probe = functools.partial(measure_row_cost, self.span, self.dtype, self.device)
            self.row_cost = await self.compute_thread.run(probe)
        await self.transport.serve(wire.PROTOCOL, functools.partial(dispatch.handle, self))
        await self._announce()
        self.run_in_background(self._announce_forever())

    async def measure(self, span: BlockSpan) -> float:
        """The throughput to announce for ``span``: the configured one, or measured on the compute thread."""
        if self.fixed_throughput is not None:
            return self.fixed_throughput
        probe = functools.partial(measure_throughput, span, self.dtype, self.device)
        return await self.compute_thread.run(probe)

    def run_in_background(self, work: Any) -> None:
        """Run coroutine ``work`` until the server stops."""
        self._tasks.append(asyncio.create_task(work))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
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
            row_cost=self.row_cost,
            cache_left=self.cache_budget - self.cache_used,
            dtype=str(self.dtype).removeprefix("torch."),
            family=self.family_name,
            version=self.version,
            public_name=self.public_name,
            state=state,
            movable=self.movable,
            addrs=self.addrs,
            traffic=_counts(self.links.total.as_dict()),
            links=[[link.peer, *_counts(link.traffic.as_dict())] for link in self.links.busiest(4)],
            memory=self._memory_counts(),
        )

    def info(self) -> dict[str, Any]:
        self._drop_drained()
        return {
            "peer": self.transport.peer_id,
            "model": self.model,
            "start": self.span.start,
            "end": self.span.end,
            "family": self.family_name,
            "dtype": str(self.dtype).removeprefix("torch."),
            "cache_left": self.cache_budget - self.cache_used,
            "throughput": self.throughput,
            "row_cost": self.row_cost,
            "version": self.version,
            "sessions": len(self.sessions),
            "resident_fraction": self._resident_fraction(),
            "placement": self._placement(),
            "adapters": {"held": len(self.adapters.adapters), "bytes": self.adapters.nbytes()},
            "batching": self.batcher.stats(),
            "traffic": self.links.as_dict(8),
            "movable": self.movable,
            "draining": [
                [d.span.start, d.span.end, len(d.sessions & set(self.sessions))] for d in self.draining
            ],
        }

    # ---- moving to other blocks ------------------------------------------------------------------
    async def move_to(self, span: BlockSpan, throughput: float) -> None:
        """Serve ``span`` instead of the current one. New requests see only ``span`` at once; sessions
        open on the old span keep it (and their KV caches) until they close."""
        old, open_ids = self.span, set(self.sessions)
        span.requires_grad_(False)
        self.span, self._views, self.throughput = span, {}, throughput
        self.checks = dataclasses.replace(self.checks, start=span.start, end=span.end)
        if open_ids:
            self.draining.append(Draining(old, open_ids))
            self.run_in_background(self._drain())
        await self._announce()
        gone = [i for i in range(old.start, old.end) if not span.start <= i < span.end]
        if not await withdraw(self.transport, self.model, self.record(), gone, self.ttl):
            logger.warning("could not mark every old block record offline; they expire in %.0fs", self.ttl)
        logger.info("moved from blocks %d:%d to %d:%d", old.start, old.end, span.start, span.end)

    async def _drain(self) -> None:
        while self._drop_drained():
            await asyncio.sleep(0.5)

    def _drop_drained(self) -> int:
        """Forget old spans none of whose sessions is open any more; how many are still kept."""
        for done in [d for d in self.draining if not d.sessions & set(self.sessions)]:
            self.draining.remove(done)
            logger.info("dropped blocks %d:%d: their last session closed", done.span.start, done.span.end)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return len(self.draining)

    async def _announce(self, state: str = "online") -> None:
        # an offline mark must outlive the online record it replaces (the DHT keeps the later one)
        ttl = self.ttl
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

    def _placement(self) -> dict[str, Any]:
        """Where the span's weights and KV cache live, the memory budget's split and the peak used."""
        from bloombee_core.offload import OffloadPlan, offload_plan, param_bytes

        plan = offload_plan(self.span)
        if plan is None:  # a span placed without a policy: everything on the device
            span = self.span
            owned = [i for i in range(span.start, span.end) if span.family.owns_kv(span.config, i)]
            weights = sum(param_bytes(p) for p in span.parameters())
            plan = OffloadPlan(self.device, resident_bytes=weights, kv={"device": len(owned)})
        return {
            **plan.tiers(),
            "budget": self.memory.as_dict() if self.memory else None,
            "base": self.base_memory,
            "peak": peak_memory(self.device),
        }

    def placement_line(self) -> str:
        """The placement in one line, for the log."""
        placed = self._placement()
        weights = ", ".join(f"{t} {n / 2**20:.0f} MiB" for t, n in placed["weights"].items() if n)
        kv = ", ".join(f"{t} {n}" for t, n in placed["kv_layers"].items() if n)
        budget = placed["budget"]
        limit = (
            f"; budget {budget['budget'] / 2**20:.0f} MiB, KV caches {budget['kv'] / 2**20:.0f} MiB"
            if budget
            else ""
        )
        return f"weights {weights}; KV-cache layers {kv}{limit}"

    def _memory_counts(self) -> list[int]:
        placed = self._placement()
        weights, kv = placed["weights"], placed["kv_layers"]
        tiers = ("device", "cpu", "disk")
        budget = self.memory.budget if self.memory else 0
        return [*(weights.get(t, 0) for t in tiers), *(kv.get(t, 0) for t in tiers), budget, placed["peak"]]

    # ---- what requests share ---------------------------------------------------------------------
    async def serves_block(self, peer: str, block: int) -> bool:
        """Whether the DHT shows ``peer`` serving ``block`` of this model (records kept for 10 s and
        fetched again when they do not show it: it may have joined since)."""
        for fresh in (False, True):
            fetched, servers = self._servers
            if fresh or time.monotonic() - fetched > 10.0:
                servers = await fetch_servers(self.transport, self.model, self.checks.num_blocks)
                self._servers = (time.monotonic(), servers)
            record = servers.get(peer)
            if record is not None and record.start <= block < record.end:
                return True
        return False

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
        link = self.links.get(stream.peer)
        tensors = await wire.read_tensors(stream, metas, self.decoders, self.limits.max_tensor_bytes, link)
        check_values(tensors)
        return tensors


def _counts(traffic: dict[str, int]) -> list[int]:
    return [traffic[k] for k in ("sent_raw", "sent_wire", "received_raw", "received_wire")]


@dataclasses.dataclass(eq=False)
class Draining:
    """A span the server moved away from, kept while sessions opened on it are open."""

    span: BlockSpan
    sessions: set[str]
