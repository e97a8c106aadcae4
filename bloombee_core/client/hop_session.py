"""One server's part of an inference session (:class:`HopSession`): its stream, the inputs it was sent
(for replay on a replacement), where its output is pushed, and which server pushes into it."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import torch

from bloombee_core.client.rpc import Tensors, read_reply
from bloombee_core.swarm import wire
from bloombee_core.swarm.links import SessionLink
from bloombee_core.swarm.routing import Hop
from bloombee_core.swarm.wire import ProtocolError
from bloombee_core.transport import FrameStream

if TYPE_CHECKING:
    from bloombee_core.client.remote_tuning import ClientAdapter
    from bloombee_core.client.swarm_client import SwarmClient

logger = logging.getLogger(__name__)
PushRef = dict[str, str]  # where a server pushes its output: the next server's peer and session id


class HopSession:
    """One server-side session: blocks ``hop.start:hop.end`` on ``hop.peer``."""

    def __init__(self, hop: Hop) -> None:
        self.hop = hop
        self.id = secrets.token_hex(12)
        self.stream: FrameStream | None = None
        self.history: list[Tensors] = []  # every input of every step, for replay on another server
        self.steps = 0
        self.sent = 0  # step messages this client sent the server (the others came by push)
        self.sources = {"client": 0, "push": 0}  # where the server took each step's input from
        self.server_counts: dict[str, int] = {}  # the server's own count of inputs received, by origin
        self.wait = 0.0  # how long the last step's reply took after the previous hop's
        self.opening = False  # the open's reply is still to be read (before the first step's)
        self.link: SessionLink | None = None  # this session's bytes, and the link's speed estimate

    def push_ref(self) -> PushRef:
        return {"peer": self.hop.peer, "session_id": self.id}

    async def open(
        self,
        client: SwarmClient,
        batch: int,
        max_length: int,
        push: PushRef | None,
        trees: bool = False,
        group: str | None = None,
        adapter: ClientAdapter | None = None,
        upstream: str | None = None,
    ) -> None:
        self.link = client.links.session(self.hop.peer)
        if adapter is not None:
            await adapter.ensure(client, self.hop)  # the session's steps apply the client's LoRA
        self.stream = await client.transport.connect(self.hop.peer, wire.PROTOCOL)
        header = {
            "type": "open",
            "session_id": self.id,
            "start": self.hop.start,
            "end": self.hop.end,
            "batch_size": batch,
            "max_length": max_length,
            "push": push,
            "upstream": upstream,  # the server before it in the chain: the only peer whose pushes it takes
        }
        if trees:
            header["trees"] = True
        if adapter is not None:
            header["adapter"] = adapter.reference()
        if group is not None:
            header["group"] = group  # micro-batches of one generate: servers do not batch them together
        # No round trip of its own: the first step follows at once, and the open's reply (an error if
        # the server refuses, e.g. busy) is read just before that step's reply.
        await wire.send(self.stream, header, link=self.link)
        self.opening = True

    async def _next_reply(self, client: SwarmClient) -> tuple[dict[str, Any], Tensors]:
        assert self.stream is not None
        if self.opening:
            await read_reply(self.stream, client.decoders, self.link)
            self.opening = False
        return await read_reply(self.stream, client.decoders, self.link)

    async def send(self, client: SwarmClient, tensors: Tensors, ahead: int = 0) -> None:
        """Deliver the current step's input ourselves (no push, or a push that is late); with ``ahead``,
        the input of the step that many after the current one (steps in flight: chunked prefill)."""
        assert self.stream is not None
        header = {"type": "step", "step": self.steps + ahead}
        await wire.send(self.stream, header, tensors, client.compressor, self.link)
        self.sent += 1

    async def receive(
        self, client: SwarmClient, tensors: Tensors, pushed: bool
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The current step's output. When the input was ``pushed`` by the previous server, the client
        sends nothing unless the output is late (a push lost on the way): then it sends its own copy,
        which the server ignores if the push did arrive."""
        assert self.stream is not None
        begin = time.perf_counter()
        if pushed:
            reply = asyncio.ensure_future(self._next_reply(client))
            try:
                grace = max(client.push_grace, 4 * self.wait)
                done, _ = await asyncio.wait({reply}, timeout=grace)
                if not done:
                    logger.info("step %d of %s is late; sending it without the push", self.steps, self.hop)
                    await self.send(client, tensors)
                head, out = await asyncio.wait_for(reply, client.timeout)
            except BaseException:
                reply.cancel()
                raise
        else:  # the common case: read the reply in this task (no task per step)
            async with asyncio.timeout(client.timeout):
                head, out = await self._next_reply(client)
        if head.get("step") != self.steps or "hidden" not in out:
            raise ProtocolError(
                f"server {self.hop.peer} answered step {head.get('step')!r}, expected {self.steps}"
            )
        self.wait = time.perf_counter() - begin
        self.steps += 1
        self.history.append(tensors)
        source = head.get("source")
        if source in self.sources:
            self.sources[source] += 1
        self.server_counts = {k: int(head[k]) for k in ("from_client", "from_push") if k in head}
        return out["hidden"], head

    async def step(self, client: SwarmClient, tensors: Tensors) -> torch.Tensor:
        await self.send(client, tensors)
        return (await self.receive(client, tensors, pushed=False))[0]

    def stats(self) -> dict[str, Any]:
        return {
            "peer": self.hop.peer,
            "blocks": (self.hop.start, self.hop.end),
            "steps": self.steps,
            "sent_by_client": self.sent,
            "computed_from": dict(self.sources),
            "server_received": dict(self.server_counts),
            "traffic": self.link.traffic.as_dict() if self.link is not None else {},
            "send_rate": self.link.link.send_rate if self.link is not None else None,
        }

    async def set_route(self, **route: PushRef | str | None) -> None:
        """Re-point the server's ``push`` target or name its new ``upstream`` (after a re-route)."""
        if self.stream is not None:
            await wire.send(self.stream, {"type": "route", **route}, link=self.link)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
