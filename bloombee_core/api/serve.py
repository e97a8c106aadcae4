"""Serving the API: load the client model, bind the socket, run uvicorn until SIGINT / SIGTERM."""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import TYPE_CHECKING

from bloombee_core.errors import BloombeeError, ConfigError

if TYPE_CHECKING:
    from bloombee_core.registry import PluginSet
    from bloombee_core.settings import ClientJob


def run_api(job: ClientJob, plugins: PluginSet, threads: int | None = None) -> int:
    """Serve ``job``'s model through the HTTP API; prints a ``bloombee-ready api {"url": ...}`` line once
    it listens."""
    import torch
    import uvicorn
    from transformers import AutoTokenizer

    from bloombee_core.api.app import Api
    from bloombee_core.api.engine import Engine
    from bloombee_core.client import AutoDistributedModelForCausalLM
    from bloombee_core.model_files import resolve_model
    from bloombee_core.roles import ready_line
    from bloombee_core.settings import check_plugin_choices

    if not job.network.initial_peers:
        raise ConfigError("network.initial_peers", "the api job needs a swarm: give its multiaddrs")
    check_plugin_choices(job, plugins)
    if threads:
        torch.set_num_threads(threads)
    settings = job.api
    sock = _bind(settings.host, settings.port)  # before the model loads: a taken port fails at once
    folder = resolve_model(job.model.path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        folder,
        job.network.initial_peers,
        dtype=job.model.dtype,
        plugins=plugins,
        compressor=plugins.create("compressors", job.client.compressor, "client.compressor"),
        transport=plugins.create("transports", job.network.transport, "network.transport"),
        family=job.model.family,
        micro_batch=job.client.micro_batch,
        prefill_chunk=job.client.prefill_chunk,
    )
    try:
        name = settings.name or job.model.path
        engine = Engine(model, tokenizer, name, plugins, job.client.decoding, settings.max_tokens)
        app = Api(engine, settings.api_key, settings.max_concurrent).app()
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{port}"

        async def serve() -> None:
            task = asyncio.ensure_future(server.serve(sockets=[sock]))
            while not server.started and not task.done():
                await asyncio.sleep(0.05)
            if server.started:
                print(ready_line("api", {"url": url, "model": name}), flush=True)
                print(
                    f"OpenAI-compatible API of {name} at {url}/v1, chat page at {url}/",
                    file=sys.stderr,
                    flush=True,
                )
            await task

        asyncio.run(serve())
    finally:
        model.close()
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BloombeeError(f"the API cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock
