"""``bloombee status``: what the DHT says about every model's servers, block coverage and throughput."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from bloombee_core.swarm.placement import block_throughput, bottleneck
from bloombee_core.swarm.records import coverage, fetch_models, fetch_servers
from bloombee_core.transport import Transport


async def collect(transport: Transport) -> dict[str, Any]:
    """``{"models": [{"key", "name", "family", "num_blocks", "servers": [...], "coverage": [...],
    "block_throughput": [...], "bottleneck": {"throughput", "blocks"}}]}``."""
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
        capacity = block_throughput(records, info["num_blocks"])
        weakest, weak_blocks = bottleneck(capacity)
        models.append(
            {
                "key": key,
                "name": str(info.get("name", key)),
                "family": str(info.get("family", "?")),
                "num_blocks": info["num_blocks"],
                "servers": [asdict(r) for r in records],
                "coverage": coverage(records, info["num_blocks"]),
                "block_throughput": capacity,
                "bottleneck": {"throughput": weakest, "blocks": weak_blocks},
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
        columns = (
            "server",
            "name",
            "blocks",
            "placed",
            "throughput (tok/s)",
            "cache left",
            "weights dev/cpu/disk",
            "kv layers dev/cpu/disk",
            "memory peak/budget",
            "sent wire/raw",
            "received wire/raw",
            "dtype",
            "version",
        )
        for column in columns:
            table.add_column(column)
        for s in model["servers"]:
            table.add_row(
                s["peer"][-12:],
                s["public_name"] or "-",
                f"{s['start']}:{s['end']}",
                "auto" if s.get("movable") else "fixed",
                f"{s['throughput']:.1f}",
                _bytes(s["cache_left"]),
                *_placement(s.get("memory") or [0] * 8),
                *_wire_over_raw(s.get("traffic") or [0, 0, 0, 0]),
                s["dtype"],
                s["version"],
            )
        console.print(table)
        _print_links(console, model["servers"])
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
        if "block_throughput" in model and not missing:
            _print_throughput(console, model["block_throughput"], model["bottleneck"])


def _print_throughput(console: Any, capacity: list[float], weakest: dict[str, Any]) -> None:
    """Per-block throughput (sum over the servers hosting each block) and the swarm's bottleneck."""
    from rich.text import Text

    line = Text("throughput per block (tok/s): ")
    for index, value in enumerate(capacity):
        line.append(f"{index}:{value:.1f}", style="bold yellow" if index in weakest["blocks"] else "")
        line.append(" ")
    console.print(line)
    console.print(
        f"swarm throughput: {weakest['throughput']:.1f} tok/s, "
        f"bottleneck at blocks {_ranges(weakest['blocks'])}"
    )


def _wire_over_raw(counts: list[int]) -> list[str]:
    """``"<wire> / <raw> (<ratio>)"`` for sent and received tensor bytes."""
    out = []
    for raw, wire in ((counts[0], counts[1]), (counts[2], counts[3])):
        out.append(f"{_bytes(wire)} / {_bytes(raw)}" + (f" ({wire / raw:.2f})" if raw else ""))
    return out


def _print_links(console: Any, servers: list[dict[str, Any]]) -> None:
    """Each server's busiest links: tensor bytes on the wire against raw, per direction."""
    for s in servers:
        for peer, *counts in s.get("links") or []:
            sent, received = _wire_over_raw(counts)
            console.print(f"  link {s['peer'][-12:]} -> {peer[-12:]}: sent {sent}, received {received}")


def _placement(memory: list[int]) -> tuple[str, str, str]:
    """The announced placement: weight bytes and KV-cache layers per tier, peak memory over the budget."""
    weights = "/".join(_bytes(n) if n else "0" for n in memory[:3])
    kv = "/".join(str(n) for n in memory[3:6])
    peak = _bytes(memory[7]) if memory[7] else "-"
    return weights, kv, f"{peak}/{_bytes(memory[6])}" if memory[6] else peak


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
