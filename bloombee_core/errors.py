"""Errors meant for people: each says what was wrong, with what value, and what to do."""

from __future__ import annotations


class BloombeeError(Exception):
    """Base of every error BloomBee reports without a traceback."""


class ConfigError(BloombeeError):
    """A setting is wrong. ``key`` is its dotted path in swarm.toml (e.g. ``client.compressor.level``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


class PluginError(BloombeeError):
    """A plugin could not be loaded or clashes with another one."""


def dotted(parts: list[str | int] | tuple[str | int, ...]) -> str:
    """``("server", 0, "blocks")`` -> ``"server[0].blocks"``: how a key is written in messages."""
    out = ""
    for part in parts:
        if isinstance(part, int) or str(part).isdigit():
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
