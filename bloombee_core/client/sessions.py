"""Inference sessions: server-side KV caches kept across steps, surviving server failures.

:class:`InferenceSession` keeps one server-side session (:class:`HopSession`) per hop of a chain. It
records every input it sent to each hop; when a hop fails it bans the server, routes a replacement chain
for exactly those blocks, replays the recorded inputs step by step (same shapes, so the rebuilt KV cache
is the same), and carries on: the output does not change. A server may push its output straight to the
next server's session; the client then sends that server nothing unless the push is late.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from bloombee_core.client.hop_session import HopSession
from bloombee_core.client.pipeline import Size, prefill_chunks
from bloombee_core.client.retry import retryable
from bloombee_core.client.rpc import Tensors, for_blocks, step_inputs
from bloombee_core.swarm.routing import Hop

if TYPE_CHECKING:
    from bloombee_core.client.remote_tuning import ClientAdapter
    from bloombee_core.client.swarm_client import SwarmClient

logger = logging.getLogger(__name__)


class InferenceSession:
    """A chain of server sessions that keep KV caches across steps (see the module docstring)."""

    def __init__(
        self,
        client: SwarmClient,
        max_length: int,
        trees: bool = False,
        prefill_chunk: Size = 0,
        group: str | None = None,
    ) -> None:
        self.client = client
        self.group = group  # the micro-batch pipeline this session is one stage-sharing part of
        self.prefill_chunk = prefill_chunk  # tokens per chunk of a long step ("auto", 0: never cut)
        self.on_chunks: Callable[[int], None] | None = None  # told how many chunks each cut step had
        self.max_length = max_length
        self.trees = trees  # steps may be token trees (speculative decoding), the servers keep all rows
        self.batch: int | None = None
        self.hops: list[HopSession] = []
        self.position = 0  # tokens the servers' caches hold
        self.last_tokens = 0  # tokens of the last step (what a keep picks from)
        self.closed = False
        self.adapter: ClientAdapter | None = None  # a client-owned LoRA every server applies

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self.hops]

    async def _open_chain(
        self, start: int, end: int, after: HopSession | None, before: str | None
    ) -> list[HopSession]:
        hops = [HopSession(h) for h in await self.client.route(start, end)]
        pushes = [h.push_ref() for h in hops[1:]] + [after.push_ref() if after else None]
        ups = [before] + [h.hop.peer for h in hops[:-1]]
        opened = await asyncio.gather(
            *(
                h.open(self.client, self.batch, self.max_length, p, self.trees, self.group, self.adapter, u)
                for h, p, u in zip(hops, pushes, ups, strict=True)
            ),
            return_exceptions=True,
        )
        failures = [(h, r) for h, r in zip(hops, opened, strict=True) if isinstance(r, BaseException)]
        if failures:
            for h in hops:
                h.close()
            for h, exc in failures:
                if retryable(exc):
                    self.client.fail(h.hop.peer, exc)
            raise failures[0][1]
        return hops

    async def step(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None,
        per_layer: Tensors | None = None,
        tree: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One step through every hop. In a session opened with ``trees``, ``tree`` [batch, tokens] gives
        each new token's parent (-1: the cached prefix) and ``keep`` [batch, kept] the rows of the
        previous step each sequence keeps (its accepted path); the rest of that step is dropped first."""
        if self.closed:
            raise RuntimeError("this inference session is closed")
        if not self.trees and (tree is not None or keep is not None):
            raise ValueError("token trees need a session opened for them: inference_session(..., trees=True)")
        batch, length = hidden.shape[:2]
        position = self.position
        if keep is not None:
            if keep.shape[1] > self.last_tokens:
                raise ValueError(f"keep picks {keep.shape[1]} rows of a step of {self.last_tokens} tokens")
            position += keep.shape[1] - self.last_tokens
        if self.batch is None:
            self.batch = batch
        elif batch != self.batch:
            raise ValueError(f"this inference session runs batch size {self.batch}, got {batch}")
        if position + length > self.max_length:
            raise ValueError(
                f"the session was opened for max_length={self.max_length} tokens; {position} are used and "
                f"{length} more were given. Open inference_session(max_length=...) with a larger limit"
            )
        if not self.hops:
            self.hops = await self._opened(0, self.client.num_blocks, None, None)
        base = step_inputs(position_ids, mask, per_layer, tree, keep)
        cuts = [(0, length)] if self.trees else prefill_chunks(length, len(self.hops), self.prefill_chunk)
        if len(cuts) > 1:
            hidden = await self._chunked(base, hidden, position, cuts)
        else:
            hidden = await self._through(0, base, hidden)
        self.position, self.last_tokens = position + length, length
        return hidden

    async def _through(self, index: int, base: Tensors, hidden: torch.Tensor) -> torch.Tensor:
        """One step's ``hidden`` (the output of the hops before ``index``) through hops ``index:``."""
        retries, pushed = self.client.retries(), False
        while index < len(self.hops):
            hop = self.hops[index]
            tensors = for_blocks(base, hidden, hop.hop.start)
            try:
                if not pushed:
                    await hop.send(self.client, tensors)
                out, head = await hop.receive(self.client, tensors, pushed)
            except Exception as exc:
                await retries.failed(exc, hop.hop.peer)
                await self._replace(index)
                pushed = False  # the new server has not seen this step: the client delivers it
                continue
            # the server wrote its output to the next server's session: the client sends nothing there
            pushed = bool(head.get("pushed")) and index + 1 < len(self.hops)
            hidden = out
            index += 1
        return hidden

    async def _chunked(
        self, base: Tensors, hidden: torch.Tensor, past: int, cuts: list[tuple[int, int]]
    ) -> torch.Tensor:
        """One long step as consecutive steps of ``cuts`` tokens, all in flight at once: the first server
        gets every chunk at once and each server pushes each chunk on as soon as it is computed. A hop
        that fails is re-routed and the chunks it did not answer go on one at a time (:meth:`_through`)."""
        chunks = [(chunk_inputs(base, past, a, b), hidden[:, a:b].contiguous()) for a, b in cuts]
        if self.on_chunks is not None:
            self.on_chunks(len(chunks))
        loop = asyncio.get_running_loop()
        done = {id(h): [loop.create_future() for _ in chunks] for h in self.hops}
        hops = list(self.hops)
        results = await asyncio.gather(
            *(self._drive(i, hops, chunks, done) for i in range(len(hops))), return_exceptions=True
        )
        failed = {id(h): r for h, r in zip(hops, results, strict=True) if isinstance(r, BaseException)}
        outs = []
        for j, (chunk_base, chunk_hidden) in enumerate(chunks):  # what a failure left undone, in order
            index, current = 0, chunk_hidden
            while index < len(self.hops) and _answered(done.get(id(self.hops[index])), j):
                current = done[id(self.hops[index])][j].result()[0]
                index += 1
            if index < len(self.hops) and id(self.hops[index]) in failed:
                exc = failed.pop(id(self.hops[index]))
                await self.client.retries().failed(exc, self.hops[index].hop.peer)
                await self._replace(index)
            outs.append(
                await self._through(index, chunk_base, current) if index < len(self.hops) else current
            )
        return torch.cat(outs, dim=1)

    async def _drive(
        self, index: int, hops: list[HopSession], chunks: list[tuple[Tensors, torch.Tensor]], done: dict
    ) -> None:
        """Hop ``index``'s part of a chunked step: each chunk's input, its reply, handed to the next hop."""
        hop, mine = hops[index], done[id(hops[index])]
        try:
            if index == 0:
                inputs = [for_blocks(b, h, hop.hop.start) for b, h in chunks]
                for ahead, tensors in enumerate(inputs):
                    await hop.send(self.client, tensors, ahead)
            for j, (chunk_base, _) in enumerate(chunks):
                if index == 0:
                    tensors, pushed = inputs[j], False  # sent above: wait for the reply only
                else:
                    previous, pushed = await done[id(hops[index - 1])][j]
                    tensors = for_blocks(chunk_base, previous, hop.hop.start)
                    if not pushed:
                        await hop.send(self.client, tensors)
                out, head = await hop.receive(self.client, tensors, pushed)
                mine[j].set_result((out, bool(head.get("pushed")) and index + 1 < len(hops)))
        except BaseException as exc:
            for future in mine:
                if not future.done():
                    future.set_exception(_Upstream())
                    future.exception()  # retrieved: nobody needs to hear about it again
            if not isinstance(exc, _Upstream):
                raise

    async def _replace(self, index: int) -> None:
        """Swap hop ``index`` for a fresh chain over its blocks and rebuild its cache by replay."""
        old = self.hops[index]
        old.close()
        after = self.hops[index + 1] if index + 1 < len(self.hops) else None
        start, end = old.hop.start, old.hop.end
        retries = self.client.retries()
        while True:
            new = await self._opened(start, end, after, self.hops[index - 1].hop.peer if index else None)
            try:
                if after is not None:  # its pushes come from the new chain now
                    await after.set_route(upstream=new[-1].hop.peer)
                for inputs in old.history:  # per-layer inputs in it start at the old hop's first block
                    hidden = inputs["hidden"]
                    for hop in new:
                        failing = hop
                        current = for_blocks(inputs, hidden, hop.hop.start - start)
                        hidden = await hop.step(self.client, current)
            except Exception as exc:
                for hop in new:
                    hop.close()
                await retries.failed(exc, failing.hop.peer)
                continue
            self.hops[index : index + 1] = new
            if index > 0:
                try:
                    await self.hops[index - 1].set_route(push=new[0].push_ref())
                except Exception:  # noqa: BLE001 - push is an optimisation; the next step notices failures
                    pass
            logger.info("re-routed blocks %d:%d through %s", start, end, [h.hop for h in new])
            return

    async def _opened(
        self, start: int, end: int, after: HopSession | None, before: str | None
    ) -> list[HopSession]:
        """A chain over blocks ``start:end`` with every session open (its failing servers are banned)."""
        return await self.client.retries().run(
            lambda: self._open_chain(start, end, after, before), "opening a session"
        )

    def stats(self) -> list[dict[str, Any]]:
        """Per hop of the live chain: steps, where the server took their inputs from, what the client sent."""
        return [hop.stats() for hop in self.hops]

    def close(self) -> None:
        for hop in self.hops:
            hop.close()
        self.hops = []
        self.closed = True


class _Upstream(Exception):  # noqa: N818 - not an error: an earlier hop of a chunked step failed
    """The hop before this one did not deliver a chunk."""


def _answered(futures: list[asyncio.Future] | None, chunk: int) -> bool:
    return futures is not None and futures[chunk].done() and futures[chunk].exception() is None


def chunk_inputs(base: Tensors, past: int, start: int, end: int) -> Tensors:
    """The shared step inputs of tokens ``start:end`` of a step after ``past`` cached tokens (the padding
    mask covers everything cached before the chunk)."""
    out = {}
    for name, t in base.items():
        out[name] = (t[:, : past + end] if name == "attention_mask" else t[:, start:end]).contiguous()
    return out
