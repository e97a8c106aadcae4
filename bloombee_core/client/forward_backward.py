"""Stateless calls through the swarm: a forward over every block and the backward of that forward.

A forward runs in *pieces*, one per server of its chain; it remembers each piece's input so the
backward can send it with the gradient. Each piece re-routes around failing servers under the client's
retry policy (:mod:`bloombee_core.client.retry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from bloombee_core.client.remote_tuning import MISSING, RemoteTuning
from bloombee_core.client.rpc import RemoteError, Tensors, for_blocks, step_inputs

if TYPE_CHECKING:
    from bloombee_core.client.swarm_client import SwarmClient
    from bloombee_core.swarm.routing import Hop

Piece = tuple[int, int, torch.Tensor]  # blocks start:end and the hidden states that went in


async def forward(
    swarm: SwarmClient,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    mask: torch.Tensor | None,
    per_layer: Tensors | None = None,
    tuning: RemoteTuning | None = None,
) -> tuple[torch.Tensor, list[Piece]]:
    """Hidden states through every block; also returns the pieces they ran in (for :func:`backward`)."""
    base = step_inputs(position_ids, mask, per_layer)
    return await _forward_pieces(swarm, 0, swarm.num_blocks, base, hidden, tuning)


@dataclass
class Gradients:
    """What a :func:`backward` returns besides the input gradient."""

    per_layer: Tensors
    prompts: torch.Tensor | None = None
    adapter: dict[str, torch.Tensor] = field(default_factory=dict)  # "<module>.A" / ".B" -> gradient


async def backward(
    swarm: SwarmClient,
    pieces: list[Piece],
    grad: torch.Tensor,
    position_ids: torch.Tensor,
    mask: torch.Tensor | None,
    per_layer: Tensors | None = None,
    tuning: RemoteTuning | None = None,
) -> tuple[torch.Tensor, Gradients]:
    """Gradients w.r.t. the input hidden states, the per-layer inputs and what ``tuning`` sent (deep
    prompts, the adapter's matrices) of a :func:`forward`."""
    base = step_inputs(position_ids, mask, per_layer)
    grads = Gradients({name: torch.zeros_like(t) for name, t in (per_layer or {}).items()})
    if tuning is not None and tuning.prompts is not None:
        grads.prompts = torch.zeros_like(tuning.prompts, dtype=torch.float32)
    for piece in reversed(pieces):
        grad = await _backward_piece(swarm, piece, base, grad, grads, tuning)
    return grad, grads


async def _call(
    swarm: SwarmClient, hop: Hop, kind: str, tensors: Tensors, tuning: RemoteTuning | None
) -> Tensors:
    """One forward / backward with what ``tuning`` adds (a server that lost the adapter gets it again)."""
    for _ in range(3):
        header, extra = await tuning.prepare(swarm, hop) if tuning is not None else ({}, {})
        try:
            return await swarm.call(hop, kind, {**tensors, **extra}, header)
        except RemoteError as exc:
            if exc.code != MISSING or tuning is None or tuning.adapter is None:
                raise
            tuning.adapter.forget(hop.peer)  # restarted, or dropped it when idle: upload again
    raise RemoteError(hop.peer, "keeps losing the adapter", "internal")


async def _forward_pieces(
    swarm: SwarmClient, start: int, end: int, base: Tensors, hidden: torch.Tensor, tuning: RemoteTuning | None
) -> tuple[torch.Tensor, list[Piece]]:
    """Blocks ``start:end`` statelessly, re-routing around failing servers. Also returns the pieces
    the blocks were run in, with each piece's input (what backward needs)."""
    position, pieces, retries = start, [], swarm.retries()
    while position < end:
        hop = (await swarm.route(position, end))[0]
        try:
            out = await _call(swarm, hop, "forward", for_blocks(base, hidden, hop.start, hop.end), tuning)
        except Exception as exc:
            await retries.failed(exc, hop.peer)
            continue
        pieces.append((hop.start, hop.end, hidden))
        hidden, position = out["hidden"], hop.end
    return hidden, pieces


async def _backward_piece(
    swarm: SwarmClient,
    piece: Piece,
    base: Tensors,
    grad: torch.Tensor,
    grads: Gradients,
    tuning: RemoteTuning | None,
) -> torch.Tensor:
    """The gradient w.r.t. a piece's input hidden states (the others are added to ``grads``). If no
    server hosts the whole piece any more, the piece is re-split: its sub-pieces' inputs are recomputed
    by a forward pass, then the backward runs through them in reverse."""
    start, end, hidden = piece
    retries = swarm.retries()
    while True:
        hops = await swarm.route(start, end)
        if len(hops) > 1:
            _, pieces = await _forward_pieces(swarm, start, end, base, hidden, tuning)
            for sub in reversed(pieces):
                grad = await _backward_piece(swarm, sub, base, grad, grads, tuning)
            return grad
        tensors = {**for_blocks(base, hidden, start, end), "grad": grad}
        try:
            out = await _call(swarm, hops[0], "backward", tensors, tuning)
        except Exception as exc:
            await retries.failed(exc, hops[0].peer)
            continue
        for name, total in grads.per_layer.items():
            total[:, :, start:end] += out[f"grad.{name}"].to(total.dtype)
        if grads.prompts is not None:
            grads.prompts[:, start:end] += out["grad.prompts"].to(grads.prompts.dtype)
        if tuning is not None and tuning.adapter is not None:
            tuning.adapter.add_gradients(swarm, hops[0], out, grads.adapter)
        return out["grad"]
