"""``bloombee status``: what the DHT says about every model's servers and block coverage."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from bloombee_core.swarm.records import coverage, fetch_models, fetch_servers
from bloombee_core.transport import Transport


async def collect(transport: Transport) -> dict[str, Any]:
    """``{"models": [{"key", "name", "family", "num_blocks", "servers": [...], "coverage": [...]}]}``."""
    found = await fetch_models(transport)
    for _ in range(3):  # a node that just joined may not reach the record holders on its first lookups
        if found:
            break
        await asyncio.sleep(1.0)
        found = await fetch_models(transport)
    models = []
    for key, info in sorted(found.items()):
        servers = await fetch_servers(transport, key, info["num_blocks"])
        records = sorted(servers.values(), key=lambda r: (r.start, r.end, r.peer))
        models.append(
            {
                "key": key,
                "name": str(info.get("name", key)),
                "family": str(info.get("family", "?")),
                "num_blocks": info["num_blocks"],
                "servers": [asdict(r) for r in records],
                "coverage": coverage(records, info["num_blocks"]),
            }
        )
    return {"models": models}


def render(report: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    if not report["models"]:
        console.print("[yellow]no models are served in this swarm (no server has announced itself)[/]")
        return
    for model in report["models"]:
        table = Table(
            title=f"{model['name']}  ({model['family']}, {model['num_blocks']} blocks, key {model['key']})"
        )
        for column in ("server", "name", "blocks", "throughput (tok/s)", "cache left", "dtype", "version"):
            table.add_column(column)
        for s in model["servers"]:
            table.add_row(
                s["peer"][-12:],
                s["public_name"] or "-",
                f"{s['start']}:{s['end']}",
                f"{s['throughput']:.1f}",
                _bytes(s["cache_left"]),
                s["dtype"],
                s["version"],
            )
        console.print(table)
        line = Text("coverage: ")
        for index, count in enumerate(model["coverage"]):
            style = "bold white on red" if count == 0 else ("green" if count > 1 else "cyan")
            line.append(f"{index}:{count}", style=style)
            line.append(" ")
        missing = [i for i, c in enumerate(model["coverage"]) if c == 0]
        console.print(line)
        if missing:
            console.print(f"[bold red]missing blocks: {_ranges(missing)}[/] — no server hosts them")
        else:
            console.print("[green]every block is served[/]")


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ranges(indices: list[int]) -> str:
    out, start = [], indices[0]
    for a, b in zip(indices, indices[1:] + [None], strict=True):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)
