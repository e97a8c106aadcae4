"""Client-owned LoRA on a server's span: low-rank updates applied to the span's linear layers for one
request at a time, leaving the span itself untouched.

A LoRA update of linear layer ``W`` (``[out, in]``) is ``y = W x + scale · B (A x)`` with ``A``
``[rank, in]`` and ``B`` ``[out, rank]`` — peft's ``lora_B(lora_A(x)) * scaling`` with no dropout. The
span gets one forward hook per linear layer, installed once (:func:`lora_targets`); a hook adds the
update only for the weights made active *in its thread* by :func:`applied`, so requests of other
sessions computing at the same time on other threads, or with other adapters, never see them.

Module names are ``"<global block index>.<path in the block>"``, e.g. ``"3.self_attn.q_proj"``, so
one adapter can cover the blocks of several servers and each server takes its own.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from bloombee_core.model.span import BlockSpan

__all__ = ["LoraWeights", "applied", "lora_targets", "module_name"]

_active = threading.local()
HOOKED = "bloombee_lora_hooked"


class LoraWeights:
    """One adapter's tensors for the modules of a span: ``name -> (A, B)`` and the common ``scale``."""

    def __init__(self, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> None:
        self.pairs = dict(pairs)
        self.scale = float(scale)

    def tensors(self) -> list[torch.Tensor]:
        """Every A and B, in a fixed order (names sorted; A before B): the order gradients come back in."""
        return [t for name in sorted(self.pairs) for t in self.pairs[name]]

    def trainable(self) -> LoraWeights:
        """A copy whose tensors are fresh leaves requiring grad: one request's gradients, its own."""
        return LoraWeights(
            {
                n: (a.detach().requires_grad_(True), b.detach().requires_grad_(True))
                for n, (a, b) in self.pairs.items()
            },
            self.scale,
        )

    def to(self, device: torch.device, dtype: torch.dtype) -> LoraWeights:
        return LoraWeights(
            {n: (a.to(device, dtype), b.to(device, dtype)) for n, (a, b) in self.pairs.items()}, self.scale
        )


def module_name(index: int, path: str) -> str:
    return f"{index}.{path}"


def lora_targets(span: BlockSpan) -> dict[str, nn.Linear]:
    """The span's linear layers by :func:`module_name`, hooked (once) so that :func:`applied` reaches them."""
    targets = {}
    for index, layer in zip(range(span.start, span.end), span.layers, strict=True):
        for path, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                targets[module_name(index, path)] = module
                if not getattr(module, HOOKED, False):
                    module.register_forward_hook(_add_update)
                    setattr(module, HOOKED, True)
    return targets


@contextlib.contextmanager
def applied(span: BlockSpan, weights: LoraWeights | None) -> Iterator[None]:
    """Within this block, on this thread, the span's linear layers add ``weights``' updates."""
    if weights is None:
        yield
        return
    targets = lora_targets(span)
    by_module = {id(targets[name]): pair for name, pair in weights.pairs.items() if name in targets}
    previous = getattr(_active, "state", None)
    _active.state = (by_module, weights.scale)
    try:
        yield
    finally:
        _active.state = previous


def _add_update(
    module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
) -> torch.Tensor | None:
    state = getattr(_active, "state", None)
    if state is None:
        return None
    pair = state[0].get(id(module))
    if pair is None:
        return None
    a, b = pair
    x = args[0]
    return output + (x.to(a.dtype) @ a.t() @ b.t() * state[1]).to(output.dtype)
