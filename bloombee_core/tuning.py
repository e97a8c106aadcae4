"""Tuning methods (plugin kind ``"tuning_methods"``): what a client trains while the servers' blocks stay
frozen, and how it takes part in the distributed forward and backward.

A method is attached to a client model (:meth:`TuningMethod.attach`), which gives it a
``torch.nn.Module`` of trainable parameters (``model.tuning_module``; ``model.trainable_parameters()``).
In each forward it may:

* change the hidden states entering block 0 (prompt tuning prepends trained prompt embeddings) —
  :meth:`TuningMethod.prepare_inputs`, which also extends the attention mask and the labels;
* send something with every remote request (:meth:`TuningMethod.remote`): deep prompts, one per block,
  added to the first positions before each block; and/or a client-owned LoRA adapter the servers apply
  to their linear layers (uploaded once per version, dropped when the client closes) — gradients for
  both come back from the servers' backward;
* compute its own output from the final hidden states (:meth:`TuningMethod.head`: a classifier).

It saves and loads its parameters in its ecosystem's format (:meth:`TuningMethod.save` /
:meth:`TuningMethod.load`; a peft adapter folder for LoRA and prompt tuning).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from bloombee_core.plugin import Plugin

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bloombee_core.client.remote_tuning import RemoteTuning

__all__ = ["TuningMethod", "choice_of_folder", "method_of_folder"]

# peft's adapter types -> the tuning method that reads them; BloomBee's own methods write "bloombee_method"
PEFT_TYPES = {"LORA": "lora", "PROMPT_TUNING": "prompt"}


def method_of_folder(folder: Path) -> str:
    """The tuning method that saved ``folder`` (from its ``adapter_config.json``)."""
    return _method_of(_adapter_config(folder), folder)


def choice_of_folder(plugins: Any, folder: Path) -> dict[str, Any]:
    """``{"name": ..., **options}`` of the method that saved ``folder``, with the options it was saved with."""
    config = _adapter_config(folder)
    name = _method_of(config, folder)
    return {"name": name, **plugins.get("tuning_methods", name).options_of_config(config)}


def _adapter_config(folder: Path) -> dict[str, Any]:
    import json

    config_file = Path(folder) / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no adapter_config.json: not a saved adapter")
    return json.loads(config_file.read_text())


def _method_of(config: dict[str, Any], folder: Path) -> str:
    name = config.get("bloombee_method") or PEFT_TYPES.get(str(config.get("peft_type")))
    if name is None:
        raise ValueError(
            f"{folder}/adapter_config.json: cannot tell which tuning method reads peft_type "
            f"{config.get('peft_type')!r}"
        )
    return str(name)


class TuningMethod(Plugin):
    """Base of every tuning method. Subclasses set ``name`` (and ``Options``) and override what they need."""

    module: nn.Module | None = None

    def attach(self, model: Any) -> nn.Module:
        """Build the trainable parameters for ``model`` (a ``DistributedModelForCausalLM``); returns them."""
        raise NotImplementedError

    def prepare_inputs(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Hidden states entering block 0, and the mask, labels and positions that go with them."""
        return hidden, attention_mask, labels, position_ids

    def extra_tokens(self) -> int:
        """Positions the method adds before the caller's tokens in the servers' caches (prompt tuning)."""
        return 0

    def continue_inputs(
        self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The mask and positions of a later step of an inference session, as the caller counts them,
        turned into the servers' count (prompt tuning adds its prompt tokens)."""
        return attention_mask, position_ids

    def remote(self, batch: int) -> RemoteTuning | None:
        """What travels with every remote forward / backward of a batch of ``batch`` rows (None: nothing)."""
        return None

    def head(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The method's own output from the final hidden states (None: the language-model head's logits)."""
        return None

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of :meth:`head`'s output (only called when :meth:`head` returns something)."""
        raise NotImplementedError

    def strip_outputs(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final hidden states of the caller's own tokens (prompt tuning drops its prefix)."""
        return hidden

    def save(self, folder: Path) -> Path:
        """Write the trained parameters to ``folder`` in the ecosystem's format; returns the folder."""
        raise NotImplementedError

    def load(self, folder: Path) -> None:
        """Read parameters :meth:`save` wrote (after :meth:`attach`)."""
        raise NotImplementedError

    @classmethod
    def options_of_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The options a saved ``adapter_config.json`` was written with (to attach before loading)."""
        return {}

    def close(self, model: Any) -> None:
        """The client is closing: release what servers hold for this method (e.g. adapters)."""
