"""Command-line flags made from the settings models, so every setting is declared once (in settings.py).

``add_flags(parser, ServerSettings, "server")`` adds ``--blocks``, ``--num-blocks``, ``--dtype`` ... with
the fields' descriptions as help; :func:`settings_from_flags` turns the parsed flags back into a validated
settings object, with each mistake reported under the flag's name (``--num-blocks: ...``).
Only flags the user gave are set, so every default stays the settings model's own.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from bloombee_core.errors import ConfigError, dotted
from bloombee_core.settings import PluginChoice, settings_error

M = TypeVar("M", bound=BaseModel)
DEST_SEPARATOR = "__"  # argparse dest of server.num_blocks: "server__num_blocks"


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    section: str,
    *,
    only: Iterable[str] | None = None,
    required: Iterable[str] = (),
) -> None:
    """Add a flag for each field of ``model`` (all, or ``only`` these), under ``section`` of the settings."""
    required = set(required)
    names = list(only) if only is not None else list(model.model_fields)
    for name in names:
        field = model.model_fields[name]
        kwargs: dict[str, Any] = {
            "dest": f"{section}{DEST_SEPARATOR}{name}",
            "default": argparse.SUPPRESS,
            "help": _help(field.description, field.get_default(call_default_factory=True)),
        }
        kwargs.update({"metavar": name.upper(), **_kind(field.annotation)})
        if name in required:
            kwargs.update(required=True, help=field.description or "")
            kwargs.pop("default")
        parser.add_argument(flag_name(name), **kwargs)


def settings_from_flags(args: argparse.Namespace, model: type[M], base: Mapping[str, Any] | None = None) -> M:
    """Validate ``model`` from the flags :func:`add_flags` added (plus ``base`` values), naming the flag
    of any mistake.

    :raises ConfigError: keyed by the flag, e.g. ``--blocks: blocks must look like 'A:B' ...``.
    """
    data: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in (base or {}).items()}
    flags: dict[tuple[str, ...], str] = {}
    for dest, value in vars(args).items():
        if DEST_SEPARATOR not in dest:
            continue
        section, name = dest.split(DEST_SEPARATOR, 1)
        data.setdefault(section, {})[name] = value
        flags[(section, name)] = flag_name(name)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = settings_error(exc)
        loc = tuple(str(p) for p in exc.errors()[0]["loc"])
        flag = flags.get(loc[:2]) if len(loc) >= 2 else None
        if flag is None and len(loc) == 1:  # a rule over the whole section: name its flags
            flag = ", ".join(f for (section, _), f in flags.items() if section == loc[0]) or dotted(loc)
        raise ConfigError(flag or error.key, error.message) from None


def _help(description: str | None, default: Any) -> str:
    text = description or ""
    shown = default.name if isinstance(default, PluginChoice) else default
    if shown not in (None, [], "") and not isinstance(shown, BaseModel):
        text += f" (default: {shown})"
    return text.replace("%", "%%")


def _kind(annotation: Any) -> dict[str, Any]:
    """argparse keywords for a field's type: choices for Literal, nargs for lists, JSON for plugins."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return {"choices": list(typing.get_args(annotation)), "metavar": None}
    if origin is list:
        return {"nargs": "+", "metavar": "MADDR"}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction, "metavar": None}
    if annotation is PluginChoice:
        return {"type": plugin_choice, "metavar": 'NAME|{"name": ...}'}
    if annotation in (int, float):
        return {"type": annotation}
    if annotation is Path:
        return {"metavar": "FILE"}
    return {}


def plugin_choice(text: str) -> str | dict[str, Any]:
    """A plugin name, or a JSON object ``{"name": ..., **options}``."""
    if not text.strip().startswith("{"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('give a name or a JSON object {"name": ..., options}')
    return value
