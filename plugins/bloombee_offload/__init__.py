"""Built-in offload policies: ``none`` and ``percent``."""

from __future__ import annotations

from bloombee_core.hookspecs import hookimpl
from bloombee_core.offload import OffloadPolicy
from bloombee_offload.policies import BUILTIN_POLICIES, NoOffload, PercentOffload

__all__ = ["NoOffload", "PercentOffload"]


@hookimpl
def bloombee_register_offload_policies() -> list[type[OffloadPolicy]]:
    return list(BUILTIN_POLICIES)
