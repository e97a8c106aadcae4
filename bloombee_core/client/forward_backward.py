"""Stateless calls through the swarm: a forward over every block and the backward of that forward.

A forward runs in *pieces*, one per server of its chain; it remembers each piece's input so the
backward can send it with the gradient. Each piece re-routes around failing servers under the client's
retry policy (:mod:`bloombee_core.client.retry`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bloombee_core.client.rpc import Tensors, for_blocks, step_inputs

if TYPE_CHECKING:
    from bloombee_core.client.swarm_client import SwarmClient

Piece = tuple[int, int, torch.Tensor]  # blocks start:end and the hidden states that went in


async def forward(
    swarm: SwarmClient,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    mask: torch.Tensor | None,
    per_layer: Tensors | None = None,
) -> tuple[torch.Tensor, list[Piece]]:
    """Hidden states through every block; also returns the pieces they ran in (for :func:`backward`)."""
    base = step_inputs(position_ids, mask, per_layer)
    return await _forward_pieces(swarm, 0, swarm.num_blocks, base, hidden)


async def backward(
    swarm: SwarmClient,
    pieces: list[Piece],
    grad: torch.Tensor,
    position_ids: torch.Tensor,
    mask: torch.Tensor | None,
    per_layer: Tensors | None = None,
) -> tuple[torch.Tensor, Tensors]:
    """Gradients w.r.t. the input hidden states and the per-layer inputs of a :func:`forward`."""
    base = step_inputs(position_ids, mask, per_layer)
    per_layer_grads = {name: torch.zeros_like(t) for name, t in (per_layer or {}).items()}
    for piece in reversed(pieces):
        grad = await _backward_piece(swarm, piece, base, grad, per_layer_grads)
    return grad, per_layer_grads


async def _forward_pieces(
    swarm: SwarmClient, start: int, end: int, base: Tensors, hidden: torch.Tensor
) -> tuple[torch.Tensor, list[Piece]]:
    """Blocks ``start:end`` statelessly, re-routing around failing servers. Also returns the pieces
    the blocks were run in, with each piece's input (what backward needs)."""
    position, pieces, retries = start, [], swarm.retries()
    while position < end:
        hop = (await swarm.route(position, end))[0]
        try:
            out = await swarm.call(hop, "forward", for_blocks(base, hidden, hop.start, hop.end))
        except Exception as exc:
            await retries.failed(exc, hop.peer)
            continue
        pieces.append((hop.start, hop.end, hidden))
        hidden, position = out["hidden"], hop.end
    return hidden, pieces


async def _backward_piece(
    swarm: SwarmClient, piece: Piece, base: Tensors, grad: torch.Tensor, per_layer_grads: Tensors
) -> torch.Tensor:
    """The gradient w.r.t. a piece's input hidden states (per-layer-input gradients are added to
    ``per_layer_grads``). If no server hosts the whole piece any more, the piece is re-split: its
    sub-pieces' inputs are recomputed by a forward pass, then the backward runs through them in reverse."""
    start, end, hidden = piece
    retries = swarm.retries()
    while True:
        hops = await swarm.route(start, end)
        if len(hops) > 1:
            _, pieces = await _forward_pieces(swarm, start, end, base, hidden)
            for sub in reversed(pieces):
                grad = await _backward_piece(swarm, sub, base, grad, per_layer_grads)
            return grad
        try:
            out = await swarm.call(
                hops[0], "backward", {**for_blocks(base, hidden, start, end), "grad": grad}
            )
        except Exception as exc:
            await retries.failed(exc, hops[0].peer)
            continue
        for name, total in per_layer_grads.items():
            total[:, :, start:end] += out[f"grad.{name}"].to(total.dtype)
        return out["grad"]
