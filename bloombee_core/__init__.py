"""BloomBee: large language models served by a swarm of ordinary machines.

Public API: :func:`build`, :class:`Settings`, :func:`load_settings`, :func:`load_plugins`, and
:class:`AutoDistributedModelForCausalLM` (imported lazily: it pulls in torch and transformers).
"""

from __future__ import annotations

from typing import Any

from bloombee_core.build import build
from bloombee_core.errors import BloombeeError, ConfigError, PluginError
from bloombee_core.hookspecs import hookimpl
from bloombee_core.plugin import Plugin, PluginOptions
from bloombee_core.registry import load_plugins
from bloombee_core.settings import Settings, load_settings

__all__ = [
    "AutoDistributedModelForCausalLM",
    "BloombeeError",
    "ConfigError",
    "Plugin",
    "PluginError",
    "PluginOptions",
    "Settings",
    "build",
    "hookimpl",
    "load_plugins",
    "load_settings",
]


def __getattr__(name: str) -> Any:
    if name == "AutoDistributedModelForCausalLM":
        from bloombee_core.client import AutoDistributedModelForCausalLM

        return AutoDistributedModelForCausalLM
    raise AttributeError(f"module 'bloombee_core' has no attribute {name!r}")
