"""``bloombee config``: validate a swarm.toml or print the settings' JSON schema."""

from __future__ import annotations

import argparse
import json

from bloombee_core.registry import load_plugins
from bloombee_core.settings import Settings, check_plugin_choices, load_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config", help="validate settings files, print their schema", description=__doc__
    )
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate a swarm.toml, plugin options included")
    check.add_argument("file", help="path to a swarm.toml")
    check.set_defaults(func=run_check)
    schema = actions.add_parser("schema", help="print the JSON schema of swarm.toml")
    schema.set_defaults(func=run_schema)


def run_check(args: argparse.Namespace) -> int:
    settings = load_settings(args.file)
    check_plugin_choices(settings, load_plugins(strict=settings.plugins.strict))
    roles = (["bootstrap"] if settings.network.bootstrap else []) + [f"{len(settings.server)} server(s)"]
    print(f"ok: {args.file} ({', '.join(roles)}, job: {settings.job.kind})")
    return 0


def run_schema(args: argparse.Namespace) -> int:
    print(json.dumps(Settings.model_json_schema(), indent=2))
    return 0
