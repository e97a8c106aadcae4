"""Swarm commands: ``bootstrap``, ``serve``, ``generate``, ``api``, ``status``.

Their flags are made from the settings models (:mod:`bloombee_core.cli.flags`): each setting is declared
once, in :mod:`bloombee_core.settings`, with the same name and meaning here and in swarm.toml.
"""

from __future__ import annotations

import argparse
import json
import os

from bloombee_core.api.settings import ApiSettings
from bloombee_core.cli.flags import add_flags, plugin_choice, settings_from_flags
from bloombee_core.settings import (
    BootstrapJob,
    ClientJob,
    ClientSettings,
    JobSettings,
    ModelSettings,
    NetworkSettings,
    PluginChoice,
    ServerJob,
    ServerSettings,
)

API_KEY_ENV = "BLOOMBEE_API__API_KEY"  # the same variable `bloombee run` reads for api.api_key


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bootstrap", help="start a DHT bootstrap node and print its multiaddr")
    add_flags(p, NetworkSettings, "network", only=["listen", "identity", "transport"])
    p.set_defaults(func=cmd_bootstrap)

    p = subparsers.add_parser("serve", help="host a span of a model's blocks in the swarm")
    _model(p)
    _swarm(p)
    add_flags(p, ServerSettings, "server")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("generate", help="generate text through the swarm, streamed to the terminal")
    _model(p, dtype=True)
    _swarm(p)
    add_flags(p, JobSettings, "job", only=["max_new_tokens", "chat"])
    add_flags(p, JobSettings, "job", only=["prompt"], required=["prompt"])
    add_flags(p, ClientSettings, "client")
    p.add_argument(
        "--drafter",
        type=plugin_choice,
        metavar='NAME|{"name": ...}',
        help="speculative decoding with this drafter and its options (prompt-lookup, early-exit, "
        'draft-model ...), e.g. --drafter \'{"name": "early-exit", "blocks": 4}\'',
    )
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("api", help="serve an OpenAI-compatible HTTP API and a chat page for a model")
    _model(p, dtype=True)
    _swarm(p)
    add_flags(p, ApiSettings, "api", only=["host", "port", "api_key", "name", "max_tokens", "max_concurrent"])
    add_flags(p, ClientSettings, "client")
    p.set_defaults(func=cmd_api)

    p = subparsers.add_parser("status", help="table of servers, spans, throughput, cache left and coverage")
    _swarm(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_status)


def _model(p: argparse.ArgumentParser, dtype: bool = False) -> None:
    p.add_argument("model", help="hub id, local folder or .gguf file")
    add_flags(p, ModelSettings, "model", only=["family", "dtype"] if dtype else ["family"])


def _swarm(p: argparse.ArgumentParser) -> None:
    add_flags(p, NetworkSettings, "network", only=["initial_peers"], required=["initial_peers"])
    add_flags(p, NetworkSettings, "network", only=["transport"])


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from bloombee_core.roles import run_role

    return run_role(settings_from_flags(args, BootstrapJob))


def cmd_serve(args: argparse.Namespace) -> int:
    from bloombee_core.roles import run_role

    job = settings_from_flags(args, ServerJob, {"model": {"path": args.model}})
    return run_role(job)


def cmd_generate(args: argparse.Namespace) -> int:
    from bloombee_core.registry import load_plugins
    from bloombee_core.roles import run_generate

    job = settings_from_flags(args, ClientJob, {"model": {"path": args.model}, "job": {"kind": "generate"}})
    if args.drafter is not None:  # a drafter means speculative decoding, with the decoding's own options
        chosen = job.client.decoding
        options = chosen.options() if chosen.name == "speculative" else {}
        decoding = PluginChoice(name="speculative", **options, drafter=args.drafter)
        job = job.model_copy(update={"client": job.client.model_copy(update={"decoding": decoding})})
    run_generate(job, load_plugins(strict=job.plugins.strict))
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    from bloombee_core.api.serve import run_api
    from bloombee_core.registry import load_plugins

    base: dict = {"model": {"path": args.model}, "job": {"kind": "api"}}
    if os.environ.get(API_KEY_ENV):  # a key on the command line shows in `ps`; the environment does not
        base["api"] = {"api_key": os.environ[API_KEY_ENV]}
    job = settings_from_flags(args, ClientJob, base)
    return run_api(job, load_plugins(strict=job.plugins.strict))


def cmd_status(args: argparse.Namespace) -> int:
    import asyncio

    from bloombee_core.cli.status import collect, render
    from bloombee_core.registry import load_plugins
    from bloombee_core.swarm.aio import LoopThread

    network = settings_from_flags(args, BootstrapJob).network
    transport = load_plugins().create("transports", network.transport, "--transport")
    loop = LoopThread("bloombee-status")
    try:
        loop.run(transport.start(initial_peers=network.initial_peers, client_mode=True))
        report = loop.run(asyncio.wait_for(collect(transport), 60))
    finally:
        try:
            loop.run(transport.shutdown(), timeout=15)
        finally:
            loop.stop()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render(report)
    return 0
