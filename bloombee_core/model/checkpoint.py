"""Reading a local model folder: its config, its tensors by name, and the model's classes.

Nothing here reads more than it is asked for: :class:`TensorSource` memory-maps safetensors shards and
reads one tensor at a time, and a model skeleton is built with zero decoder layers.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.initialization import no_init_weights


def load_config(path: str | Path) -> PretrainedConfig:
    """Read ``config.json`` from a local model folder (no network)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json; pass a model folder (use bloombee_core.model_files.resolve_model "
            "to turn a hub id or .gguf file into one)"
        )
    return AutoConfig.from_pretrained(folder, local_files_only=True)


class TensorSource:
    """Reads single tensors by name from a folder of safetensors shards, lazily (memory-mapped).

    ``reads`` lists every tensor name read, so tests can check that a span reads only its own tensors.
    """

    def __init__(self, folder: str | Path, base_prefix: str = "") -> None:
        self.folder = Path(folder)
        self.stored: dict[str, str] = {}  # name we ask for -> name in the file, where they differ
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        else:
            shards = sorted(self.folder.glob("*.safetensors"))
            if not shards:
                raise FileNotFoundError(f"no *.safetensors files in {self.folder}")
            self.files = {}
            for shard in shards:
                with safe_open(shard, framework="pt") as f:
                    self.files.update({name: shard for name in f.keys()})
        if base_prefix and not any(name.startswith(base_prefix) for name in self.files):
            # checkpoints of the bare base model (e.g. bigscience BLOOM) omit "transformer."
            self.stored = {base_prefix + name: name for name in self.files}
            self.files = {base_prefix + name: file for name, file in self.files.items()}
        self.reads: list[str] = []

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self, prefix: str) -> list[str]:
        return [name for name in self.files if name.startswith(prefix)]

    def numel(self, name: str) -> int:
        """Elements of tensor ``name``, from its shard's header (no data is read)."""
        if name not in self.files:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.folder}")
        with safe_open(self.files[name], framework="pt") as f:
            return math.prod(f.get_slice(self.stored.get(name, name)).get_shape())

    def read(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.folder}")
        self.reads.append(name)
        with safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(self.stored.get(name, name))


def span_weight_bytes(family: Any, path: str | Path, start: int, end: int, dtype: torch.dtype) -> list[int]:
    """Bytes of each of ``family``'s blocks ``start:end`` in ``dtype``, from the checkpoint's headers
    (no tensor data is read): what a server plans its memory with before loading."""
    source = TensorSource(path, family.base_prefix)
    sizes = []
    for index in range(start, end):
        names = source.names(f"{family.layer_prefix}{index}.")
        sizes.append(sum(source.numel(name) for name in names) * dtype.itemsize)
    return sizes


def causal_lm_class(config: PretrainedConfig) -> type:
    """The transformers ``*ForCausalLM`` class for ``config.model_type``."""
    mapping = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        return mapping[type(config)]
    except KeyError:
        raise TypeError(f"transformers has no causal LM for model_type {config.model_type!r}") from None


def meta_skeleton(config: PretrainedConfig) -> nn.Module:
    """The model with zero layers on the meta device (no memory): to learn its classes and settings."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")  # 0-layer tables
        return AutoModelForCausalLM.from_config(zero_layer_config(config))


def zero_layer_config(config: PretrainedConfig) -> PretrainedConfig:
    """The same config with no decoder layers: builds only embeddings, norm, head and rotary cheaply."""
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = 0
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = []
    return cfg


def prepared_config(config: PretrainedConfig, skeleton: nn.Module) -> PretrainedConfig:
    """A copy with the attention / experts implementations transformers itself would pick."""
    config = copy.deepcopy(config)
    for attr in ("_attn_implementation", "_experts_implementation"):
        if getattr(config, attr, None) is None and getattr(skeleton.config, attr, None) is not None:
            setattr(config, attr, getattr(skeleton.config, attr))
    return config


def layer_from_state(make_layer: Callable[[], nn.Module], state: dict[str, torch.Tensor]) -> nn.Module:
    """The layer ``make_layer`` builds, holding ``state``: built on the meta device and given the
    checkpoint tensors themselves (no init, no second copy) unless it computes buffers of its own."""
    with torch.device("meta"):
        layer = make_layer()
    layer.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in layer.buffers()):
        # this layer computes buffers in __init__ that are not in the checkpoint: build it for real
        with no_init_weights():
            layer = make_layer()
        layer.load_state_dict(state, strict=True)
    return layer


def is_tied(model: nn.Module, name: str) -> bool:
    """True when parameter ``name`` shares its storage with another parameter (e.g. a tied LM head)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return any(other != name and params[other] is params[name] for other in params)
