"""Inference sessions: a KV cache kept as long as the client's stream, the step loop, and the push of
each step's output straight to the next server.

Two readers feed a session's inbox: the client's stream (steps and route changes) and push streams from
the previous server (steps). Both copies of a step may arrive; the first one is computed, in step order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from bloombee_core.server.checks import (
    OpenRequest,
    RequestError,
    check_cache_room,
    check_pending,
    check_session_count,
    check_step_fits,
    check_tree_step,
    open_request,
    push_target,
    step_number,
    upstream_peer,
)
from bloombee_core.swarm import wire
from bloombee_core.swarm.links import Link
from bloombee_core.swarm.wire import TensorMeta
from bloombee_core.transport import FrameStream

if TYPE_CHECKING:
    from bloombee_core.model import BlockSpan, SpanCache
    from bloombee_core.model.lora import LoraWeights
    from bloombee_core.server.lifecycle import Server

logger = logging.getLogger(__name__)

PUSH_WAITS_FOR_OPEN = 1.0  # seconds


# ---- what a session's inbox carries --------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    number: int
    tensors: dict[str, torch.Tensor]
    source: str  # "client" or "push"


@dataclass(frozen=True)
class Route:
    target: tuple[str, str] | None  # (peer, its session id) to push outputs to, or None: no pushing


@dataclass(frozen=True)
class Closed:
    """The client ended the session."""


@dataclass(frozen=True)
class Failed:
    error: Exception


Message = Step | Route | Closed | Failed


@dataclass
class Session:
    id: str
    span: BlockSpan  # view for the requested blocks
    cache: SpanCache
    batch: int
    max_length: int
    reserved: int  # bytes of the server's cache budget
    trees: bool = False  # opened for token trees: steps may carry a tree and rows to keep
    group: str | None = None  # the client's micro-batch pipeline: its sessions are not batched together
    last_active: float = 0.0  # time.monotonic() of its last step (the batcher's "anyone else busy?")
    last_tokens: int = 0  # tokens of the last step computed (what a "keep" picks from)
    inbox: asyncio.Queue[Message] = field(default_factory=asyncio.Queue)
    next_step: int = 0
    push_target: tuple[str, str] | None = None
    upstream: str | None = None  # the only peer whose pushes it takes: the server before it in the chain
    push_stream: asyncio.Task[FrameStream] | None = None  # connecting / connected stream to the push target
    adapter: LoraWeights | None = None  # the client's LoRA adapter, applied to every step

    @property
    def runs_alone(self) -> bool:
        """Never batched with other sessions: token trees, a client's own adapter, or a KV cache partly
        off the device (a combined cache would bring all of it into memory at once)."""
        placement = getattr(self.span, "kv_placement", None)
        tiered = placement is not None and bool(placement.on_cpu or placement.on_disk)
        return self.trees or self.adapter is not None or tiered

    pending: dict[int, Step] = field(default_factory=dict)  # steps that arrived before their turn
    # evidence of where inputs came from: step messages received from the client / pushed by a server
    from_client: int = 0
    from_push: int = 0

    def set_push(self, target: tuple[str, str] | None, server: Server) -> None:
        """Point pushes at ``target`` and start opening its stream now, off the first step's path."""
        self.close_push()
        self.push_target = target
        if target is not None:
            self.push_stream = asyncio.create_task(_open_push(server, target[0], self.span.end))

    def close_push(self) -> None:
        if self.push_stream is not None:
            task, self.push_stream = self.push_stream, None
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().close()
            else:
                task.cancel()


def reserved_bytes(view: BlockSpan, request: OpenRequest, device: torch.device) -> int:
    """What a session takes from the cache budget: its KV cache in memory the budget counts (the device;
    CPU memory too on a CPU server), plus two layers' worth of what it keeps further away, which visits
    that memory one layer at a time (the layer computing and the next, read ahead)."""
    tiers = view.cache_bytes_by_tier(request.batch, request.max_length, request.trees)
    near = ("device", "cpu") if device.type == "cpu" else ("device",)
    placement = view.kv_placement
    far = [i for i in range(view.start, view.end) if placement is not None and placement.tier(i) not in near]
    away = sum(n for tier, n in tiers.items() if tier not in near)
    return sum(tiers[t] for t in near) + (2 * away // len(far) if far else 0)


async def serve_session(server: Server, stream: FrameStream, header: dict[str, Any]) -> None:
    """An ``open`` request: reserve the cache, then serve the session until the client closes it."""
    request = open_request(header, server.limits, server.sessions)
    view = server.view(header)
    stored = server.adapters.get(stream.peer, header.get("adapter"))
    check_session_count(len(server.sessions), server.limits)
    need = reserved_bytes(view, request, server.device)
    check_cache_room(request, need, server.cache_used, server.cache_budget)
    server.cache_used += need
    sid = request.session_id
    cache = view.new_cache(request.batch, request.max_length, request.trees)
    session = Session(sid, view, cache, request.batch, request.max_length, need, request.trees, request.group)
    session.adapter = stored.weights if stored is not None else None
    server.sessions[sid] = session
    reader: asyncio.Task | None = None
    try:
        session.set_push(push_target(header.get("push")), server)
        session.upstream = upstream_peer(header.get("upstream"))
        reader = asyncio.create_task(_read_client(server, stream, session))
        await wire.send(
            stream,
            {"ok": True, "session_id": sid, "cache_left": server.cache_budget - server.cache_used},
            link=server.links.get(stream.peer),
        )
        await _step_loop(server, stream, session)
    finally:
        if reader is not None:
            reader.cancel()
        server.sessions.pop(sid, None)
        server.cache_used -= session.reserved
        session.close_push()
        cache.close()  # its memory and disk files go now, not when the last reference does


async def receive_pushes(
    server: Server, stream: FrameStream, header: dict[str, Any], metas: list[TensorMeta]
) -> None:
    """A ``push`` stream: another server delivering steps' inputs for our sessions. Each step that
    measured the link is acknowledged with our receive rate (the pusher's ``auto`` compression uses it)."""
    link = server.links.get(stream.peer)
    while True:
        sid = header.get("session_id")
        session = await _session_soon(server, sid)
        if session is None:
            raise RequestError(f"unknown session id {sid!r:.80}: no such inference session is open here")
        if stream.peer != session.upstream:  # a session id is no key: only its chain may push into it
            raise RequestError(
                f"push refused: session {sid!r:.40} takes pushes only from the server before it in its chain"
            )
        await _accept_step(server, session, stream, header, metas, "push")
        if link.report_due():
            await wire.send(stream, {"ok": True, "type": "link"}, link=link)
        message = await wire.read_header(stream, link)
        if message is None:
            return
        header, metas = message
        if header.get("type") != "push":
            raise RequestError(f"a push stream carries only push messages, got {header.get('type')!r}")


async def _read_client(server: Server, stream: FrameStream, session: Session) -> None:
    """The client's messages -> the session's inbox."""
    link = server.links.get(stream.peer)
    try:
        while True:
            message = await wire.read_header(stream, link)
            if message is None:
                await session.inbox.put(Closed())
                return
            header, metas = message
            kind = header.get("type")
            if kind == "route":  # re-routed: a new push target, a new upstream, or both
                if "upstream" in header:
                    session.upstream = upstream_peer(header["upstream"])
                if "push" in header:
                    await session.inbox.put(Route(push_target(header["push"])))
            elif kind == "step":
                await _accept_step(server, session, stream, header, metas, "client")
            else:
                raise RequestError(
                    f"unknown message type {kind!r} in an inference session; expected step or route"
                )
    except Exception as exc:  # noqa: BLE001 - handed to the session loop, which replies
        await session.inbox.put(Failed(exc))


async def _accept_step(
    server: Server,
    session: Session,
    stream: FrameStream,
    header: dict[str, Any],
    metas: list[TensorMeta],
    source: str,
) -> None:
    """Check a step's tensors against its session, read them and queue the step (from the client or a push)."""
    number = step_number(header)
    tensors = await server.read_inputs(stream, metas, "step", session.span, session.batch, session.max_length)
    if source == "push":
        session.from_push += 1
    else:
        session.from_client += 1
    await session.inbox.put(Step(number, tensors, source))


async def _step_loop(server: Server, stream: FrameStream, session: Session) -> None:
    while True:
        match await session.inbox.get():
            case Closed():
                return
            case Failed(error):
                raise error
            case Route(target):
                session.set_push(target, server)
            case Step() as step if step.number < session.next_step:
                pass  # already computed from the other copy (a push and the client's own)
            case Step() as step if step.number > session.next_step:
                check_pending(step.number, session.next_step, len(session.pending), server.limits)
                session.pending.setdefault(step.number, step)
            case Step() as step:
                await _run_steps(server, stream, session, step)


async def _run_steps(server: Server, stream: FrameStream, session: Session, step: Step) -> None:
    """Compute ``step`` (the one due), then every waiting step that is due after it."""
    while True:
        tensors = step.tensors
        check_tree_step(tensors, session.trees, session.last_tokens)
        if "keep" in tensors:  # the accepted path of the last token tree: drop the rejected rows
            session.cache.keep(tensors["keep"], session.last_tokens)
        check_step_fits(session.cache.length, tensors, session.max_length)
        tokens = tensors["hidden"].shape[1]
        out = await server.batcher.step(session, tensors)  # alone or with other sessions' due steps
        session.last_tokens = tokens
        # The push is on the critical path (the next server waits for it); the reply is not
        # (the client keeps it for replay), so the push goes first.
        pushed = await _push(server, session, session.next_step, out, tensors)
        reply = {
            "ok": True,
            "step": session.next_step,
            "source": step.source,
            "pushed": pushed,
            "from_client": session.from_client,
            "from_push": session.from_push,
        }
        await wire.send(
            stream, reply, {"hidden": out}, server.output_compressor, server.links.get(stream.peer)
        )
        session.next_step += 1
        if session.next_step not in session.pending:
            return
        step = session.pending.pop(session.next_step)


async def _session_soon(server: Server, sid: object) -> Session | None:
    """The open session ``sid``, waiting briefly: the client opens sessions without waiting for the
    replies, so a push may overtake the next server's ``open`` by a moment."""
    if not isinstance(sid, str):
        return None
    deadline = time.monotonic() + PUSH_WAITS_FOR_OPEN
    while sid not in server.sessions and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    return server.sessions.get(sid)


async def _push(
    server: Server, session: Session, step: int, out: torch.Tensor, inputs: dict[str, torch.Tensor]
) -> bool:
    """Send a step's output straight to the next server; True when it was written to the push stream.

    Best effort: on failure the push is switched off and the reply tells the client to deliver the
    step itself.
    """
    if session.push_target is None or session.push_stream is None:
        return False
    tensors = {"hidden": out, "position_ids": inputs["position_ids"]}
    for name in ("attention_mask", "tree", "keep"):
        if name in inputs:
            tensors[name] = inputs[name]
    n = session.span.end - session.span.start
    for name in server.per_layer_sizes:  # later spans' per-layer inputs travel on with the hidden states
        if inputs[name].shape[2] <= n:
            return False  # the client sent only ours: it must deliver the next server's itself
        tensors[name] = inputs[name][:, :, n:]
    header = {"type": "push", "session_id": session.push_target[1], "step": step}
    try:
        stream = await session.push_stream
        await wire.send(stream, header, tensors, server.output_compressor, server.links.get(stream.peer))
    except Exception as exc:  # noqa: BLE001 - the client delivers the step instead
        refused = isinstance(exc, RequestError)  # a target that serves nothing next: worth a warning
        logger.log(
            logging.WARNING if refused else logging.INFO,
            "push to %s failed (%s); the client will deliver the step",
            session.push_target[0],
            exc,
        )
        session.set_push(None, server)
        return False
    return True


async def _open_push(server: Server, peer: str, block: int) -> FrameStream:
    """A push stream to ``peer``, which must serve the next block of this model: a server does not dial
    whatever peer a request names."""
    if not await server.serves_block(peer, block):
        raise RequestError(f"will not push to {peer:.60}: the DHT shows it serving no block {block} here")
    stream = await server.transport.connect(peer, wire.PROTOCOL)
    asyncio.create_task(_drain_replies(stream, server.links.get(peer)))
    return stream


async def _drain_replies(stream: FrameStream, link: Link) -> None:
    """Replies on a push stream: errors (logged) and the receiver's rate reports (taken by the link)."""
    try:
        while (message := await wire.read_header(stream, link)) is not None:
            if not message[0].get("ok", False):
                logger.info("push refused by %s: %s", stream.peer, message[0].get("error"))
    except Exception:  # noqa: BLE001 - the push stream is best effort
        pass
