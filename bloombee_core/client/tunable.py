"""What a client model needs to train a tuning method (see :mod:`bloombee_core.tuning`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from bloombee_core.tuning import TuningMethod


class Tunable:
    """Mixin of ``DistributedModelForCausalLM`` (which sets ``plugins``, ``tuning_method`` and
    ``tuning_module``): attach a tuning method, list what it trains."""

    def tune(
        self, method: TuningMethod | str | dict[str, Any], adapter: str | Path | None = None
    ) -> nn.Module:
        """Attach a tuning method (a plugin name, ``{"name": ..., **options}`` or an instance); with
        ``adapter``, load its trained parameters from that folder. Returns the trainable module."""
        from bloombee_core.tuning import TuningMethod

        if self.tuning_method is not None:
            raise RuntimeError(f"a tuning method ({self.tuning_method.name}) is already attached")
        if not isinstance(method, TuningMethod):
            if self.plugins is None:
                raise ValueError("tune() needs the model's plugins: load it with from_pretrained")
            method = self.plugins.create("tuning_methods", method, "tuning")
        self.tuning_module = method.attach(self)
        self.tuning_method = method
        if adapter is not None:
            method.load(Path(adapter))
        return self.tuning_module

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The attached tuning method's parameters (what an optimizer trains)."""
        return list(self.tuning_module.parameters()) if self.tuning_module is not None else []
