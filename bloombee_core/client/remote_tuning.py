"""What a tuning method sends through the swarm with each forward and backward, and the gradients it gets
back: a client-owned LoRA adapter (uploaded to each server once per version, named by reference in every
request) and deep prompts (a slice per hop, sent with the hidden states).

The adapter belongs to the client: its matrices are parameters of the client's model, trained by the
client's optimizer. A server holds a copy only while the client's session lasts; when the parameters
change (an optimizer step), the next request to each server uploads the new version first.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from bloombee_core.client.rpc import call

if TYPE_CHECKING:
    from torch import nn

    from bloombee_core.client.swarm_client import SwarmClient
    from bloombee_core.swarm.routing import Hop

logger = logging.getLogger(__name__)

MISSING = "adapter_missing"  # a server's answer when it does not hold the version a request names


def block_of(name: str) -> int:
    """The global block index of a module name ``"<block>.<path>"``."""
    return int(name.split(".", 1)[0])


@dataclass(eq=False)
class ClientAdapter:
    """A LoRA adapter for remote blocks: ``name -> (A, B)`` parameters of the client's model."""

    pairs: dict[str, tuple[nn.Parameter, nn.Parameter]]
    scale: float
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    version: int = 0
    uploaded: dict[str, int] = field(default_factory=dict)  # peer -> version it holds
    _seen: tuple[int, ...] = ()

    def parameters(self) -> list[nn.Parameter]:
        return [p for name in sorted(self.pairs) for p in self.pairs[name]]

    def current_version(self) -> int:
        """Bumped whenever a parameter was changed in place (an optimizer step) since it was last asked."""
        seen = tuple(p._version for p in self.parameters())
        if seen != self._seen:
            self._seen, self.version = seen, self.version + 1
        return self.version

    def reference(self) -> dict[str, Any]:
        return {"id": self.id, "version": self.current_version()}

    def names_for(self, swarm: SwarmClient, hop: Hop) -> list[str]:
        """The adapter's modules in the blocks the hop's server hosts (its whole span, when known)."""
        record = getattr(swarm, "servers", {}).get(hop.peer)
        start, end = (record.start, record.end) if record is not None else (hop.start, hop.end)
        return [name for name in sorted(self.pairs) if start <= block_of(name) < end]

    async def ensure(self, swarm: SwarmClient, hop: Hop) -> None:
        """Upload this version to the hop's server unless it holds it already."""
        version = self.current_version()
        if self.uploaded.get(hop.peer) == version:
            return
        names = self.names_for(swarm, hop)
        flat = torch.cat([t.detach().float().flatten() for name in names for t in self.pairs[name]])
        tensors = {"lora": flat}
        header = {"type": "adapter", "action": "put", "id": self.id, "version": version}
        header.update(names=names, ranks=[int(self.pairs[n][0].shape[0]) for n in names], scale=self.scale)
        await call(
            swarm.transport, hop.peer, header, tensors, swarm.compressor, swarm.decoders, swarm.timeout
        )
        self.uploaded[hop.peer] = version

    def forget(self, peer: str) -> None:
        self.uploaded.pop(peer, None)

    def add_gradients(
        self, swarm: SwarmClient, hop: Hop, out: dict[str, torch.Tensor], into: dict[str, torch.Tensor]
    ) -> None:
        """Accumulate a backward's ``grad.lora`` (every uploaded module's A then B, flattened) into
        ``into`` (``"<name>.A"`` / ``".B"`` -> sum)."""
        names = self.names_for(swarm, hop)
        flat = out.get("grad.lora")
        params = [
            (f"{name}.{part}", p) for name in names for part, p in zip("AB", self.pairs[name], strict=True)
        ]
        numel = sum(p.numel() for _, p in params)
        if flat is None or flat.shape != (numel,):
            shape = None if flat is None else list(flat.shape)
            raise ValueError(f"server {hop.peer} sent grad.lora of shape {shape}, expected [{numel}]")
        offset = 0
        for slot, param in params:
            grad = flat[offset : offset + param.numel()].view(param.shape).to(param.dtype)
            offset += param.numel()
            into[slot] = into[slot] + grad if slot in into else grad

    def ordered(self, grads: dict[str, torch.Tensor]) -> list[torch.Tensor | None]:
        """Gradients in :meth:`parameters` order (None where no server sent one)."""
        return [grads.get(f"{name}.{part}") for name in sorted(self.pairs) for part in ("A", "B")]

    async def close(self, swarm: SwarmClient) -> None:
        """Ask every server holding a copy to drop it (best effort: they also drop it when idle)."""
        for peer in list(self.uploaded):
            header = {"type": "adapter", "action": "drop", "id": self.id}
            try:
                await call(swarm.transport, peer, header, None, swarm.compressor, swarm.decoders, 5.0)
            except Exception:  # noqa: BLE001 - the server may be gone; it drops idle adapters itself
                logger.debug("could not drop adapter %s on %s", self.id, peer, exc_info=True)
        self.uploaded.clear()


@dataclass(eq=False)
class RemoteTuning:
    """What travels with a forward / backward: an adapter and/or deep prompts [batch or 1, blocks, prefix, hidden]."""

    adapter: ClientAdapter | None = None
    prompts: torch.Tensor | None = None  # the trainable tensor itself (gradients come back for it)

    async def prepare(self, swarm: SwarmClient, hop: Hop) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Extra header fields and tensors of one hop's request (uploading the adapter first if needed)."""
        header, tensors = {}, {}
        if self.adapter is not None:
            await self.adapter.ensure(swarm, hop)
            header["adapter"] = self.adapter.reference()
        if self.prompts is not None:
            tensors["prompts"] = self.prompts.detach()[:, hop.start : hop.end].contiguous()
        return header, tensors
