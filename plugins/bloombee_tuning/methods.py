"""Built-in tuning methods: ``lora`` (client-owned LoRA on the remote blocks), ``prompt`` (prompt
tuning), ``deep-prompt`` (a trained prompt per block) and ``classifier`` (a sequence-classification head).

LoRA and prompt tuning save peft adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``
with peft's own tensor names), so ``peft.PeftModel.from_pretrained`` loads them on top of the
transformers model, and ``AutoDistributedModelForCausalLM.from_pretrained(..., adapter=folder)`` through
the swarm. Deep prompts and the classifier have no peft format: they save the same two files with a
``bloombee_method`` key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from bloombee_core.plugin import PluginOptions
from bloombee_core.tuning import TuningMethod

if TYPE_CHECKING:  # torch is imported where a method is attached (listing plugins stays light)
    import torch
    from torch import nn

    from bloombee_core.client.remote_tuning import RemoteTuning

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
# peft's default LoRA targets by model type, where a model has no module of peft's default names
DEFAULT_TARGETS = ("q_proj", "v_proj", "query_key_value")


def _write(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(config, indent=2))
    return folder


def _read(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    return load_file(str(folder / WEIGHTS)), json.loads((folder / CONFIG).read_text())


def linear_layers(model: Any) -> dict[str, nn.Linear]:
    """The remote blocks' linear layers by ``"<block>.<path>"``, from layers built on the meta device."""
    import torch
    from torch import nn

    from bloombee_core.model import load_config
    from bloombee_core.model.checkpoint import meta_skeleton, prepared_config

    family, config = model.client.family, load_config(model.folder)  # as the servers read it
    config = prepared_config(config, meta_skeleton(config))
    layer_cls = family.decoder_layer_class(config)
    found = {}
    with torch.device("meta"):
        for index in range(family.num_blocks(config)):
            layer = family.make_layer(layer_cls, config, index)
            for path, module in layer.named_modules():
                if isinstance(module, nn.Linear):
                    found[f"{index}.{path}"] = module
    return found


class LoraOptions(PluginOptions):
    r: int = Field(8, ge=1, le=256, description="rank of each update")
    alpha: float = Field(16.0, gt=0, description="scale numerator: updates are scaled by alpha / r")
    target_modules: list[str] | None = Field(
        None,
        description="names of the linear layers to adapt (last path part); default: peft's for the model",
    )
    seed: int = Field(0, description="seed of the A matrices' initialisation (B starts at zero, as in peft)")


class Lora(TuningMethod):
    """LoRA matrices for the remote blocks' linear layers, owned and trained by the client."""

    name: ClassVar[str] = "lora"
    description: ClassVar[str] = "client-owned LoRA adapters applied by the servers to their blocks"
    Options: ClassVar[type[PluginOptions]] = LoraOptions

    def targets(self, model: Any) -> list[str]:
        if self.options.target_modules is not None:
            return list(self.options.target_modules)
        try:
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

            found = DEFAULTS.get(model.config.model_type)
            if isinstance(found, list):
                return found
        except ImportError:
            pass
        return list(DEFAULT_TARGETS)

    def attach(self, model: Any) -> nn.Module:
        import torch
        from torch import nn

        from bloombee_core.client.remote_tuning import ClientAdapter

        wanted = set(self.targets(model))
        layers = {n: m for n, m in linear_layers(model).items() if n.rsplit(".", 1)[-1] in wanted}
        if not layers:
            raise ValueError(f"lora: no linear layer of this model is named any of {sorted(wanted)}")
        generator = torch.Generator().manual_seed(self.options.seed)
        r = self.options.r
        self.module = nn.Module()
        self.module.A = nn.ParameterDict()
        self.module.B = nn.ParameterDict()
        for name, layer in layers.items():
            bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt(5)), as nn.Linear and peft
            a = (torch.rand(r, layer.in_features, generator=generator) * 2 - 1) * bound
            self.module.A[_key(name)] = nn.Parameter(a)
            self.module.B[_key(name)] = nn.Parameter(torch.zeros(layer.out_features, r))
        pairs = {name: (self.module.A[_key(name)], self.module.B[_key(name)]) for name in layers}
        self.adapter = ClientAdapter(pairs, self.options.alpha / r)
        self.model, self.targets_used = model, sorted(wanted)
        return self.module

    def remote(self, batch: int) -> RemoteTuning | None:
        from bloombee_core.client.remote_tuning import RemoteTuning

        return RemoteTuning(adapter=self.adapter)

    @classmethod
    def options_of_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        targets = config.get("target_modules")
        return {"r": int(config["r"]), "alpha": float(config["lora_alpha"]), "target_modules": list(targets)}

    def peft_key(self, name: str, part: str) -> str:
        index, path = name.split(".", 1)
        return f"base_model.model.{self.model.client.family.layer_prefix}{index}.{path}.lora_{part}.weight"

    def save(self, folder: Path) -> Path:
        tensors = {}
        for name, (a, b) in self.adapter.pairs.items():
            tensors[self.peft_key(name, "A")], tensors[self.peft_key(name, "B")] = a, b
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.options.r,
            "lora_alpha": self.options.alpha,
            "lora_dropout": 0.0,
            "target_modules": self.targets_used,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "base_model_name_or_path": str(getattr(self.model, "folder", "") or ""),
        }
        return _write(Path(folder), tensors, config)

    def load(self, folder: Path) -> None:
        import torch

        tensors, config = _read(Path(folder))
        if config.get("peft_type") != "LORA":
            raise ValueError(f"{folder} holds a {config.get('peft_type')} adapter, not LoRA")
        with torch.no_grad():
            for name, (a, b) in self.adapter.pairs.items():
                for part, param in (("A", a), ("B", b)):
                    key = self.peft_key(name, part)
                    if key not in tensors or tensors[key].shape != param.shape:
                        raise ValueError(
                            f"{folder}: {key} is missing or of another shape than {list(param.shape)}"
                        )
                    param.copy_(tensors[key])
        self.adapter.scale = float(config["lora_alpha"]) / int(config["r"])

    def close(self, model: Any) -> None:
        model.loop.run(self.adapter.close(model.swarm), timeout=30)


class PromptOptions(PluginOptions):
    num_virtual_tokens: int = Field(8, ge=1, le=512, description="trained prompt tokens put before the input")
    seed: int = Field(0, description="seed of the prompts' initialisation (rows of the embedding table)")


class Prompt(TuningMethod):
    """Prompt tuning: trained embeddings of ``num_virtual_tokens`` tokens put before every input."""

    name: ClassVar[str] = "prompt"
    description: ClassVar[str] = "trained prompt embeddings before the input (peft prompt tuning)"
    Options: ClassVar[type[PluginOptions]] = PromptOptions

    def attach(self, model: Any) -> nn.Module:
        import torch
        from torch import nn

        table = model.get_input_embeddings().weight
        generator = torch.Generator().manual_seed(self.options.seed)
        rows = torch.randint(0, table.shape[0], (self.options.num_virtual_tokens,), generator=generator)
        self.module = nn.Module()
        self.module.prompt = nn.Parameter(table[rows].detach().float().clone())
        self.model = model
        return self.module

    @property
    def prefix(self) -> int:
        return self.options.num_virtual_tokens

    @classmethod
    def options_of_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {"num_virtual_tokens": int(config["num_virtual_tokens"])}

    def extra_tokens(self) -> int:
        return self.prefix

    def prepare_inputs(self, hidden, attention_mask, labels, position_ids):  # noqa: ANN001, ANN201
        import torch

        batch = hidden.shape[0]
        prompt = self.model.client.hidden_from_embeds(self.module.prompt.to(hidden.dtype)[None])
        hidden = torch.cat([prompt.expand(batch, -1, -1), hidden], dim=1)
        if attention_mask is not None:
            ones = attention_mask.new_ones(batch, self.prefix)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        return hidden, attention_mask, labels, None  # positions count the prompt tokens too

    def strip_outputs(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, self.prefix :]

    def continue_inputs(self, attention_mask, position_ids):  # noqa: ANN001, ANN201
        import torch

        if attention_mask is not None:
            ones = attention_mask.new_ones(attention_mask.shape[0], self.prefix)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        return attention_mask, position_ids + self.prefix if position_ids is not None else None

    def save(self, folder: Path) -> Path:
        config = {
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": self.prefix,
            "token_dim": int(self.module.prompt.shape[1]),
            "num_transformer_submodules": 1,
            "prompt_tuning_init": "RANDOM",
            "inference_mode": True,
            "base_model_name_or_path": str(getattr(self.model, "folder", "") or ""),
        }
        return _write(Path(folder), {"prompt_embeddings": self.module.prompt}, config)

    def load(self, folder: Path) -> None:
        import torch

        tensors, _ = _read(Path(folder))
        with torch.no_grad():
            self.module.prompt.copy_(tensors["prompt_embeddings"])


class DeepPrompt(Prompt):
    """Deep prompt tuning: prompt tuning's input prompts, plus a trained prompt per block added to the
    prompt positions before that block (sent to the servers with every request)."""

    name: ClassVar[str] = "deep-prompt"
    description: ClassVar[str] = "a trained prompt per remote block, sent with each request"

    def attach(self, model: Any) -> nn.Module:
        import torch
        from torch import nn

        module = super().attach(model)
        blocks = model.client.family.num_blocks(model.config)
        module.deep = nn.Parameter(torch.zeros(blocks, self.prefix, module.prompt.shape[1]))
        return module

    def remote(self, batch: int) -> RemoteTuning | None:
        from bloombee_core.client.remote_tuning import RemoteTuning

        return RemoteTuning(prompts=self.module.deep[None])

    def save(self, folder: Path) -> Path:
        config = {"bloombee_method": self.name, "num_virtual_tokens": self.prefix}
        return _write(
            Path(folder), {"prompt_embeddings": self.module.prompt, "deep_prompts": self.module.deep}, config
        )

    def load(self, folder: Path) -> None:
        import torch

        tensors, _ = _read(Path(folder))
        with torch.no_grad():
            self.module.prompt.copy_(tensors["prompt_embeddings"])
            self.module.deep.copy_(tensors["deep_prompts"])


class ClassifierOptions(PluginOptions):
    num_labels: int = Field(2, ge=2, le=100_000, description="classes of the sequence-classification head")


class Classifier(TuningMethod):
    """A sequence-classification head on the final hidden state of each sequence's last real token."""

    name: ClassVar[str] = "classifier"
    description: ClassVar[str] = "a client-side classification head on the last token's hidden state"
    Options: ClassVar[type[PluginOptions]] = ClassifierOptions

    def attach(self, model: Any) -> nn.Module:
        import torch
        from torch import nn

        torch.manual_seed(0)
        self.module = nn.Module()
        self.module.score = nn.Linear(model.config.hidden_size, self.options.num_labels)
        return self.module

    @classmethod
    def options_of_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {"num_labels": int(config["num_labels"])}

    def head(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        import torch

        if attention_mask is None:
            last = torch.full((hidden.shape[0],), hidden.shape[1] - 1, dtype=torch.long)
        else:  # the last position holding a real token (left or right padding)
            positions = torch.arange(attention_mask.shape[1]).expand_as(attention_mask)
            last = torch.where(attention_mask.bool(), positions, -1).max(dim=1).values
        return self.module.score(hidden[torch.arange(hidden.shape[0]), last].float())

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.nn.functional.cross_entropy(output, labels.reshape(-1))

    def save(self, folder: Path) -> Path:
        config = {"bloombee_method": self.name, "num_labels": self.options.num_labels}
        tensors = {"score.weight": self.module.score.weight, "score.bias": self.module.score.bias}
        return _write(Path(folder), tensors, config)

    def load(self, folder: Path) -> None:
        import torch

        tensors, _ = _read(Path(folder))
        with torch.no_grad():
            self.module.score.weight.copy_(tensors["score.weight"])
            self.module.score.bias.copy_(tensors["score.bias"])


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not hold dots


BUILTIN_METHODS: list[type[TuningMethod]] = [Lora, Prompt, DeepPrompt, Classifier]
