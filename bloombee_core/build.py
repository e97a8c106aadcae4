"""``build(settings)``: turn validated settings into a running stack."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from bloombee_core.registry import load_plugins
from bloombee_core.settings import Settings, check_plugin_choices

if TYPE_CHECKING:
    from bloombee_core.stack import Stack


def build(settings: Settings, *, extra_plugins: Iterable[object] = ()) -> Stack:
    """Load plugins (the plugin manager is created here), validate every plugin choice, make the stack.

    Hooks run here, once; the stack's hot paths call plain plugin objects.

    :param extra_plugins: plugin objects registered beside the installed ones (tests pass theirs here).
    """
    plugins = load_plugins(strict=settings.plugins.strict, extra=extra_plugins)
    check_plugin_choices(settings, plugins)
    from bloombee_core.stack import Stack

    return Stack(settings, plugins)
