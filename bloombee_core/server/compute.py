"""Compute on a span, no I/O: a stateless forward, a backward (autograd), one inference step against a
session's KV cache; and where each runs (one compute thread, small steps inline on the event loop)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch

from bloombee_core.model.lora import LoraWeights, applied

if TYPE_CHECKING:
    from bloombee_core.model import BlockSpan, SpanCache
    from bloombee_core.model.batch import BatchItem

T = TypeVar("T")
Tensors = dict[str, torch.Tensor]

INLINE_TOKENS = 16  # batch * tokens of a step small enough to compute on the event loop
# ... and short enough: while a step computes there, the loop cannot take in, push or answer other
# sessions' steps (a micro-batch pipeline's siblings), so a longer step goes to the thread unless its
# session is the only one open
INLINE_MAX_S = 0.002


class SpanCompute:
    """Runs requests' tensors through views of one span on ``device`` in ``dtype``; outputs come back to
    the CPU in the dtype the request was sent in."""

    def __init__(self, device: torch.device, dtype: torch.dtype, per_layer_sizes: dict[str, int]) -> None:
        self.device, self.dtype, self.per_layer_sizes = device, dtype, per_layer_sizes

    def forward(self, view: BlockSpan, t: Tensors, adapter: LoraWeights | None = None) -> Tensors:
        with applied(view, adapter):
            return {"hidden": self._infer(view, None, t)}

    def backward(self, view: BlockSpan, t: Tensors, adapter: LoraWeights | None = None) -> Tensors:
        """Gradients w.r.t. the input hidden states (``grad``), the per-layer inputs (``grad.<name>``),
        deep prompts (``grad.prompts``) and, in the order of ``adapter.tensors()``, the LoRA matrices
        (returned as ``lora``: a list with None where a module took no part)."""
        with torch.enable_grad():
            hidden = t["hidden"].to(self.device, self.dtype).requires_grad_(True)
            per_layer = {k: v.requires_grad_(True) for k, v in self._per_layer(view, t).items()}
            prompts = t.get("prompts")
            prompts = (
                prompts.to(self.device, self.dtype).requires_grad_(True) if prompts is not None else None
            )
            weights = adapter.trainable() if adapter is not None else None
            pos, mask = t["position_ids"].to(self.device), _on(t.get("attention_mask"), self.device)
            with applied(view, weights):
                out = view(
                    hidden, position_ids=pos, attention_mask=mask, per_layer_inputs=per_layer, prompts=prompts
                )
            extra = [prompts] if prompts is not None else []
            lora = weights.tensors() if weights is not None else []
            grads = torch.autograd.grad(
                out,
                [hidden, *per_layer.values(), *extra, *lora],
                t["grad"].to(out.device, out.dtype),
                allow_unused=True,
            )
        # gradients w.r.t. the per-layer inputs this span used (its own layers), named "grad.<name>"
        names = [
            "grad",
            *(f"grad.{k}" for k in per_layer),
            *(["grad.prompts"] if prompts is not None else []),
        ]
        dtype = t["hidden"].dtype
        inputs = [hidden, *per_layer.values(), *extra]
        out_grads = {
            n: (g if g is not None else torch.zeros_like(x)).to("cpu", dtype)
            for n, g, x in zip(names, grads[: len(names)], inputs, strict=True)
        }
        if lora:
            out_grads["lora"] = [
                g.to("cpu", torch.float32) if g is not None else None for g in grads[len(names) :]
            ]
        return out_grads

    def step(
        self, view: BlockSpan, cache: SpanCache, t: Tensors, adapter: LoraWeights | None = None
    ) -> torch.Tensor:
        """One inference step: the new tokens' outputs; ``cache`` grows by their keys and values."""
        with applied(view, adapter):
            return self._infer(view, cache, t)

    def step_batch(self, view: BlockSpan, steps: list[tuple[SpanCache, Tensors]]) -> list[torch.Tensor]:
        """Several sessions' steps in one forward (:mod:`bloombee_core.model.batch`); each one's outputs."""
        from bloombee_core.model.batch import batched_forward

        with torch.inference_mode():
            outs = batched_forward(view, [self.batch_item(view, cache, t) for cache, t in steps])
        return [out.to("cpu", t["hidden"].dtype) for out, (_, t) in zip(outs, steps, strict=True)]

    def batch_item(self, view: BlockSpan, cache: SpanCache, t: Tensors) -> BatchItem:
        """A step's inputs on the device, as a batched forward takes them."""
        from bloombee_core.model.batch import BatchItem

        hidden = t["hidden"].to(self.device, self.dtype)
        pos, mask = t["position_ids"].to(self.device), _on(t.get("attention_mask"), self.device)
        return BatchItem(cache, hidden, pos, mask, self._per_layer(view, t))

    def _infer(self, view: BlockSpan, cache: SpanCache | None, t: Tensors) -> torch.Tensor:
        hidden = t["hidden"]
        with torch.inference_mode():
            out = view(
                hidden.to(self.device, self.dtype),
                position_ids=t["position_ids"].to(self.device),
                attention_mask=_on(t.get("attention_mask"), self.device),
                cache=cache,
                per_layer_inputs=self._per_layer(view, t),
                tree=_on(t.get("tree"), self.device),
                prompts=_on(t.get("prompts"), self.device),
            )
        return out.to("cpu", hidden.dtype)

    def _per_layer(self, view: BlockSpan, t: Tensors) -> Tensors:
        """The per-layer inputs of ``view``'s own layers (the first ``end - start`` of what was sent)."""
        n = view.end - view.start
        return {k: t[k][:, :, :n].to(self.device, self.dtype) for k in self.per_layer_sizes}


INTERACTIVE, BULK = 0, 1  # compute-thread priorities: inference steps first, then forward/backward


class ComputeThread:
    """The one thread compute runs on: jobs run one at a time, interactive ones (inference steps) before
    bulk ones (stateless forward / backward: fine-tuning), each kind in the order it was handed over. A
    running job is never interrupted: a bulk job delays steps by at most its own length."""

    def __init__(self) -> None:
        self._jobs: list[tuple[int, int, Callable[[], None]]] = []  # (priority, order, job): a heap
        self._order = itertools.count()
        self._ready = threading.Condition()
        self._stopped = False
        self._busy = 0  # jobs handed to the thread and not finished
        self.step_s = 0.0  # how long the last inference step took (on the loop or the thread)
        self._thread = threading.Thread(target=self._work, name="bloombee-compute", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._busy > 0

    async def run(self, fn: Callable[..., T], *args: object, priority: int = BULK) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def job() -> None:
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed back to the awaiting request
                loop.call_soon_threadsafe(self._settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(self._settle, future, result, None)

        with self._ready:
            if self._stopped:
                raise RuntimeError("the compute thread has stopped")
            heapq.heappush(self._jobs, (priority, next(self._order), job))
            self._ready.notify()
        self._busy += 1  # until the job has finished, even if its caller stops waiting
        return await future

    async def run_step(self, tokens: int, fn: Callable[..., T], *args: object, alone: bool = True) -> T:
        """An inference step of ``tokens`` (batch * tokens). Small ones (decoding) run right here on the
        event loop when the thread is idle: handing them to the thread and back costs two cross-thread
        wake-ups, a noticeable share of a few-millisecond step. Only while the step is the server's
        only session (``alone``) or steps are short (:data:`INLINE_MAX_S`): otherwise the loop must stay
        free for the other sessions' traffic."""
        begin = time.perf_counter()
        if tokens <= INLINE_TOKENS and self._busy == 0 and (alone or self.step_s <= INLINE_MAX_S):
            out = fn(*args)
        else:
            out = await self.run(fn, *args, priority=INTERACTIVE)
        self.step_s = time.perf_counter() - begin
        return out

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._jobs and not self._stopped:
                    self._ready.wait()
                if self._stopped:
                    return
                _, _, job = heapq.heappop(self._jobs)
            job()

    def _settle(self, future: asyncio.Future, result: object, error: BaseException | None) -> None:
        self._busy -= 1
        if future.done():
            return  # the request was cancelled meanwhile
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def shutdown(self) -> None:
        with self._ready:
            self._stopped = True
            self._jobs.clear()
            self._ready.notify()


def _on(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return tensor.to(device) if tensor is not None else None
