"""Running a server process: join the swarm, pick and load a span, serve until told to stop."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bloombee_core.transport import Transport
from bloombee_swarm import wire
from bloombee_swarm.aio import LoopThread
from bloombee_swarm.records import coverage, fetch_servers, least_served_span, model_key
from bloombee_swarm.server import Limits, SpanServer

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
READY = "bloombee-server-ready"


@dataclass
class ServeOptions:
    model: str
    initial_peers: list[str]
    blocks: tuple[int, int] | None = None
    num_blocks: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    listen: list[str] = field(default_factory=list)
    announce: list[str] = field(default_factory=list)
    identity: str | None = None
    public_name: str = ""
    cache_bytes: int | None = None
    ttl: float = 30.0


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("bloombee")
    except PackageNotFoundError:
        return "unknown"


def resolve(model: str) -> Any:
    from bloombee_core.model_files import resolve_model

    return resolve_model(model)


def default_cache_budget(span: Any, dtype: torch.dtype) -> int:
    """Without a configured budget: room for 8 sequences of 2048 tokens (at least 64 MiB)."""
    return max(span.cache_bytes(8, 2048), 64 << 20)


async def start_server(
    opts: ServeOptions,
    transport: Transport,
    plugins: Any,
    compressor: Any = None,
    offload: Any = None,
    limits: Limits | None = None,
) -> SpanServer:
    from bloombee_core.family import load_config

    path = resolve(opts.model)
    config = load_config(path)
    family = plugins.family_for(config)
    num_blocks, cuts = family.num_blocks(config), family.allowed_cuts(config)
    key = model_key(config, path)
    await transport.start(
        initial_peers=opts.initial_peers,
        listen=opts.listen,
        announce=opts.announce,
        identity=opts.identity,
    )
    if opts.blocks is not None:
        start, end = opts.blocks
        if not 0 <= start < end <= num_blocks:
            raise ValueError(
                f"--blocks {start}:{end} is outside the model's {num_blocks} blocks (0:{num_blocks})"
            )
        if start not in cuts or end not in cuts:
            raise ValueError(
                f"--blocks {start}:{end} cuts the model where it cannot be cut (a KV-sharing group must "
                f"stay on one server); spans may start and end only at blocks {cuts}"
            )
    else:
        servers = await fetch_servers(transport, key, num_blocks)
        start, end = least_served_span(
            coverage(list(servers.values()), num_blocks), opts.num_blocks or num_blocks, cuts
        )
        logger.info("chose the least-served blocks %d:%d", start, end)
    dtype = DTYPES[opts.dtype]
    loop = asyncio.get_running_loop()
    # With an offload policy the weights are read into CPU memory and the policy places them (only the
    # resident share goes to the device): a span larger than the device must not be loaded there first.
    offloading = offload is not None and getattr(offload, "name", "none") != "none"
    load_on = "cpu" if offloading else opts.device
    span = await loop.run_in_executor(
        None, lambda: family.load_span(path, config, start, end, dtype, load_on)
    )
    if offload is not None and hasattr(offload, "apply"):
        span = offload.apply(span, torch.device(opts.device)) or span
    compressors = {}
    if plugins is not None:
        for name, cls in plugins.classes("compressors").items():
            try:
                compressors[name] = cls()
            except Exception:  # noqa: BLE001 - a compressor that needs options is used only when chosen
                pass
    if compressor is not None:
        compressors[compressor.name] = compressor
    server = SpanServer(
        transport,
        span,
        model=key,
        model_info={"name": str(opts.model), "family": family.name, "num_blocks": num_blocks},
        family=family.name,
        cuts=cuts,
        dtype=dtype,
        device=opts.device,
        cache_budget=opts.cache_bytes if opts.cache_bytes is not None else default_cache_budget(span, dtype),
        compressors=compressors,
        output_codec=compressor if compressor is not None else wire.RAW,
        public_name=opts.public_name,
        version=version(),
        limits=limits,
        ttl=opts.ttl,
    )
    await server.start()
    return server


def serve_forever(
    opts: ServeOptions,
    transport: Transport,
    plugins: Any,
    compressor: Any = None,
    offload: Any = None,
    announce_ready: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Run a server until SIGTERM / SIGINT; prints one ready line (JSON) to stdout once it serves."""
    loop = LoopThread("bloombee-server")
    stop = asyncio.Event()
    server: SpanServer | None = None

    async def main() -> None:
        nonlocal server
        server = await start_server(opts, transport, plugins, compressor, offload)
        info = {
            "peer": transport.peer_id,
            "start": server.span.start,
            "end": server.span.end,
            "addrs": await transport.addresses(),
            "model": server.model,
        }
        (announce_ready or _print_ready)(info)
        await stop.wait()

    def on_signal(signum: int, frame: Any) -> None:
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


def _print_ready(info: dict[str, Any]) -> None:
    print(f"{READY} {json.dumps(info)}", flush=True)
    print(
        f"serving blocks {info['start']}:{info['end']} as {info['peer']}\n"
        f"  reachable at: {' '.join(info['addrs'])}",
        file=sys.stderr,
        flush=True,
    )


def parse_ready(line: str) -> dict[str, Any] | None:
    if line.startswith(READY + " "):
        return json.loads(line[len(READY) + 1 :])
    return None


def peers_arg(values: Sequence[str] | None) -> list[str]:
    """``--initial-peers`` accepts several values and comma-separated lists."""
    out: list[str] = []
    for value in values or []:
        out.extend(v for v in value.replace(",", " ").split() if v)
    return out
