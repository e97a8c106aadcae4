"""The OpenAI-compatible HTTP API (Starlette; served by uvicorn, see :mod:`bloombee_core.api`).

``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as server-sent
events in OpenAI's chunk format with ``"stream": true``), and the chat page at ``/``. Every error is an
OpenAI error body (``{"error": {"message", "type", "param", "code"}}``) with its status code.

Each request's generation runs in a thread of its own (:meth:`Engine.run`) and sends its text here
through a queue; when the HTTP client goes away, the request is cancelled: the generation stops at its
next token and its inference session closes on the servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from bloombee_core.api import schemas
from bloombee_core.api.engine import ApiError, Cancelled, Engine, Generation, Outcome, Piece, invalid
from bloombee_core.client.retry import SwarmBusyError
from bloombee_core.swarm.routing import NoRouteError

logger = logging.getLogger(__name__)

MAX_BODY = 4 << 20  # bytes of one request body
ROLE = Piece("")  # marks a chat stream's first chunk


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _failure(exc: BaseException) -> ApiError:
    """What a failed generation tells its client."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, NoRouteError):
        return ApiError(503, str(exc), "service_unavailable", "no_route")
    if isinstance(exc, SwarmBusyError):
        return ApiError(503, str(exc), "service_unavailable", "swarm_busy")
    logger.exception("generation failed", exc_info=exc)
    return ApiError(500, f"the generation failed: {type(exc).__name__}: {exc}", "server_error")


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """Server-sent events that stop (closing the event source, which cancels its generation) as soon as
    the client disconnects, whatever ASGI version the server speaks."""

    def __init__(self, events: AsyncIterator[str], cancelled: threading.Event) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.cancelled = cancelled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        events = self.body_iterator
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away while we were writing
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await _until_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self.cancelled.set()  # also when the events never started
            await events.aclose()  # type: ignore[attr-defined]


class Api:
    """The routes over one :class:`Engine`."""

    def __init__(self, engine: Engine, api_key: str | None = None, max_concurrent: int = 8) -> None:
        self.engine, self.api_key = engine, api_key
        self.slots = asyncio.Semaphore(max_concurrent)  # generations at once; the rest wait their turn
        self.page = resources.files("bloombee_core.api").joinpath("chat.html").read_text()

    def app(self) -> Starlette:
        routes = [
            Route("/", self.chat_page),
            Route("/v1/models", self.models),
            Route("/v1/models/{name:path}", self.one_model),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ]
        handlers = {HTTPException: self._http_error, ApiError: lambda _, exc: _error(exc)}
        return Starlette(routes=routes, exception_handlers=handlers)  # type: ignore[arg-type]

    # ---- plain routes ------------------------------------------------------------------------

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        kinds = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}
        body = ApiError(exc.status_code, str(exc.detail), kinds.get(exc.status_code, "invalid_request_error"))
        return _error(body)

    async def chat_page(self, request: Request) -> Response:
        return HTMLResponse(self.page)

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.engine.name, "object": "model", "created": 0, "owned_by": "bloombee"}

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def one_model(self, request: Request) -> Response:
        self._authorize(request)
        self._known(request.path_params["name"])
        return JSONResponse(self._model_card())

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(
                401,
                "Incorrect API key provided: pass it as 'Authorization: Bearer KEY'",
                "invalid_request_error",
                "invalid_api_key",
            )

    def _known(self, name: str) -> None:
        if name != self.engine.name:
            raise ApiError(
                404,
                f"The model '{name}' does not exist: this server serves '{self.engine.name}'",
                "invalid_request_error",
                "model_not_found",
                "model",
            )

    async def _body(self, request: Request) -> Any:
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            raise invalid(f"the request body is over {MAX_BODY} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY:
                raise invalid(f"the request body is over {MAX_BODY} bytes")
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise invalid(f"could not parse the JSON body of the request: {exc}") from None

    # ---- generations -------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        req = schemas.parse(schemas.CompletionRequest, await self._body(request))
        self._known(req.model)
        prompt = req.prompt
        if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)):
            ids = list(prompt)
            vocab = len(self.engine.tokenizer)
            if any(not 0 <= t < vocab for t in ids):
                raise invalid(f"prompt token ids must lie in [0, {vocab})", "prompt")
        else:
            ids = await anyio.to_thread.run_sync(
                self.engine.text_prompt, prompt[0] if isinstance(prompt, list) else prompt
            )
        gen = req.generation(ids, self.engine.limit(len(ids), req.new_tokens(), "prompt"), req.logprobs)
        rid = schemas.new_id("cmpl")

        def chunk(piece: Piece | None, outcome: Outcome | None) -> dict[str, Any]:
            choice = {
                "index": 0,
                "text": piece.text if piece else "",
                "logprobs": schemas.completion_logprobs([piece])
                if piece and gen.logprobs is not None
                else None,
                "finish_reason": outcome.finish_reason if outcome else None,
            }
            extra = schemas.extension(outcome) if outcome else {}
            return schemas.envelope("text_completion", rid, req.model, [choice], **extra)

        if req.stream:
            return await self._stream(gen, chunk, req.include_usage(), "text_completion", rid, req.model)
        pieces, outcome = await self._collect(request, gen)
        choice = {
            "index": 0,
            "text": "".join(p.text for p in pieces),
            "logprobs": schemas.completion_logprobs(pieces) if gen.logprobs is not None else None,
            "finish_reason": outcome.finish_reason,
        }
        body = schemas.envelope(
            "text_completion",
            rid,
            req.model,
            [choice],
            usage=schemas.usage(outcome),
            **schemas.extension(outcome),
        )
        return JSONResponse(body)

    async def chat(self, request: Request) -> Response:
        self._authorize(request)
        req = schemas.parse(schemas.ChatRequest, await self._body(request))
        self._known(req.model)
        messages = [m.as_template_input() for m in req.messages]
        ids = await anyio.to_thread.run_sync(self.engine.chat_prompt, messages)
        logprobs = req.wanted_logprobs()
        gen = req.generation(ids, self.engine.limit(len(ids), req.new_tokens(), "messages"), logprobs)
        rid = schemas.new_id("chatcmpl")

        def chunk(piece: Piece | None, outcome: Outcome | None) -> dict[str, Any]:
            delta: dict[str, Any] = {}
            if piece is not None:  # the role comes once, in a first chunk with no text
                delta = {"role": "assistant", "content": ""} if piece is ROLE else {"content": piece.text}
            choice = {
                "index": 0,
                "delta": delta,
                "logprobs": schemas.chat_logprobs([piece]) if piece and logprobs is not None else None,
                "finish_reason": outcome.finish_reason if outcome else None,
            }
            extra = schemas.extension(outcome) if outcome else {}
            return schemas.envelope("chat.completion.chunk", rid, req.model, [choice], **extra)

        if req.stream:
            return await self._stream(
                gen, chunk, req.include_usage(), "chat.completion.chunk", rid, req.model
            )
        pieces, outcome = await self._collect(request, gen)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(p.text for p in pieces), "refusal": None},
            "logprobs": schemas.chat_logprobs(pieces) if logprobs is not None else None,
            "finish_reason": outcome.finish_reason,
        }
        body = schemas.envelope(
            "chat.completion",
            rid,
            req.model,
            [choice],
            usage=schemas.usage(outcome),
            **schemas.extension(outcome),
        )
        return JSONResponse(body)

    def _start(self, gen: Generation) -> tuple[asyncio.Queue, threading.Event, Callable[[], Awaitable[None]]]:
        """The generation's event queue (``("piece", Piece)`` ... then ``("done", Outcome)`` or
        ``("error", exc)``), its cancel flag, and what starts it (once a slot is free)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def put(item: tuple[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (the API is shutting down)
                cancelled.set()

        def work() -> None:
            try:
                put(("done", self.engine.run(gen, lambda piece: put(("piece", piece)), cancelled)))
            except Cancelled:
                pass
            except BaseException as exc:
                put(("error", exc))
            finally:
                with contextlib.suppress(RuntimeError):  # the event loop is gone: nothing to release
                    loop.call_soon_threadsafe(self.slots.release)

        async def start() -> None:
            await self.slots.acquire()
            try:
                await anyio.to_thread.run_sync(self.engine.check_swarm)
            except BaseException:
                self.slots.release()
                raise
            threading.Thread(target=work, name="bloombee-api-generation", daemon=True).start()

        return queue, cancelled, start

    async def _collect(self, request: Request, gen: Generation) -> tuple[list[Piece], Outcome]:
        queue, cancelled, start = self._start(gen)
        await start()
        pieces: list[Piece] = []
        gone = asyncio.ensure_future(_until_disconnect(request.receive))
        try:
            while True:
                getting = asyncio.ensure_future(queue.get())
                await asyncio.wait({getting, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    getting.cancel()
                    raise Cancelled  # the client left: nobody reads the answer
                kind, item = getting.result()
                if kind == "piece":
                    pieces.append(item)
                elif kind == "done":
                    return pieces, item
                else:
                    raise _failure(item)
        finally:
            cancelled.set()
            gone.cancel()

    async def _stream(
        self,
        gen: Generation,
        chunk: Callable[[Piece | None, Outcome | None], dict[str, Any]],
        include_usage: bool,
        kind: str,
        rid: str,
        model: str,
    ) -> Response:
        queue, cancelled, start = self._start(gen)
        await start()  # a swarm that cannot serve answers 503 before the stream begins

        def sse(data: dict[str, Any] | str) -> str:
            return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"

        async def events() -> AsyncIterator[str]:
            if kind == "chat.completion.chunk":
                yield sse(chunk(ROLE, None))
            while True:
                what, item = await queue.get()
                if what == "piece":
                    yield sse(chunk(item, None))
                elif what == "done":
                    yield sse(chunk(None, item))
                    if include_usage:
                        yield sse(schemas.envelope(kind, rid, model, [], usage=schemas.usage(item)))
                    yield sse("[DONE]")
                    return
                else:
                    yield sse(_failure(item).body())
                    return

        return _EventStream(events(), cancelled)
