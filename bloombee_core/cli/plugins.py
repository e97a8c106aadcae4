"""``bloombee plugins``: what is installed, by kind, with distribution and version."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from bloombee_core.registry import KINDS, load_plugins


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plugins", help="list installed plugins by kind", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--strict", action="store_true", help="fail if any plugin fails to load")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    plugins = load_plugins(strict=args.strict)
    rows = [
        {
            "kind": kind,
            "name": info.name,
            "distribution": info.distribution,
            "version": info.version,
            "entry_point": info.source,
            "class": f"{info.cls.__module__}.{info.cls.__qualname__}",
            "description": info.cls.description,
        }
        for kind in KINDS
        for info in sorted(plugins.plugins[kind].values(), key=lambda i: i.name)
    ]
    failures = [
        {"entry_point": f.source, "distribution": f.distribution, "error": f.error} for f in plugins.failures
    ]
    if args.json:
        print(json.dumps({"plugins": rows, "failures": failures}, indent=2))
        return 0
    console = Console()
    table = Table(title="BloomBee plugins")
    for column in ("kind", "name", "distribution", "version", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["kind"], row["name"], row["distribution"] or "-", row["version"] or "-", row["description"]
        )
    console.print(table)
    for failure in failures:
        where = failure["distribution"] or "passed in directly"
        console.print(f"[red]failed to load[/red] {failure['entry_point']} ({where}): {failure['error']}")
    return 0
