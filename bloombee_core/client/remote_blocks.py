"""The remote blocks as one autograd function: a stateless forward through the swarm, whose backward the
servers compute — for the hidden states, the family's per-layer inputs and whatever a tuning method sent
(deep prompts, a client-owned LoRA adapter's matrices)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.autograd.function import FunctionCtx

from bloombee_core.client import forward_backward

if TYPE_CHECKING:
    from bloombee_core.client.remote_tuning import RemoteTuning


def remote_blocks(
    model: Any,
    position_ids: torch.Tensor,
    mask: torch.Tensor | None,
    hidden: torch.Tensor,
    per_layer: dict[str, torch.Tensor],
    tuning: RemoteTuning | None = None,
) -> torch.Tensor:
    """Every block's output for ``hidden``, differentiable w.r.t. ``hidden``, ``per_layer`` and ``tuning``'s
    deep prompts and adapter parameters."""
    trainable: list[torch.Tensor] = []
    if tuning is not None and tuning.prompts is not None:
        trainable.append(tuning.prompts)
    if tuning is not None and tuning.adapter is not None:
        trainable.extend(tuning.adapter.parameters())
    names = tuple(per_layer)
    return _RemoteBlocks.apply(
        model, position_ids, mask, names, tuning, len(trainable), hidden, *per_layer.values(), *trainable
    )


class _RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        model: Any,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None,
        names: tuple[str, ...],
        tuning: RemoteTuning | None,
        n_trainable: int,
        hidden: torch.Tensor,
        *tensors: torch.Tensor,
    ) -> torch.Tensor:
        per_layer = tensors[: len(names)]
        given = {n: t.detach() for n, t in zip(names, per_layer, strict=True)}
        out, pieces = model.loop.run(
            forward_backward.forward(model.swarm, hidden.detach(), position_ids, mask, given, tuning)
        )
        ctx.model, ctx.pieces, ctx.names, ctx.tuning = model, pieces, names, tuning
        ctx.position_ids, ctx.mask, ctx.per_layer = position_ids, mask, given
        ctx.trainable_dtypes = [t.dtype for t in tensors[len(names) :]]
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        model, tuning = ctx.model, ctx.tuning
        grad_in, grads = model.loop.run(
            forward_backward.backward(
                model.swarm, ctx.pieces, grad.contiguous(), ctx.position_ids, ctx.mask, ctx.per_layer, tuning
            )
        )
        per_layer_out = tuple(grads.per_layer[n].to(ctx.per_layer[n].dtype) for n in ctx.names)
        trained: list[torch.Tensor | None] = []
        if tuning is not None and tuning.prompts is not None:
            trained.append(grads.prompts)
        if tuning is not None and tuning.adapter is not None:
            trained.extend(tuning.adapter.ordered(grads.adapter))
        trained = [
            g.to(d) if g is not None else None for g, d in zip(trained, ctx.trainable_dtypes, strict=True)
        ]
        return (None, None, None, None, None, None, grad_in.to(grad.dtype), *per_layer_out, *trained)
