"""The client's side of the swarm: finding servers, calling them, and inference sessions that survive
server failures.

:class:`SwarmClient` knows the servers of one model (from the DHT), their measured round-trip times and
the ban list; it routes chains and makes stateless forward/backward calls with retries.
:class:`InferenceSession` keeps one server-side session per hop of a chain. It records every input it
sent to each hop; when a hop fails it bans the server, routes a replacement chain for exactly those
blocks, replays the recorded inputs step by step (same shapes, so the rebuilt KV cache is the same),
and carries on — the output does not change.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Mapping
from typing import Any

import torch

from bloombee_core.compression import RAW, Compressor
from bloombee_core.swarm import wire
from bloombee_core.swarm.records import ServerRecord, fetch_servers
from bloombee_core.swarm.routing import BanList, Hop, NoRouteError, plan_route
from bloombee_core.swarm.wire import ProtocolError
from bloombee_core.transport import FrameStream, Transport, TransportError

logger = logging.getLogger(__name__)
Tensors = dict[str, torch.Tensor]


class RemoteError(RuntimeError):
    """A server refused a request; ``code`` says whether another server may do better."""

    def __init__(self, peer: str, message: str, code: str) -> None:
        super().__init__(f"server {peer} refused the request: {message}")
        self.peer, self.code = peer, code


RETRYABLE = (TransportError, ProtocolError, TimeoutError, ConnectionError)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, RETRYABLE) or (isinstance(exc, RemoteError) and exc.code != "bad_request")


async def request(
    stream: FrameStream,
    header: dict[str, Any],
    tensors: Mapping[str, torch.Tensor] | None,
    compressor: Compressor,
    decoders: Mapping[str, Compressor],
) -> tuple[dict[str, Any], Tensors]:
    """Send one message and read its reply (raising :class:`RemoteError` for an error reply)."""
    await wire.send(stream, header, tensors, compressor)
    return await read_reply(stream, decoders)


async def read_reply(
    stream: FrameStream, decoders: Mapping[str, Compressor]
) -> tuple[dict[str, Any], Tensors]:
    reply = await wire.read_header(stream)
    if reply is None:
        raise TransportError(f"server {stream.peer} closed the stream without answering")
    head, metas = reply
    if not head.get("ok", False):
        raise RemoteError(
            stream.peer, str(head.get("error", "no reason given")), str(head.get("code", "internal"))
        )
    return head, await wire.read_tensors(stream, metas, decoders, 1 << 31)


class SwarmClient:
    def __init__(
        self,
        transport: Transport,
        model: str,
        num_blocks: int,
        cuts: list[int],
        *,
        compressor: Compressor = RAW,
        compressors: Mapping[str, Any] | None = None,
        timeout: float = 60.0,
        max_retries: int = 6,
        refresh_every: float = 5.0,
        push_grace: float = 1.0,
    ) -> None:
        self.transport = transport
        self.model, self.num_blocks, self.cuts = model, num_blocks, cuts
        self.compressor, self.decoders = compressor, wire.compressor_table(compressors)
        self.timeout, self.max_retries, self.refresh_every = timeout, max_retries, refresh_every
        self.push_grace = push_grace  # seconds to wait for a pushed step before sending it ourselves
        self.bans = BanList()
        self.rtt: dict[str, float] = {}
        self.servers: dict[str, ServerRecord] = {}
        self._fetched_at = 0.0

    # ---- discovery and routing -------------------------------------------------------------------
    async def refresh(self, force: bool = False) -> dict[str, ServerRecord]:
        if force or time.monotonic() - self._fetched_at > self.refresh_every:
            self.servers = await fetch_servers(self.transport, self.model, self.num_blocks)
            self._fetched_at = time.monotonic()
        return self.servers

    async def info(self, peer: str) -> dict[str, Any]:
        """A server's own report (span, cache left, throughput, sessions, resident weight fraction)."""
        stream = await self.transport.connect(peer, wire.PROTOCOL)
        try:
            head, _ = await asyncio.wait_for(request(stream, {"type": "info"}, None, RAW, self.decoders), 5.0)
        finally:
            stream.close()
        return head

    async def ping(self, peer: str) -> float:
        begin = time.perf_counter()
        await self.info(peer)
        self.rtt[peer] = time.perf_counter() - begin
        return self.rtt[peer]

    async def route(self, start: int, end: int) -> list[Hop]:
        """The cheapest chain for blocks ``start:end``, measuring servers' latency the first time."""
        for attempt in range(3):
            servers = await self.refresh(force=attempt > 0)
            fresh = [p for p in servers if p not in self.rtt and p not in self.bans.banned()]
            results = await asyncio.gather(*(self.ping(p) for p in fresh), return_exceptions=True)
            for peer, result in zip(fresh, results, strict=True):
                if isinstance(result, BaseException):
                    logger.info("server %s does not answer (%s); banning it for a while", peer, result)
                    self.bans.ban(peer)
            try:
                return plan_route(servers, start, end, self.cuts, self.rtt, self.bans.banned())
            except NoRouteError:
                if attempt == 2:
                    raise
                await asyncio.sleep(1.0 + attempt)
        raise AssertionError("unreachable")

    def fail(self, peer: str, exc: BaseException) -> None:
        seconds = self.bans.ban(peer)
        self.rtt.pop(peer, None)
        logger.warning("server %s failed (%s); banned for %.0fs, re-routing", peer, exc, seconds)

    async def backoff(self, attempt: int) -> None:
        await asyncio.sleep(min(0.1 * 2**attempt, 5.0))

    # ---- stateless calls -------------------------------------------------------------------------
    async def _call(self, kind: str, hop: Hop, tensors: Tensors) -> Tensors:
        """One stateless request: blocks ``hop.start:hop.end`` on ``hop.peer``."""
        stream = await self.transport.connect(hop.peer, wire.PROTOCOL)
        try:
            header = {"type": kind, "start": hop.start, "end": hop.end}
            _, out = await asyncio.wait_for(
                request(stream, header, tensors, self.compressor, self.decoders), self.timeout
            )
        finally:
            stream.close()
        return out

    async def _forward_pieces(
        self, start: int, end: int, base: Tensors, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, list[Piece]]:
        """Blocks ``start:end`` statelessly, re-routing around failing servers. Also returns the pieces
        the blocks were run in, with each piece's input (what backward needs)."""
        position, pieces, attempt = start, [], 0
        while position < end:
            hop = (await self.route(position, end))[0]
            try:
                out = await self._call("forward", hop, for_blocks(base, hidden, hop.start, hop.end))
            except Exception as exc:
                if not _retryable(exc) or attempt >= self.max_retries:
                    raise
                self.fail(hop.peer, exc)
                await self.backoff(attempt)
                attempt += 1
                continue
            pieces.append((hop.start, hop.end, hidden))
            hidden, position = out["hidden"], hop.end
        return hidden, pieces

    async def _backward_piece(
        self, piece: Piece, base: Tensors, grad: torch.Tensor, side_grads: Tensors
    ) -> torch.Tensor:
        """The gradient w.r.t. a piece's input hidden states (side-input gradients are added to
        ``side_grads``). If no server hosts the whole piece any more, the piece is re-split: its
        sub-pieces' inputs are recomputed by a forward pass, then the backward runs through them in reverse."""
        start, end, hidden = piece
        attempt = 0
        while True:
            hops = await self.route(start, end)
            if len(hops) > 1:
                _, pieces = await self._forward_pieces(start, end, base, hidden)
                for sub in reversed(pieces):
                    grad = await self._backward_piece(sub, base, grad, side_grads)
                return grad
            try:
                tensors = {**for_blocks(base, hidden, start, end), "grad": grad}
                out = await self._call("backward", hops[0], tensors)
            except Exception as exc:
                if not _retryable(exc) or attempt >= self.max_retries:
                    raise
                self.fail(hops[0].peer, exc)
                await self.backoff(attempt)
                attempt += 1
                continue
            for name, total in side_grads.items():
                total[:, :, start:end] += out[f"grad.{name}"].to(total.dtype)
            return out["grad"]

    async def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None,
        side: Tensors | None = None,
    ) -> tuple[torch.Tensor, list[Piece]]:
        """Hidden states through every block; also returns the pieces they ran in (for :meth:`backward`)."""
        base = _inputs(position_ids, mask, side)
        return await self._forward_pieces(0, self.num_blocks, base, hidden)

    async def backward(
        self,
        pieces: list[Piece],
        grad: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None,
        side: Tensors | None = None,
    ) -> tuple[torch.Tensor, Tensors]:
        """Gradients w.r.t. the input hidden states and the side inputs of a :meth:`forward`."""
        base = _inputs(position_ids, mask, side)
        side_grads = {name: torch.zeros_like(t) for name, t in (side or {}).items()}
        for piece in reversed(pieces):
            grad = await self._backward_piece(piece, base, grad, side_grads)
        return grad, side_grads


Piece = tuple[int, int, torch.Tensor]  # blocks start:end and the hidden states that went in
_MAIN = ("hidden", "position_ids", "attention_mask", "grad")


def _inputs(position_ids: torch.Tensor, mask: torch.Tensor | None, side: Tensors | None) -> Tensors:
    """What every hop of one step shares: positions, padding mask, all blocks' side inputs."""
    tensors = {"position_ids": position_ids.to(torch.int64), **(side or {})}
    if mask is not None:
        tensors["attention_mask"] = mask.to(torch.int64)
    return tensors


def for_blocks(base: Tensors, hidden: torch.Tensor, start: int, end: int | None = None) -> Tensors:
    """A request's tensors for blocks ``start:end``: side inputs (all blocks' in ``base``) are cut to
    those blocks; with ``end=None`` to ``start:`` (a session step: a server pushes later blocks' on)."""
    return {
        name: t if name in _MAIN else t[:, :, start:end] for name, t in {**base, "hidden": hidden}.items()
    }


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

    def push_ref(self) -> dict[str, str]:
        return {"peer": self.hop.peer, "session_id": self.id}

    async def open(self, client: SwarmClient, batch: int, max_length: int, push: dict | None) -> None:
        self.stream = await client.transport.connect(self.hop.peer, wire.PROTOCOL)
        header = {
            "type": "open",
            "session_id": self.id,
            "start": self.hop.start,
            "end": self.hop.end,
            "batch_size": batch,
            "max_length": max_length,
            "push": push,
        }
        # No round trip of its own: the first step follows at once, and the open's reply (an error if
        # the server refuses, e.g. busy) is read just before that step's reply.
        await wire.send(self.stream, header)
        self.opening = True

    async def _next_reply(self, client: SwarmClient) -> tuple[dict[str, Any], Tensors]:
        assert self.stream is not None
        if self.opening:
            await read_reply(self.stream, client.decoders)
            self.opening = False
        return await read_reply(self.stream, client.decoders)

    async def send(self, client: SwarmClient, tensors: Tensors) -> None:
        """Deliver the current step's input ourselves (no push, or a push that is late)."""
        assert self.stream is not None
        await wire.send(self.stream, {"type": "step", "step": self.steps}, tensors, client.compressor)
        self.sent += 1

    async def receive(
        self, client: SwarmClient, tensors: Tensors, pushed: bool
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The current step's output. When the input was ``pushed`` by the previous server, the client
        sends nothing unless the output is late (a push lost on the way): then it sends its own copy,
        which the server ignores if the push did arrive."""
        assert self.stream is not None
        begin = time.perf_counter()
        reply = asyncio.ensure_future(self._next_reply(client))
        try:
            if pushed:
                grace = max(client.push_grace, 4 * self.wait)
                done, _ = await asyncio.wait({reply}, timeout=grace)
                if not done:
                    logger.info("step %d of %s is late; sending it without the push", self.steps, self.hop)
                    await self.send(client, tensors)
            head, out = await asyncio.wait_for(reply, client.timeout)
        except BaseException:
            reply.cancel()
            raise
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
        }

    async def set_push(self, push: dict | None) -> None:
        if self.stream is not None:
            await wire.send(self.stream, {"type": "route", "push": push})

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


class InferenceSession:
    """A chain of server sessions that keep KV caches across steps (see the module docstring)."""

    def __init__(self, client: SwarmClient, max_length: int) -> None:
        self.client = client
        self.max_length = max_length
        self.batch: int | None = None
        self.hops: list[HopSession] = []
        self.position = 0  # tokens processed so far
        self.closed = False

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self.hops]

    async def _open_chain(self, start: int, end: int, after: HopSession | None) -> list[HopSession]:
        hops = [HopSession(h) for h in await self.client.route(start, end)]
        pushes = [h.push_ref() for h in hops[1:]] + [after.push_ref() if after else None]
        opened = await asyncio.gather(
            *(h.open(self.client, self.batch, self.max_length, p) for h, p in zip(hops, pushes, strict=True)),
            return_exceptions=True,
        )
        failures = [(h, r) for h, r in zip(hops, opened, strict=True) if isinstance(r, BaseException)]
        if failures:
            for h in hops:
                h.close()
            for h, exc in failures:
                if _retryable(exc):
                    self.client.fail(h.hop.peer, exc)
            raise failures[0][1]
        return hops

    async def step(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None,
        side: Tensors | None = None,
    ) -> torch.Tensor:
        if self.closed:
            raise RuntimeError("this inference session is closed")
        batch, length = hidden.shape[:2]
        if self.batch is None:
            self.batch = batch
        elif batch != self.batch:
            raise ValueError(f"this inference session runs batch size {self.batch}, got {batch}")
        if self.position + length > self.max_length:
            raise ValueError(
                f"the session was opened for max_length={self.max_length} tokens; {self.position} are used and "
                f"{length} more were given. Open inference_session(max_length=...) with a larger limit"
            )
        if not self.hops:
            self.hops = await self._with_retries(lambda: self._open_chain(0, self.client.num_blocks, None))
        base = _inputs(position_ids, mask, side)
        index, attempt, pushed = 0, 0, False
        while index < len(self.hops):
            hop = self.hops[index]
            tensors = for_blocks(base, hidden, hop.hop.start)
            try:
                if not pushed:
                    await hop.send(self.client, tensors)
                out, head = await hop.receive(self.client, tensors, pushed)
            except Exception as exc:
                if not _retryable(exc) or attempt >= self.client.max_retries:
                    raise
                self.client.fail(hop.hop.peer, exc)
                await self.client.backoff(attempt)
                attempt += 1
                await self._replace(index)
                pushed = False  # the new server has not seen this step: the client delivers it
                continue
            # the server wrote its output to the next server's session: the client sends nothing there
            pushed = bool(head.get("pushed")) and index + 1 < len(self.hops)
            hidden = out
            index += 1
        self.position += length
        return hidden

    async def _replace(self, index: int) -> None:
        """Swap hop ``index`` for a fresh chain over its blocks and rebuild its cache by replay."""
        old = self.hops[index]
        old.close()
        after = self.hops[index + 1] if index + 1 < len(self.hops) else None
        start, end = old.hop.start, old.hop.end
        for attempt in range(self.client.max_retries + 1):
            new = await self._with_retries(lambda: self._open_chain(start, end, after))
            try:
                for inputs in old.history:  # side inputs in it start at the old hop's first block
                    hidden = inputs["hidden"]
                    for hop in new:
                        failing = hop
                        current = for_blocks(inputs, hidden, hop.hop.start - start)
                        hidden = await hop.step(self.client, current)
            except Exception as exc:
                for hop in new:
                    hop.close()
                if not _retryable(exc) or attempt >= self.client.max_retries:
                    raise
                self.client.fail(failing.hop.peer, exc)
                await self.client.backoff(attempt)
                continue
            self.hops[index : index + 1] = new
            if index > 0:
                try:
                    await self.hops[index - 1].set_push(new[0].push_ref())
                except Exception:  # noqa: BLE001 - push is an optimisation; the next step notices failures
                    pass
            logger.info("re-routed blocks %d:%d through %s", start, end, [h.hop for h in new])
            return

    async def _with_retries(self, make: Any) -> Any:
        for attempt in range(self.client.max_retries + 1):
            try:
                return await make()
            except Exception as exc:
                if not _retryable(exc) or attempt >= self.client.max_retries:
                    raise
                logger.warning("opening a session failed (%s); retrying", exc)
            await self.client.backoff(attempt)

    def stats(self) -> list[dict[str, Any]]:
        """Per hop of the live chain: steps, where the server took their inputs from, what the client sent."""
        return [hop.stats() for hop in self.hops]

    def close(self) -> None:
        for hop in self.hops:
            hop.close()
        self.hops = []
        self.closed = True
