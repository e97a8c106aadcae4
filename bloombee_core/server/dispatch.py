"""The server's stream handler, over one stream protocol (:data:`bloombee_core.swarm.wire.PROTOCOL`).

A stream starts with a request header whose ``type`` decides what the stream is:

* ``info`` / ``forward`` / ``backward``: request-response pairs, repeated until the client closes.
* ``open``: an inference session. Then ``step`` messages (hidden states + positions + mask), each
  answered with the span's output, and ``route`` messages that change where outputs are pushed.
  The KV cache lives as long as the stream; the session reserves its worst-case cache size from the
  server's budget when it opens (no room: a ``busy`` error, never an out-of-memory crash).
* ``push``: another server delivering a step's input for one of our sessions (server->server push).
* ``adapter``: a client's LoRA adapter, put or dropped (:mod:`bloombee_core.server.adapters`); forward,
  backward and open requests may then name it, and forward / backward may carry deep prompts.

Every size, shape and dtype is checked against the session and the server's limits before a payload is
read (:mod:`bloombee_core.server.checks`). A bad request gets an error reply naming what was wrong,
then its stream is closed; nothing else is affected.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from bloombee_core.server.adapters import lora_gradients, serve_adapter
from bloombee_core.server.checks import RequestError
from bloombee_core.server.compute import BULK
from bloombee_core.server.sessions import receive_pushes, serve_session
from bloombee_core.swarm import wire
from bloombee_core.swarm.wire import ProtocolError, TensorMeta
from bloombee_core.transport import FrameStream, TransportError

if TYPE_CHECKING:
    from bloombee_core.server.lifecycle import Server

logger = logging.getLogger(__name__)

LINGER_SECONDS = 2.0
LINGER_BYTES = 64 << 20


async def handle(server: Server, stream: FrameStream) -> None:
    """Serve one stream; whatever goes wrong becomes an error reply on it, never a server crash."""
    link = server.links.get(stream.peer)
    try:
        while True:
            message = await wire.read_header(stream, link)
            if message is None:
                return
            header, metas = message
            kind = header.get("type")
            if kind == "info":
                await wire.send(stream, {"ok": True, **server.info()}, link=link)
            elif kind in ("forward", "backward"):
                await _stateless(server, stream, header, metas, kind)
            elif kind == "open":
                await serve_session(server, stream, header)
                return
            elif kind == "push":
                await receive_pushes(server, stream, header, metas)
                return
            elif kind == "adapter":
                await serve_adapter(server, stream, header, metas)
            else:
                raise RequestError(
                    f"unknown request type {kind!r}; expected info, forward, backward, open, push or adapter"
                )
    except (ProtocolError, RequestError) as exc:
        code = getattr(exc, "code", "bad_request")
        logger.info("refused a request from %s: %s", stream.peer, exc)
        await _reply_error(stream, str(exc), code)
    except TransportError as exc:
        logger.debug("stream from %s ended: %s", stream.peer, exc)
    except Exception as exc:  # noqa: BLE001 - a failing request must not take the server down
        logger.exception("request from %s failed", stream.peer)
        await _reply_error(stream, f"internal server error: {type(exc).__name__}: {exc}", "internal")


async def _stateless(
    server: Server, stream: FrameStream, header: dict[str, Any], metas: list[TensorMeta], kind: str
) -> None:
    """A ``forward`` or ``backward`` request: no cache, the reply carries the outputs or the gradients."""
    view = server.view(header)
    stored = server.adapters.get(stream.peer, header.get("adapter"))
    tensors = await server.read_inputs(stream, metas, kind, view)
    run = server.compute.forward if kind == "forward" else server.compute.backward
    adapter = stored.weights if stored is not None else None
    # behind inference steps on the compute thread
    outputs = await server.compute_thread.run(run, view, tensors, adapter, priority=BULK)
    if "lora" in outputs:
        assert adapter is not None and stored is not None
        outputs.update(lora_gradients(stored, adapter, outputs.pop("lora")))
    await wire.send(stream, {"ok": True}, outputs, server.output_compressor, server.links.get(stream.peer))


async def _reply_error(stream: FrameStream, message: str, code: str) -> None:
    try:
        await wire.send(stream, wire.error_header(message, code=code))
    except Exception:  # noqa: BLE001 - the peer may be gone already
        return
    # Linger briefly, dropping whatever the peer still sends (the rest of a refused request): closing
    # while bytes are in flight resets the stream, and the peer would lose the error reply.
    try:
        await asyncio.wait_for(_discard(stream, LINGER_BYTES), LINGER_SECONDS)
    except Exception:  # noqa: BLE001 - a peer that keeps sending is cut off
        pass


async def _discard(stream: FrameStream, limit: int) -> None:
    while limit > 0:
        chunk = await stream.reader.read(1 << 16)
        if not chunk:
            return
        limit -= len(chunk)
