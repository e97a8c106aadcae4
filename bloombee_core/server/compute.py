"""Compute on a span, no I/O: a stateless forward, a backward (autograd), one inference step against a
session's KV cache; and where each runs (one compute thread, small steps inline on the event loop)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from bloombee_core.model import BlockSpan, SpanCache

T = TypeVar("T")
Tensors = dict[str, torch.Tensor]

INLINE_TOKENS = 16  # batch * tokens of a step small enough to compute on the event loop


class SpanCompute:
    """Runs requests' tensors through views of one span on ``device`` in ``dtype``; outputs come back to
    the CPU in the dtype the request was sent in."""

    def __init__(self, device: torch.device, dtype: torch.dtype, per_layer_sizes: dict[str, int]) -> None:
        self.device, self.dtype, self.per_layer_sizes = device, dtype, per_layer_sizes

    def forward(self, view: BlockSpan, t: Tensors) -> Tensors:
        return {"hidden": self._infer(view, None, t)}

    def backward(self, view: BlockSpan, t: Tensors) -> Tensors:
        with torch.enable_grad():
            hidden = t["hidden"].to(self.device, self.dtype).requires_grad_(True)
            per_layer = {k: v.requires_grad_(True) for k, v in self._per_layer(view, t).items()}
            pos, mask = t["position_ids"].to(self.device), _on(t.get("attention_mask"), self.device)
            out = view(hidden, position_ids=pos, attention_mask=mask, per_layer_inputs=per_layer)
            grads = torch.autograd.grad(
                out, [hidden, *per_layer.values()], t["grad"].to(out.device, out.dtype)
            )
        # gradients w.r.t. the per-layer inputs this span used (its own layers), named "grad.<name>"
        names = ["grad", *(f"grad.{k}" for k in per_layer)]
        return {n: g.to("cpu", t["hidden"].dtype) for n, g in zip(names, grads, strict=True)}

    def step(self, view: BlockSpan, cache: SpanCache, t: Tensors) -> torch.Tensor:
        """One inference step: the new tokens' outputs; ``cache`` grows by their keys and values."""
        return self._infer(view, cache, t)

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
            )
        return out.to("cpu", hidden.dtype)

    def _per_layer(self, view: BlockSpan, t: Tensors) -> Tensors:
        """The per-layer inputs of ``view``'s own layers (the first ``end - start`` of what was sent)."""
        n = view.end - view.start
        return {k: t[k][:, :, :n].to(self.device, self.dtype) for k in self.per_layer_sizes}


class ComputeThread:
    """The one thread compute runs on: jobs run one at a time, in the order they were handed over."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="bloombee-compute")
        self._busy = 0  # jobs handed to the thread and not finished

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        self._busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._busy -= 1

    async def run_step(self, tokens: int, fn: Callable[..., T], *args: object) -> T:
        """An inference step of ``tokens`` (batch * tokens). Small ones (decoding) run right here on the
        event loop when the thread is idle: handing them to the thread and back costs two cross-thread
        wake-ups, a noticeable share of a few-millisecond step; nothing else could run meanwhile anyway."""
        if tokens <= INLINE_TOKENS and self._busy == 0:
            return fn(*args)
        return await self.run(fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _on(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return tensor.to(device) if tensor is not None else None
