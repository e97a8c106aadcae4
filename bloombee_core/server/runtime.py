"""The server runtime: hosts one span of blocks, announces it, and serves forward, backward, inference
and push requests over one stream protocol (:data:`bloombee_core.swarm.wire.PROTOCOL`).

A stream starts with a request header whose ``type`` decides what the stream is:

* ``info`` / ``forward`` / ``backward``: request-response pairs, repeated until the client closes.
* ``open``: an inference session. Then ``step`` messages (hidden states + positions + mask), each
  answered with the span's output, and ``route`` messages that change where outputs are pushed.
  The KV cache lives as long as the stream; the session reserves its worst-case cache size from the
  server's budget when it opens (no room: a ``busy`` error, never an out-of-memory crash).
* ``push``: another server delivering a step's input for one of our sessions (server->server push).

Every size, shape and dtype is checked against the session and the server's limits before a payload is
read. A bad request gets an error reply naming what was wrong, then its stream is closed; nothing
else is affected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from bloombee_core.compression import RAW
from bloombee_core.family import span_problem
from bloombee_core.swarm import wire
from bloombee_core.swarm.records import ServerRecord, announce
from bloombee_core.swarm.wire import ProtocolError, TensorMeta
from bloombee_core.transport import FrameStream, Transport, TransportError

logger = logging.getLogger(__name__)


@dataclass
class Limits:
    max_batch: int = 64
    max_length: int = 8192  # tokens a session may hold
    max_tokens: int = 16384  # batch * tokens in one request
    max_tensor_bytes: int = 256 << 20
    max_sessions: int = 256
    max_pending_steps: int = 8


class RequestError(Exception):
    """A request the server refuses; ``code`` is ``bad_request`` or ``busy``."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Session:
    id: str
    span: Any  # BlockSpan view for the requested blocks
    cache: Any
    batch: int
    max_length: int
    reserved: int
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    next_step: int = 0
    push_target: tuple[str, str] | None = None
    push_stream: asyncio.Task | None = None  # connecting / connected stream to the push target
    pending: dict[int, tuple[dict[str, torch.Tensor], str]] = field(default_factory=dict)
    # evidence of where inputs came from: step messages received from the client / pushed by a server
    from_client: int = 0
    from_push: int = 0

    def set_push(self, target: tuple[str, str] | None, transport: Transport) -> None:
        """Point pushes at ``target`` and start opening its stream now, off the first step's path."""
        self.close_push()
        self.push_target = target
        if target is not None:
            self.push_stream = asyncio.create_task(_open_push(transport, target[0]))

    def close_push(self) -> None:
        if self.push_stream is not None:
            task, self.push_stream = self.push_stream, None
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().close()
            else:
                task.cancel()


class SpanServer:
    def __init__(
        self,
        transport: Transport,
        span: Any,
        *,
        model: str,
        model_info: dict[str, Any],
        family: str,
        cuts: list[int],
        dtype: torch.dtype,
        cache_budget: int,
        device: str | torch.device = "cpu",
        compressors: dict[str, Any] | None = None,
        output_compressor: Any = RAW,
        public_name: str = "",
        version: str = "",
        limits: Limits | None = None,
        ttl: float = 30.0,
    ) -> None:
        self.transport = transport
        self.span = span
        self.span.requires_grad_(False)
        self.model, self.model_info, self.family = model, model_info, family
        self.cuts = set(cuts)
        self.dtype = dtype
        self.device = torch.device(device)
        self.hidden_size = int(span.config.hidden_size)
        # per-layer inputs the family needs from the client (Gemma 4): name -> feature size
        self.side_sizes: dict[str, int] = dict(span.family.side_inputs(span.config))
        self.num_blocks = int(span.family.num_blocks(span.config))
        self.cache_budget, self.cache_used = cache_budget, 0
        self.decoders = wire.compressor_table(compressors)
        self.output_compressor = output_compressor
        self.public_name, self.version = public_name, version
        self.limits = limits or Limits()
        self.ttl = ttl
        self.sessions: dict[str, Session] = {}
        self.throughput = 0.0
        self._views: dict[tuple[int, int], Any] = {}
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="bloombee-compute")
        self._in_executor = 0  # jobs handed to the compute thread and not finished
        self._announcer: asyncio.Task | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.throughput = await loop.run_in_executor(self._compute, self._measure_throughput)
        await self.transport.serve(wire.PROTOCOL, self._handle)
        await self._announce()
        self._announcer = asyncio.create_task(self._announce_forever())

    async def stop(self) -> None:
        if self._announcer is not None:
            self._announcer.cancel()
        try:
            await asyncio.wait_for(self._announce(state="offline"), 2)
        except Exception:  # noqa: BLE001 - best effort: the records expire anyway
            pass
        self._compute.shutdown(wait=False, cancel_futures=True)

    def record(self, state: str = "online") -> ServerRecord:
        return ServerRecord(
            peer=self.transport.peer_id,
            start=self.span.start,
            end=self.span.end,
            throughput=self.throughput,
            cache_left=self.cache_budget - self.cache_used,
            dtype=str(self.dtype).removeprefix("torch."),
            family=self.family,
            version=self.version,
            public_name=self.public_name,
            state=state,
        )

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

    def _measure_throughput(self, steps: int = 4) -> float:
        """Tokens per second through the span in batch-1 decoding, measured once at start."""
        hidden = torch.zeros(1, 1, self.hidden_size, dtype=self.dtype, device=self.device)
        n = self.span.end - self.span.start
        side = {k: hidden.new_zeros(1, 1, n, size) for k, size in self.side_sizes.items()}
        cache = self.span.new_cache(1, steps + 1)
        with torch.inference_mode():
            pos = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            self.span(hidden, position_ids=pos, cache=cache, side_inputs=side)
            begin = time.perf_counter()
            for i in range(steps):
                pos = torch.full((1, 1), i + 1, dtype=torch.long, device=self.device)
                self.span(hidden, position_ids=pos, cache=cache, side_inputs=side)
        return steps / max(time.perf_counter() - begin, 1e-6)

    # ---- dispatch --------------------------------------------------------------------------------
    async def _handle(self, stream: FrameStream) -> None:
        try:
            while True:
                message = await wire.read_header(stream)
                if message is None:
                    return
                header, metas = message
                kind = header.get("type")
                if kind == "info":
                    await wire.send(stream, {"ok": True, **self.info()})
                elif kind == "forward":
                    await self._forward(stream, header, metas)
                elif kind == "backward":
                    await self._backward(stream, header, metas)
                elif kind == "open":
                    await self._inference(stream, header)
                    return
                elif kind == "push":
                    await self._push_stream(stream, header, metas)
                    return
                else:
                    raise RequestError(
                        f"unknown request type {kind!r}; expected info, forward, backward, open or push"
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

    def info(self) -> dict[str, Any]:
        return {
            "peer": self.transport.peer_id,
            "model": self.model,
            "start": self.span.start,
            "end": self.span.end,
            "family": self.family,
            "dtype": str(self.dtype).removeprefix("torch."),
            "cache_left": self.cache_budget - self.cache_used,
            "throughput": self.throughput,
            "version": self.version,
            "sessions": len(self.sessions),
            "resident_fraction": self._resident_fraction(),
        }

    def _resident_fraction(self) -> float:
        """Share of the span's weight bytes kept on the device (below 1 with an offload policy)."""
        from bloombee_core.offload import offload_plan

        plan = offload_plan(self.span)
        return float(plan.resident_fraction) if plan is not None else 1.0

    # ---- validation ------------------------------------------------------------------------------
    def _blocks(self, header: dict[str, Any]) -> Any:
        start, end = header.get("start"), header.get("end")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)):
            raise RequestError(f"'start' and 'end' must be integers, got {start!r} and {end!r}")
        problem = span_problem(start, end, (self.span.start, self.span.end), self.cuts, "this server")
        if problem:
            raise RequestError(problem)
        key = (start, end)
        if key not in self._views:
            self._views[key] = self.span.sub_span(start, end)
        return self._views[key]

    def _check_metas(
        self,
        metas: list[TensorMeta],
        required: tuple[str, ...],
        view: Any,
        batch: int | None = None,
        max_mask: int = 0,
    ) -> dict[str, TensorMeta]:
        by_name = {m.name: m for m in metas}
        required = (*required, *self.side_sizes)
        allowed = set(required) | {"attention_mask"}
        if set(by_name) - allowed or len(by_name) != len(metas):
            raise RequestError(f"unexpected tensors {sorted(by_name)}; expected {sorted(allowed)}")
        for name in required:
            if name not in by_name:
                raise RequestError(f"missing tensor {name!r}")
        hidden = by_name["hidden"]
        if len(hidden.shape) != 3 or hidden.shape[2] != self.hidden_size:
            raise RequestError(
                f"hidden must be [batch, tokens, {self.hidden_size}], got {list(hidden.shape)}"
            )
        b, t = hidden.shape[:2]
        if not hidden.dtype.is_floating_point:
            raise RequestError(f"hidden must be floating point, got {hidden.dtype}")
        if batch is not None and b != batch:
            raise RequestError(f"this session was opened for batch size {batch}, got hidden of batch {b}")
        if not 1 <= b <= self.limits.max_batch or t < 1 or b * t > self.limits.max_tokens:
            raise RequestError(
                f"hidden of shape {list(hidden.shape)} is outside the limits (batch 1..{self.limits.max_batch}, "
                f"tokens >= 1, batch*tokens <= {self.limits.max_tokens})"
            )
        for name in ("grad", "output"):
            if name in by_name and by_name[name].shape != hidden.shape:
                raise RequestError(f"{name} must have the shape of hidden {list(hidden.shape)}")
        pos = by_name["position_ids"]
        if pos.dtype != torch.int64 or pos.shape != (b, t):
            raise RequestError(f"position_ids must be int64 [{b}, {t}], got {pos.dtype} {list(pos.shape)}")
        mask = by_name.get("attention_mask")
        if mask is not None:
            limit = max_mask or self.limits.max_length
            if (
                mask.dtype != torch.int64
                or len(mask.shape) != 2
                or mask.shape[0] != b
                or not t <= mask.shape[1] <= limit
            ):
                raise RequestError(
                    f"attention_mask must be int64 [{b}, past+{t}] with at most {limit} columns, "
                    f"got {mask.dtype} {list(mask.shape)}"
                )
        for name, size in self.side_sizes.items():
            # this span's layers first, then (to be pushed on) those of later spans, never past the model
            side, first, most = by_name[name], view.end - view.start, self.num_blocks - view.start
            if (
                not side.dtype.is_floating_point
                or len(side.shape) != 4
                or side.shape[:2] != (b, t)
                or side.shape[3] != size
                or not first <= side.shape[2] <= most
            ):
                raise RequestError(
                    f"side input {name!r} must be floating point [{b}, {t}, {first}..{most} layers, {size}] "
                    f"for blocks {view.start}:{view.end}, got {side.dtype} {list(side.shape)}"
                )
        return by_name

    async def _read(self, stream: FrameStream, metas: list[TensorMeta]) -> dict[str, torch.Tensor]:
        tensors = await wire.read_tensors(stream, metas, self.decoders, self.limits.max_tensor_bytes)
        mask = tensors.get("attention_mask")
        if mask is not None and not bool(((mask == 0) | (mask == 1)).all()):
            raise RequestError("attention_mask may only hold 0 (padding) and 1 (token)")
        pos = tensors["position_ids"]
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= 1 << 20):
            raise RequestError(f"position_ids must lie in [0, 2**20), got {int(pos.min())}..{int(pos.max())}")
        return tensors

    async def _accept_step(
        self, session: Session, stream: FrameStream, header: dict, metas: list[TensorMeta], source: str
    ) -> None:
        """Check a step's tensors against its session, read them and queue the step (from the client or a push)."""
        step = _step_number(header)
        self._check_metas(metas, ("hidden", "position_ids"), session.span, session.batch, session.max_length)
        tensors = await self._read(stream, metas)
        if source == "push":
            session.from_push += 1
        else:
            session.from_client += 1
        await session.inbox.put(("step", step, tensors, source))

    async def _run(self, fn: Any, *args: Any) -> Any:
        self._in_executor += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._compute, fn, *args)
        finally:
            self._in_executor -= 1

    async def _run_step(self, session: Session, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """One inference step. Small ones (decoding) run right here on the event loop when the compute
        thread is idle: handing them to the thread and back costs two cross-thread wake-ups, a
        noticeable share of a few-millisecond step; nothing else could run meanwhile anyway."""
        batch, tokens = tensors["hidden"].shape[:2]
        if batch * tokens <= INLINE_TOKENS and self._in_executor == 0:
            return self._inference_step(session, tensors)
        return await self._run(self._inference_step, session, tensors)

    # ---- forward / backward (no cache) -----------------------------------------------------------
    async def _forward(self, stream: FrameStream, header: dict[str, Any], metas: list[TensorMeta]) -> None:
        view = self._blocks(header)
        self._check_metas(metas, ("hidden", "position_ids"), view)
        t = await self._read(stream, metas)

        def run() -> torch.Tensor:
            with torch.inference_mode():
                out = view(
                    t["hidden"].to(self.device, self.dtype),
                    position_ids=t["position_ids"].to(self.device),
                    attention_mask=_on(t.get("attention_mask"), self.device),
                    side_inputs=self._side(view, t),
                )
            return out.to("cpu", t["hidden"].dtype)

        await wire.send(stream, {"ok": True}, {"hidden": await self._run(run)}, self.output_compressor)

    async def _backward(self, stream: FrameStream, header: dict[str, Any], metas: list[TensorMeta]) -> None:
        view = self._blocks(header)
        self._check_metas(metas, ("hidden", "grad", "position_ids"), view)
        t = await self._read(stream, metas)

        def run() -> dict[str, torch.Tensor]:
            with torch.enable_grad():
                hidden = t["hidden"].to(self.device, self.dtype).requires_grad_(True)
                side = {k: v.requires_grad_(True) for k, v in self._side(view, t).items()}
                pos, mask = t["position_ids"].to(self.device), _on(t.get("attention_mask"), self.device)
                out = view(hidden, position_ids=pos, attention_mask=mask, side_inputs=side)
                grads = torch.autograd.grad(
                    out, [hidden, *side.values()], t["grad"].to(out.device, out.dtype)
                )
            # gradients w.r.t. the side inputs this span used (its own layers), named "grad.<name>"
            names = ["grad", *(f"grad.{k}" for k in side)]
            return {n: g.to("cpu", t["hidden"].dtype) for n, g in zip(names, grads, strict=True)}

        await wire.send(stream, {"ok": True}, await self._run(run), self.output_compressor)

    # ---- inference sessions ----------------------------------------------------------------------
    async def _inference(self, stream: FrameStream, header: dict[str, Any]) -> None:
        sid, batch, max_length = header.get("session_id"), header.get("batch_size"), header.get("max_length")
        if not isinstance(sid, str) or not 8 <= len(sid) <= 64:
            raise RequestError(f"session_id must be a string of 8..64 characters, got {sid!r:.80}")
        if sid in self.sessions:
            raise RequestError(f"session {sid} is already open on this server")
        if not isinstance(batch, int) or not 1 <= batch <= self.limits.max_batch:
            raise RequestError(f"batch_size must be an integer in 1..{self.limits.max_batch}, got {batch!r}")
        if not isinstance(max_length, int) or not 1 <= max_length <= self.limits.max_length:
            raise RequestError(
                f"max_length must be an integer in 1..{self.limits.max_length}, got {max_length!r}"
            )
        view = self._blocks(header)
        if len(self.sessions) >= self.limits.max_sessions:
            raise RequestError(f"busy: {len(self.sessions)} sessions are open, the limit", "busy")
        need = view.cache_bytes(batch, max_length)
        if self.cache_used + need > self.cache_budget:
            raise RequestError(
                f"busy: a session of batch {batch} x {max_length} tokens needs {need} bytes of KV cache, "
                f"{self.cache_budget - self.cache_used} of {self.cache_budget} are free; try another server or later",
                "busy",
            )
        self.cache_used += need
        session = Session(sid, view, view.new_cache(batch, max_length), batch, max_length, need)
        self.sessions[sid] = session
        reader: asyncio.Task | None = None
        try:
            session.set_push(_push_target(header.get("push")), self.transport)
            reader = asyncio.create_task(self._read_steps(stream, session))
            await wire.send(
                stream, {"ok": True, "session_id": sid, "cache_left": self.cache_budget - self.cache_used}
            )
            await self._serve_session(stream, session)
        finally:
            if reader is not None:
                reader.cancel()
            self.sessions.pop(sid, None)
            self.cache_used -= session.reserved
            session.close_push()

    async def _read_steps(self, stream: FrameStream, session: Session) -> None:
        """Client messages -> the session's inbox (a ``None`` ends the session, an exception fails it)."""
        try:
            while True:
                message = await wire.read_header(stream)
                if message is None:
                    await session.inbox.put(None)
                    return
                header, metas = message
                kind = header.get("type")
                if kind == "route":
                    await session.inbox.put(("route", _push_target(header.get("push"))))
                elif kind == "step":
                    await self._accept_step(session, stream, header, metas, "client")
                else:
                    raise RequestError(
                        f"unknown message type {kind!r} in an inference session; expected step or route"
                    )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the session loop, which replies
            await session.inbox.put(exc)

    async def _serve_session(self, stream: FrameStream, session: Session) -> None:
        while True:
            item = await session.inbox.get()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            if item[0] == "route":
                session.set_push(item[1], self.transport)
                continue
            _, step, tensors, source = item
            if step < session.next_step:
                continue  # already computed from the other copy (a push and the client's own)
            if step > session.next_step:
                if len(session.pending) >= self.limits.max_pending_steps:
                    raise RequestError(f"step {step} arrived while waiting for step {session.next_step}")
                session.pending.setdefault(step, (tensors, source))
                continue
            while True:
                out = await self._run_step(session, tensors)
                # The push is on the critical path (the next server waits for it); the reply is not
                # (the client keeps it for replay), so the push goes first.
                pushed = await self._push(session, session.next_step, out, tensors)
                reply = {
                    "ok": True,
                    "step": session.next_step,
                    "source": source,
                    "pushed": pushed,
                    "from_client": session.from_client,
                    "from_push": session.from_push,
                }
                await wire.send(stream, reply, {"hidden": out}, self.output_compressor)
                session.next_step += 1
                if session.next_step not in session.pending:
                    break
                tensors, source = session.pending.pop(session.next_step)

    async def _session_soon(self, sid: Any) -> Session | None:
        """The open session ``sid``, waiting briefly: the client opens sessions without waiting for the
        replies, so a push may overtake the next server's ``open`` by a moment."""
        if not isinstance(sid, str):
            return None
        deadline = time.monotonic() + PUSH_WAITS_FOR_OPEN
        while sid not in self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return self.sessions.get(sid)

    def _inference_step(self, session: Session, t: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden, mask = t["hidden"], t.get("attention_mask")
        past, length = session.cache.length, hidden.shape[1]
        if past + length > session.max_length:
            raise RequestError(
                f"the session would hold {past + length} tokens; it was opened for max_length {session.max_length}"
            )
        if mask is not None and mask.shape[1] != past + length:
            raise RequestError(
                f"attention_mask must cover past + new tokens = {past + length} columns, got {mask.shape[1]}"
            )
        with torch.inference_mode():
            out = session.span(
                hidden.to(self.device, self.dtype),
                position_ids=t["position_ids"].to(self.device),
                attention_mask=_on(mask, self.device),
                cache=session.cache,
                side_inputs=self._side(session.span, t),
            )
        return out.to("cpu", hidden.dtype)

    def _side(self, view: Any, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The side inputs of ``view``'s own layers (the first ``end - start`` of what was sent)."""
        n = view.end - view.start
        return {k: t[k][:, :, :n].to(self.device, self.dtype) for k in self.side_sizes}

    async def _push(
        self, session: Session, step: int, out: torch.Tensor, inputs: dict[str, torch.Tensor]
    ) -> bool:
        """Send a step's output straight to the next server; True when it was written to the push stream.

        Best effort: on failure the push is switched off and the reply tells the client to deliver the
        step itself.
        """
        if session.push_target is None or session.push_stream is None:
            return False
        tensors = {"hidden": out, "position_ids": inputs["position_ids"]}
        if "attention_mask" in inputs:
            tensors["attention_mask"] = inputs["attention_mask"]
        n = session.span.end - session.span.start
        for name in self.side_sizes:  # later spans' per-layer inputs travel on with the hidden states
            if inputs[name].shape[2] <= n:
                return False  # the client sent only ours: it must deliver the next server's itself
            tensors[name] = inputs[name][:, :, n:]
        header = {"type": "push", "session_id": session.push_target[1], "step": step}
        try:
            stream = await session.push_stream
            await wire.send(stream, header, tensors, self.output_compressor)
        except Exception as exc:  # noqa: BLE001 - the client delivers the step instead
            logger.info(
                "push to %s failed (%s); the client will deliver the step", session.push_target[0], exc
            )
            session.set_push(None, self.transport)
            return False
        return True

    async def _push_stream(
        self, stream: FrameStream, header: dict[str, Any], metas: list[TensorMeta]
    ) -> None:
        while True:
            sid = header.get("session_id")
            session = await self._session_soon(sid)
            if session is None:
                raise RequestError(f"unknown session id {sid!r:.80}: no such inference session is open here")
            await self._accept_step(session, stream, header, metas, "push")
            message = await wire.read_header(stream)
            if message is None:
                return
            header, metas = message
            if header.get("type") != "push":
                raise RequestError(f"a push stream carries only push messages, got {header.get('type')!r}")


async def _open_push(transport: Transport, peer: str) -> FrameStream:
    stream = await transport.connect(peer, wire.PROTOCOL)
    asyncio.create_task(_drain_replies(stream))
    return stream


def _on(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return tensor.to(device) if tensor is not None else None


def _push_target(value: Any) -> tuple[str, str] | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("peer"), str)
        or not isinstance(value.get("session_id"), str)
    ):
        raise RequestError(
            f"'push' must be null or a map with string 'peer' and 'session_id', got {value!r:.120}"
        )
    return value["peer"], value["session_id"]


def _step_number(header: dict[str, Any]) -> int:
    step = header.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 1 << 31:
        raise RequestError(f"'step' must be a non-negative integer, got {step!r:.40}")
    return step


async def _drain_replies(stream: FrameStream) -> None:
    try:
        while (message := await wire.read_header(stream)) is not None:
            if not message[0].get("ok", False):
                logger.info("push refused by %s: %s", stream.peer, message[0].get("error"))
    except Exception:  # noqa: BLE001 - the push stream is best effort
        pass


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


PUSH_WAITS_FOR_OPEN = 1.0  # seconds
INLINE_TOKENS = 16  # batch * tokens of a step small enough to compute on the event loop
LINGER_SECONDS = 2.0
LINGER_BYTES = 64 << 20


async def _discard(stream: FrameStream, limit: int) -> None:
    while limit > 0:
        chunk = await stream.reader.read(1 << 16)
        if not chunk:
            return
        limit -= len(chunk)
