"""Family detection through the plugin registry, and a new model_type added by a plugin (the docs' template)."""

from __future__ import annotations

import pytest
from family_helpers import TINY, assert_family_parity, save_tiny
from transformers import AutoConfig, Qwen2Config

from bloombee_core.family import ModelFamily
from bloombee_core.hookspecs import hookimpl
from bloombee_core.model import load_config
from bloombee_core.registry import load_plugins

BUILT_IN = {
    "llama": "llama",
    "mistral": "llama",
    "bloom": "bloom",
    "falcon": "falcon",
    "mixtral": "mixtral",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3_text": "gemma",
    "gemma4_text": "gemma",
}


@pytest.mark.parametrize("model_type", sorted(BUILT_IN))
def test_config_model_type_picks_the_built_in_family(model_type):
    family = load_plugins().family_for(AutoConfig.for_model(model_type))
    assert isinstance(family, ModelFamily)
    assert family.name == BUILT_IN[model_type]


class Qwen2Family(ModelFamily):
    """A third-party adapter: Qwen2 needs nothing beyond the shared base, so it is pure data."""

    name = "qwen2"
    model_types = ("qwen2",)


class Qwen2Plugin:
    @hookimpl
    def bloombee_register_model_families(self):
        return [Qwen2Family]


def test_a_plugin_adds_a_model_type_without_touching_the_core(tmp_path):
    plugins = load_plugins(extra=[Qwen2Plugin()])
    config = Qwen2Config(**TINY)
    path = save_tiny(config, tmp_path)
    family = plugins.family_for(load_config(path))
    assert isinstance(family, Qwen2Family)
    assert_family_parity(family, path, [0, 1, 5])


def test_unserved_model_type_names_what_is_installed():
    with pytest.raises(Exception, match="no installed model family serves model_type 'qwen2'.*llama"):
        load_plugins().family_for(AutoConfig.for_model("qwen2"))
