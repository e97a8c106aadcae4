"""The base every plugin class derives from: a unique ``name`` and a pydantic ``Options`` model."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class PluginOptions(BaseModel):
    """Options of a plugin. Unknown keys are errors, so a typo in swarm.toml is caught."""

    model_config = ConfigDict(extra="forbid")


class Plugin:
    """A named, configurable extension.

    Subclasses set ``name`` (unique within their kind) and may define a nested ``Options`` model
    derived from :class:`PluginOptions`. Instances receive their validated options.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, options: PluginOptions | None = None) -> None:
        self.options = options if options is not None else self.Options()
