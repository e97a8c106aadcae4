"""Client-owned LoRA adapters a server holds for the length of a client's training or inference session.

An ``adapter`` request uploads one (``action = "put"``: its LoRA matrices for modules of this server's
span, a ``version`` and a ``scale``) or drops it (``action = "drop"``); ``forward``, ``backward`` and
``open`` requests then name it (``"adapter": {"id": ..., "version": ...}``). Adapters are keyed by the
uploading peer and its id, so no client can reach another's; a server keeps no optimizer state, drops an
adapter when its client says so or after ``idle_seconds`` unused, and holds at most ``max_adapters``
(least recently used go first) of at most ``max_bytes`` each. Every name, shape, rank and dtype is
checked before a payload is read.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from bloombee_core.model.lora import LoraWeights, lora_targets
from bloombee_core.server.checks import RequestError
from bloombee_core.swarm import wire
from bloombee_core.swarm.wire import TensorMeta

if TYPE_CHECKING:
    from bloombee_core.model import BlockSpan
    from bloombee_core.server.lifecycle import Server
    from bloombee_core.transport import FrameStream

MISSING = "adapter_missing"  # the error code that tells a client to upload the adapter again


@dataclass
class AdapterLimits:
    max_adapters: int = 32
    max_bytes: int = 64 << 20  # one adapter's tensors
    max_rank: int = 256
    idle_seconds: float = 900.0


@dataclass
class StoredAdapter:
    version: int
    weights: LoraWeights  # on the server's device and dtype
    names: list[str]  # in upload order: gradients come back named by index into it
    nbytes: int
    last_used: float = field(default_factory=time.monotonic)


class AdapterStore:
    def __init__(self, limits: AdapterLimits | None = None) -> None:
        self.limits = limits or AdapterLimits()
        self.adapters: dict[tuple[str, str], StoredAdapter] = {}

    def put(self, key: tuple[str, str], adapter: StoredAdapter) -> None:
        self.expire()
        self.adapters.pop(key, None)
        while len(self.adapters) >= self.limits.max_adapters:
            oldest = min(self.adapters, key=lambda k: self.adapters[k].last_used)
            del self.adapters[oldest]
        self.adapters[key] = adapter

    def get(self, peer: str, ref: Any) -> StoredAdapter | None:
        """The adapter a request's ``adapter`` field names (None: no field), at the version it names."""
        if ref is None:
            return None
        if not isinstance(ref, dict) or not isinstance(ref.get("id"), str) or not _is_int(ref.get("version")):
            raise RequestError('\'adapter\' must be {"id": str, "version": int}')
        stored = self.adapters.get((peer, ref["id"]))
        if stored is None or stored.version != ref["version"]:
            raise RequestError(
                f"adapter {ref['id']!r} version {ref['version']} is not held here (upload it first)", MISSING
            )
        stored.last_used = time.monotonic()
        return stored

    def drop(self, peer: str, adapter_id: str) -> bool:
        return self.adapters.pop((peer, adapter_id), None) is not None

    def expire(self) -> None:
        cutoff = time.monotonic() - self.limits.idle_seconds
        for key in [k for k, a in self.adapters.items() if a.last_used < cutoff]:
            del self.adapters[key]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.adapters.values())


def check_upload(
    header: dict[str, Any], metas: list[TensorMeta], span: BlockSpan, limits: AdapterLimits
) -> list[tuple[str, int, int, int]]:
    """An ``adapter`` put's modules as ``(name, rank, in_features, out_features)``, checked with its one
    tensor's description (``lora``: every module's A then B, flattened, in ``names`` order) against the
    span — before any payload is read."""
    names, ranks, scale = header.get("names"), header.get("ranks"), header.get("scale")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise RequestError("'names' must be a non-empty list of module names like '3.self_attn.q_proj'")
    if len(set(names)) != len(names):
        raise RequestError("'names' lists a module twice")
    if not isinstance(ranks, list) or len(ranks) != len(names) or not all(_is_int(r) for r in ranks):
        raise RequestError("'ranks' must be a list of integers, one per name")
    if not isinstance(scale, int | float) or isinstance(scale, bool) or not math.isfinite(scale):
        raise RequestError(f"'scale' must be a finite number, got {scale!r}")
    if not _is_int(header.get("version")):
        raise RequestError("'version' must be an integer")
    targets = lora_targets(span)
    modules = []
    for name, rank in zip(names, ranks, strict=True):
        module = targets.get(name)
        if module is None:
            raise RequestError(
                f"module {name!r} is not a linear layer of blocks {span.start}:{span.end} here"
            )
        if not 1 <= rank <= limits.max_rank:
            raise RequestError(f"rank of {name} must be 1..{limits.max_rank}, got {rank}")
        modules.append((name, rank, module.in_features, module.out_features))
    numel = sum(r * (i + o) for _, r, i, o in modules)
    if len(metas) != 1 or metas[0].name != "lora":
        raise RequestError(
            "an adapter carries one tensor, 'lora': every A then B, flattened, in 'names' order"
        )
    meta = metas[0]
    if not meta.dtype.is_floating_point or meta.shape != (numel,):
        raise RequestError(
            f"'lora' must be floating point [{numel}] for these modules, got {meta.dtype} {list(meta.shape)}"
        )
    if meta.raw_nbytes > limits.max_bytes:
        raise RequestError(
            f"the adapter is {meta.raw_nbytes} bytes; this server takes at most {limits.max_bytes}"
        )
    return modules


async def serve_adapter(
    server: Server, stream: FrameStream, header: dict[str, Any], metas: list[TensorMeta]
) -> None:
    """An ``adapter`` request: put (checked, then read) or drop one of this peer's adapters."""
    adapter_id, action = header.get("id"), header.get("action", "put")
    if not isinstance(adapter_id, str) or not 1 <= len(adapter_id) <= 64:
        raise RequestError("'id' must be a string of 1 to 64 characters")
    link = server.links.get(stream.peer)
    if action == "drop":
        dropped = server.adapters.drop(stream.peer, adapter_id)
        await wire.send(stream, {"ok": True, "dropped": dropped}, link=link)
        return
    if action != "put":
        raise RequestError(f"'action' must be 'put' or 'drop', got {action!r}")
    modules = check_upload(header, metas, server.span, server.adapters.limits)
    tensors = await wire.read_tensors(stream, metas, server.decoders, server.adapters.limits.max_bytes, link)
    flat = tensors["lora"]
    if not bool(torch.isfinite(flat).all()):
        raise RequestError("'lora' holds NaN or infinite values")
    pairs, offset = {}, 0
    for name, rank, fan_in, fan_out in modules:
        a = flat[offset : offset + rank * fan_in].view(rank, fan_in)
        offset += rank * fan_in
        b = flat[offset : offset + fan_out * rank].view(fan_out, rank)
        offset += fan_out * rank
        pairs[name] = (a, b)
    weights = LoraWeights(pairs, float(header["scale"])).to(server.device, server.dtype)
    nbytes = sum(t.numel() * t.element_size() for t in weights.tensors())
    names = [name for name, *_ in modules]
    server.adapters.put(
        (stream.peer, adapter_id), StoredAdapter(int(header["version"]), weights, names, nbytes)
    )
    await wire.send(stream, {"ok": True, "held": len(server.adapters.adapters)}, link=link)


def lora_gradients(
    stored: StoredAdapter, weights: LoraWeights, grads: list[torch.Tensor | None]
) -> dict[str, torch.Tensor]:
    """A backward's LoRA gradients as one tensor ``grad.lora``: every module's A then B, flattened, in the
    upload's name order (zeros for modules outside the request's blocks)."""
    by_name = dict(zip(sorted(weights.pairs), _pairs(grads), strict=True))
    parts = []
    for name in stored.names:
        for tensor, grad in zip(weights.pairs[name], by_name[name], strict=True):
            parts.append(
                (grad if grad is not None else torch.zeros_like(tensor, dtype=torch.float32)).flatten()
            )
    return {"grad.lora": torch.cat(parts)}


def _pairs(items: list[Any]) -> list[tuple[Any, Any]]:
    return list(zip(items[0::2], items[1::2], strict=True))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
