"""Running a server process: join the swarm, pick and load a span, serve (moving when the swarm needs it)
until told to stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

from bloombee_core.about import version
from bloombee_core.dtypes import torch_dtype
from bloombee_core.errors import ConfigError
from bloombee_core.registry import PluginSet
from bloombee_core.server.budget import (
    MemoryPlan,
    current_rss,
    kv_bytes_per_token,
    peak_memory,
    plan_memory,
    return_freed_memory,
)
from bloombee_core.server.checks import Limits
from bloombee_core.server.lifecycle import Server
from bloombee_core.server.rebalance import Rebalancer
from bloombee_core.settings import ServerJob
from bloombee_core.swarm.aio import LoopThread
from bloombee_core.swarm.placement import block_throughput, choose_span, estimate_throughput
from bloombee_core.swarm.records import fetch_servers, model_key, public_model_name
from bloombee_core.transport import Transport

if TYPE_CHECKING:
    from bloombee_core.model import BlockSpan

logger = logging.getLogger(__name__)
DEFAULT_CACHE_FLOOR = 64 << 20


def resolve(model: str) -> Path:
    from bloombee_core.model_files import resolve_model

    return resolve_model(model)


def cache_budget(configured: int | None, memory: MemoryPlan | None, span: BlockSpan) -> int:
    """Without a configured budget: room for 8 sequences of 2048 tokens (at least 64 MiB)."""
    if memory is not None:
        return memory.kv
    if configured is not None:
        return configured
    return max(span.cache_bytes(8, 2048), DEFAULT_CACHE_FLOOR)


def used_memory(device: torch.device) -> int:
    """What the budget already holds before a span loads: the process's RSS, or allocated device memory."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return current_rss()


async def start_server(
    job: ServerJob, transport: Transport, plugins: PluginSet, limits: Limits | None = None
) -> Server:
    from bloombee_core.family import span_problem
    from bloombee_core.model import load_config
    from bloombee_core.model.checkpoint import meta_skeleton, span_weight_bytes

    opts = job.server
    path = resolve(job.model.path)
    config = load_config(path)
    family = plugins.family_for(config, job.model.family)
    compressor = plugins.create("compressors", opts.compressor, "server.compressor")
    offload = plugins.create("offload_policies", opts.offload, "server.offload")
    num_blocks, cuts = family.num_blocks(config), family.allowed_cuts(config)
    key = model_key(config, path)
    await transport.start(
        initial_peers=job.network.initial_peers,
        listen=opts.listen,
        announce=opts.announce,
        identity=str(opts.identity) if opts.identity else None,
    )
    if opts.blocks is not None:
        start, end = opts.span()
        problem = span_problem(start, end, (0, num_blocks), cuts)
        if problem:
            raise ConfigError("server.blocks", problem)
    else:
        records = list((await fetch_servers(transport, key, num_blocks)).values())
        length = opts.num_blocks or num_blocks
        own = opts.throughput or estimate_throughput(records, length)
        start, end = choose_span(block_throughput(records, num_blocks), length, cuts, own)
        logger.info("chose blocks %d:%d, where the swarm's throughput is lowest", start, end)
    dtype = torch_dtype(opts.dtype or job.model.dtype)
    device = torch.device(opts.device)
    limits = limits or Limits()
    memory: MemoryPlan | None = None
    if opts.memory_budget is not None and device.type == "cpu":
        return_freed_memory()
    meta_skeleton(config)  # imports what loading a span needs, so that the base below includes it
    base_memory = used_memory(device)  # before any weights: the interpreter and its libraries

    def place(start: int, end: int) -> BlockSpan:
        # The weights are read layer by layer into CPU memory and placed at once (only the resident
        # share goes to the device), so the span is never in memory whole unless it stays so.
        nonlocal memory
        sizes = span_weight_bytes(family, path, start, end, dtype)
        total = sum(sizes)
        placer = offload.placer(device, total)
        if opts.memory_budget is not None:
            memory = plan_memory(
                int(opts.memory_budget),
                used_memory(device),
                total,
                max(sizes, default=0),
                config,
                dtype.itemsize,
                limits.max_tokens,
                opts.cache_bytes,
                max(8 * 2048 * kv_bytes_per_token(family, config, start, end, dtype), DEFAULT_CACHE_FLOOR),
            )
            placer.limit_device(memory.weights)
            limits.max_tokens = memory.max_tokens
        span = family.load_span(path, config, start, end, dtype, "cpu", place=placer.add_unit)
        placer.finish(span, offload.kv_shares())
        return span

    async def load(start: int, end: int) -> BlockSpan:
        return await asyncio.get_running_loop().run_in_executor(None, place, start, end)

    span = await load(start, end)
    compressors = plugins.instances_without_options("compressors")
    compressors[compressor.name] = compressor
    server = Server(
        transport,
        span,
        model=key,
        model_info={
            "name": public_model_name(job.model.path),
            "family": family.name,
            "num_blocks": num_blocks,
        },
        family_name=family.name,
        cuts=cuts,
        dtype=dtype,
        device=opts.device,
        cache_budget=cache_budget(opts.cache_bytes, memory, span),
        compressors=compressors,
        output_compressor=compressor,
        public_name=opts.public_name or "",
        version=version(),
        limits=limits,
        memory=memory,
        base_memory=base_memory,
        ttl=opts.ttl,
        batch_wait_ms=opts.batch_wait_ms,
        max_batch_tokens=opts.max_batch_tokens,
        movable=opts.blocks is None,
        throughput=opts.throughput,
    )
    logger.info(
        "placed blocks %d:%d: %s; memory in use %.0f MiB",
        start,
        end,
        server.placement_line(),
        current_rss() / 2**20,
    )
    await server.start()
    logger.info(
        "serving; memory in use %.0f MiB, peak %.0f MiB", current_rss() / 2**20, peak_memory(device) / 2**20
    )
    if server.movable and opts.rebalance_every > 0:
        server.run_in_background(Rebalancer(server, load, opts.rebalance_every, num_blocks, cuts).run())
    return server


def serve_forever(
    job: ServerJob, plugins: PluginSet, announce_ready: Callable[[dict[str, Any]], None]
) -> int:
    """Run a server until SIGTERM / SIGINT; ``announce_ready`` gets its peer id, addresses, blocks, model
    key, family, transport and torch threads once it serves (see :mod:`bloombee_core.roles`)."""
    if job.server.threads:
        torch.set_num_threads(job.server.threads)
    transport = plugins.create("transports", job.network.transport, "network.transport")
    loop = LoopThread("bloombee-server")
    stop = asyncio.Event()
    server: Server | None = None

    async def main() -> None:
        nonlocal server
        server = await start_server(job, transport, plugins)
        info = {
            "peer": transport.peer_id,
            "start": server.span.start,
            "end": server.span.end,
            "addrs": await transport.addresses(),
            "model": server.model,
            "family": server.family_name,
            "transport": transport.name,
            "threads": torch.get_num_threads(),
        }
        announce_ready(info)
        await stop.wait()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        loop.loop.call_soon_threadsafe(stop.set)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    future = asyncio.run_coroutine_threadsafe(main(), loop.loop)
    try:
        while True:
            try:
                future.result(timeout=0.5)
                break
            except TimeoutError:
                continue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if server is not None:
            loop.run(server.stop(), timeout=15)
        try:
            loop.run(transport.shutdown(), timeout=15)
        except Exception:  # noqa: BLE001 - shutting down a half-started transport
            logger.debug("transport shutdown failed", exc_info=True)
        loop.stop()
    return 0
