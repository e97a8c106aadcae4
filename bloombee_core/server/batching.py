"""Cross-session batching: steps of different sessions that are due at about the same time are computed
in one forward over the span (:mod:`bloombee_core.model.batch`), then each session's step loop goes on
(push, reply) as if its step had run alone.

One :class:`StepBatcher` per server. A due step joins the queue; one runner takes the queue's head and
every queued step that can share its forward (the same view of the span, the same number of new tokens
per sequence, within ``max_batch_tokens``) and computes them together. While the compute thread is busy
further steps queue and run together next. When the thread is free the runner waits at most
``wait_ms`` for company, and not at all once every open session that could join has a step queued: a
lone client pays no wait.

Run alone, as before batching: steps of sessions opened for token trees (their steps carry trees and
``keep``) or whose KV cache lives partly off the device (see ``Session.runs_alone``), steps larger than ``max_batch_tokens`` (long prefills), and every step when batching is off
(``max_batch_tokens = 0``). A group never pads its keys past any member's own ``max_length``, so the
temporary combined cache is no larger than the members' reserved caches. Each step is checked against
its session before it joins a group; if a batched forward fails anyway, its steps are retried one by one
(the caches are untouched until a forward succeeds), so one bad step fails only its own session.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from bloombee_core.model.span import check_span_inputs, checked_per_layer_inputs
from bloombee_core.server.checks import RequestError
from bloombee_core.server.compute import INTERACTIVE

if TYPE_CHECKING:
    from collections.abc import Mapping

    from bloombee_core.model import BlockSpan
    from bloombee_core.server.compute import ComputeThread, SpanCompute, Tensors
    from bloombee_core.server.sessions import Session

logger = logging.getLogger(__name__)

ACTIVE_S = 0.5  # a session that sent a step this recently may send the next one any moment


@dataclass
class _Due:
    session: Session
    tensors: Tensors
    future: asyncio.Future[torch.Tensor]

    @property
    def shape(self) -> tuple[int, int]:  # (rows, new tokens per row)
        return tuple(self.tensors["hidden"].shape[:2])


class StepBatcher:
    """Collects the server's due inference steps and computes those that can share a forward together."""

    def __init__(
        self,
        compute: SpanCompute,
        thread: ComputeThread,
        sessions: Mapping[str, Session],
        wait_ms: float = 2.0,
        max_batch_tokens: int = 256,
    ) -> None:
        self.compute, self.thread, self.sessions = compute, thread, sessions
        self.wait, self.max_batch_tokens = wait_ms / 1000, max_batch_tokens
        self._queue: list[_Due] = []
        self._arrived = asyncio.Event()
        self._runner: asyncio.Task | None = None
        # evidence, in the server's info(): steps computed in forwards shared with other sessions' steps
        self.batched_steps = 0
        self.batched_forwards = 0
        self.largest_batch = 0

    def stats(self) -> dict[str, int]:
        return {
            "batched_steps": self.batched_steps,
            "batched_forwards": self.batched_forwards,
            "largest_batch": self.largest_batch,
        }

    async def step(self, session: Session, tensors: Tensors) -> torch.Tensor:
        """Compute ``session``'s due step (its cache grows); batched with others' steps where it can be."""
        rows, tokens = tensors["hidden"].shape[:2]
        session.last_active = time.monotonic()
        if session.runs_alone or not 0 < rows * tokens <= self.max_batch_tokens:
            return await self.thread.run_step(
                rows * tokens,
                self.compute.step,
                session.span,
                session.cache,
                tensors,
                session.adapter,
                alone=self._nobody_else(session),
            )
        _check(session, tensors, self.compute.per_layer_sizes)
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Due(session, tensors, future))
        self._arrived.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self._queue:
            await self._wait_for_company()
            group = self._take_group()
            if group:
                await self._compute(group)

    async def _wait_for_company(self) -> None:
        """Wait up to ``wait`` while sessions that could share the head's forward have no step queued."""
        deadline = time.monotonic() + self.wait
        while (left := deadline - time.monotonic()) > 0 and self._missing():
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    def _nobody_else(self, session: Session) -> bool:
        """No other session stepped lately: computing on the event loop keeps nobody's traffic waiting
        (sessions left open but idle, e.g. a client's previous generate, do not count)."""
        now = time.monotonic()
        return not any(s is not session and now - s.last_active < ACTIVE_S for s in self.sessions.values())

    def _missing(self) -> bool:
        head = self._queue[0].session
        queued = {id(due.session) for due in self._queue}
        return any(
            s.span is head.span and not s.runs_alone and id(s) not in queued and not _siblings(s, head)
            for s in self.sessions.values()
        )

    def _take_group(self) -> list[_Due]:
        """The head and every queued step that can share its forward; they leave the queue."""
        self._queue = [due for due in self._queue if not due.future.done()]  # callers that gave up
        if not self._queue:
            return []
        head = self._queue[0]
        view, tokens = head.session.span, head.shape[1]
        group: list[_Due] = []
        used, longest, room = 0, 0, None
        for due in self._queue:
            rows, n = due.shape
            if due.session.span is not view or n != tokens or used + rows * n > self.max_batch_tokens:
                continue
            if any(_siblings(due.session, other.session) for other in group):
                continue
            cache = due.session.cache
            new_longest = max(longest, cache.length)
            new_room = min(room if room is not None else cache.max_length, cache.max_length)
            if new_longest + tokens > new_room:
                continue  # padding to the longest past must stay within every member's own cache size
            group.append(due)
            used, longest, room = used + rows * n, new_longest, new_room
        chosen = {id(due) for due in group}
        self._queue = [due for due in self._queue if id(due) not in chosen]
        return group

    async def _compute(self, group: list[_Due]) -> None:
        view = group[0].session.span
        if len(group) > 1:
            steps = [(due.session.cache, due.tensors) for due in group]
            try:
                outs = await self.thread.run(self.compute.step_batch, view, steps, priority=INTERACTIVE)
            except Exception:  # noqa: BLE001 - retried one by one: the failing step fails only its session
                logger.exception(
                    "a batched forward of %d steps failed; computing them one by one", len(group)
                )
            else:
                self.batched_steps += len(group)
                self.batched_forwards += 1
                self.largest_batch = max(self.largest_batch, len(group))
                for due, out in zip(group, outs, strict=True):
                    if not due.future.done():
                        due.future.set_result(out)
                return
        for due in group:
            await self._alone(view, due)

    async def _alone(self, view: BlockSpan, due: _Due) -> None:
        rows, tokens = due.shape
        try:
            out = await self.thread.run_step(
                rows * tokens,
                self.compute.step,
                view,
                due.session.cache,
                due.tensors,
                alone=self._nobody_else(due.session),
            )
        except Exception as exc:  # noqa: BLE001 - handed to the step's own session
            if not due.future.done():
                due.future.set_exception(exc)
        else:
            if not due.future.done():
                due.future.set_result(out)


def _siblings(a: Session, b: Session) -> bool:
    """Micro-batches of one client's pipeline: batching them would undo the pipeline's overlap."""
    return a.group is not None and a.group == b.group


def _check(session: Session, tensors: Tensors, per_layer_sizes: Mapping[str, int]) -> None:
    """What a batched forward needs of the step, checked before it joins a group (on the CPU tensors)."""
    view = session.span
    n = view.end - view.start
    try:
        check_span_inputs(
            view,
            tensors["hidden"],
            tensors["position_ids"],
            tensors.get("attention_mask"),
            session.cache,
            session.cache.length,
        )
        checked_per_layer_inputs(view, tensors["hidden"], {k: tensors[k][:, :, :n] for k in per_layer_sizes})
    except ValueError as exc:
        raise RequestError(str(exc)) from exc
