"""The roles a stack runs in child processes, and the one ready line each prints once it serves.

A child is started as ``python -m bloombee_core.roles ROLE`` with its settings (a :class:`BootstrapJob`
or :class:`ServerJob`) as JSON on stdin: validated settings cross the process boundary, not re-parsed
command lines. ``bloombee bootstrap`` and ``bloombee serve`` run the same roles in the foreground.

Once a role serves it prints ``bloombee-ready ROLE {json}`` on stdout (peer id, addresses, blocks ...);
:func:`parse_ready` reads it back.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from bloombee_core.errors import BloombeeError, ConfigError
from bloombee_core.registry import PluginSet
from bloombee_core.settings import BootstrapJob, ClientJob, ServerJob, check_plugin_choices, settings_error

READY = "bloombee-ready"
JOBS: dict[str, type[BootstrapJob | ServerJob]] = {"bootstrap": BootstrapJob, "server": ServerJob}


def ready_line(role: str, info: dict[str, Any]) -> str:
    return f"{READY} {role} {json.dumps(info)}"


def parse_ready(line: str) -> tuple[str, dict[str, Any]] | None:
    """``(role, info)`` from a ready line, or ``None`` for any other line."""
    if not line.startswith(READY + " "):
        return None
    role, _, payload = line[len(READY) + 1 :].partition(" ")
    return role, json.loads(payload)


def announcer(role: str) -> Callable[[dict[str, Any]], None]:
    """What a role calls once it serves: the ready line on stdout, a human summary on stderr."""

    def announce(info: dict[str, Any]) -> None:
        print(ready_line(role, info), flush=True)
        addrs = " ".join(info.get("addrs", []))
        if role == "server":
            print(f"serving blocks {info['start']}:{info['end']} as {info['peer']}", file=sys.stderr)
            print(f"  reachable at: {addrs}", file=sys.stderr, flush=True)
        else:
            print("bootstrap node running; give servers and clients:", file=sys.stderr)
            print(f"  --initial-peers {addrs}", file=sys.stderr, flush=True)

    return announce


def run_role(job: BootstrapJob | ServerJob) -> int:
    """Run the role ``job`` describes in the foreground until SIGTERM / SIGINT."""
    from bloombee_core.registry import load_plugins

    plugins = load_plugins(strict=job.plugins.strict)
    check_plugin_choices(job, plugins)  # before anything slow: a typo fails at once, naming its key
    if isinstance(job, ServerJob):
        from bloombee_core.server.process import serve_forever

        return serve_forever(job, plugins, announcer("server"))
    from bloombee_core.server.bootstrap import run_bootstrap

    return run_bootstrap(job, plugins, announcer("bootstrap"))


def run_generate(job: ClientJob, plugins: PluginSet, threads: int | None = None) -> str:
    """The client's generate job: one generation through the swarm, streamed to the terminal."""
    from bloombee_core.client.generate import generate_text

    if not job.network.initial_peers:
        raise ConfigError("network.initial_peers", "the generate job needs a swarm: give its multiaddrs")
    check_plugin_choices(job, plugins)
    if threads:
        import torch

        torch.set_num_threads(threads)
    return generate_text(
        job.model.path,
        job.network.initial_peers,
        job.job.prompt,
        max_new_tokens=job.job.max_new_tokens,
        dtype=job.model.dtype,
        chat=job.job.chat,
        decoding=plugins.create("decoding_strategies", job.client.decoding, "client.decoding"),
        compressor=plugins.create("compressors", job.client.compressor, "client.compressor"),
        transport=plugins.create("transports", job.network.transport, "network.transport"),
        family=job.model.family,
        plugins=plugins,
        micro_batch=job.client.micro_batch,
        prefill_chunk=job.client.prefill_chunk,
    )


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1 or argv[0] not in JOBS:
        print(f"usage: python -m bloombee_core.roles {{{','.join(JOBS)}}} < job.json", file=sys.stderr)
        return 2
    role = argv[0]
    try:
        return run_role(JOBS[role].model_validate_json(sys.stdin.read()))
    except ValidationError as exc:
        print(f"error: {settings_error(exc)}", file=sys.stderr)
    except BloombeeError as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
