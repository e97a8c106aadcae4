"""``bloombee run``: run every role a settings file declares (default: the embedded demo swarm)."""

from __future__ import annotations

import argparse

from bloombee_core.build import build
from bloombee_core.settings import load_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the roles of a swarm.toml (default: a whole demo swarm on loopback)",
        description="Run every role a settings file declares: bootstrap node, servers, client job. "
        "Without --config: a bootstrap node and two servers splitting the packaged SmolLM2-135M-Instruct "
        "on loopback, and one generation through them.",
    )
    parser.add_argument(
        "--config", "-c", metavar="FILE", help="a swarm.toml (default: the embedded demo swarm)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with build(load_settings(args.config)) as stack:
        return stack.run()
