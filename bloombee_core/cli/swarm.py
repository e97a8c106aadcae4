"""Swarm commands: ``bootstrap``, ``serve``, ``generate``, ``status``."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

READY = "bloombee-bootstrap-ready"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bootstrap", help="start a DHT bootstrap node and print its multiaddr")
    p.add_argument("--listen", nargs="*", default=[], metavar="MADDR", help="e.g. /ip4/0.0.0.0/tcp/31337")
    p.add_argument(
        "--identity", metavar="FILE", help="private-key file (created if missing): a stable peer id"
    )
    p.set_defaults(func=cmd_bootstrap)

    p = subparsers.add_parser("serve", help="host a span of a model's blocks in the swarm")
    p.add_argument("model", help="hub id, local folder or .gguf file")
    _peers(p)
    span = p.add_mutually_exclusive_group()
    span.add_argument("--blocks", metavar="A:B", help="host blocks A..B-1")
    span.add_argument("--num-blocks", type=int, metavar="N", help="host the N least-served blocks")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--listen", nargs="*", default=[], metavar="MADDR", help="multiaddrs to listen on")
    p.add_argument("--announce", nargs="*", default=[], metavar="MADDR", help="multiaddrs to announce")
    p.add_argument("--identity", metavar="FILE", help="private-key file (stable peer id)")
    p.add_argument("--public-name", default="", help="a name shown by `bloombee status`")
    p.add_argument("--cache-bytes", type=int, help="KV-cache memory budget in bytes")
    p.add_argument("--offload", default="none", help='offload policy: a name or JSON {"name": ..., options}')
    p.add_argument(
        "--compressor", default="none", help="compressor for hidden states this server sends: a name or JSON"
    )
    p.add_argument("--ttl", type=float, default=30.0, help="seconds DHT records live (refreshed every ttl/3)")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("generate", help="generate text through the swarm, streamed to the terminal")
    p.add_argument("model", help="hub id, local folder or .gguf file (the client loads only its part)")
    _peers(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--decoding", default="greedy", help="decoding strategy name (greedy, sampling, ...)")
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("status", help="table of servers, spans, throughput, cache left and coverage")
    _peers(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_status)


def _peers(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--initial-peers", nargs="+", required=True, metavar="MADDR", help="multiaddrs of peers in the swarm"
    )


def _transport(name: str = "hivemind") -> tuple[Any, Any]:
    from bloombee_core.registry import load_plugins

    plugins = load_plugins()
    return plugins, plugins.create("transports", name, "network.transport")


def wait_for_signal() -> None:
    stop = {"now": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["now"] = True

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    while not stop["now"]:
        signal.pause() if hasattr(signal, "pause") else None


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from bloombee_core.swarm.aio import LoopThread

    _, transport = _transport()
    loop = LoopThread("bloombee-bootstrap")
    try:
        loop.run(transport.start(listen=args.listen, identity=args.identity))
        addrs = loop.run(transport.addresses())
        print(f"{READY} {json.dumps({'peer': transport.peer_id, 'addrs': addrs})}", flush=True)
        print("bootstrap node running; give servers and clients:", file=sys.stderr)
        print("  --initial-peers " + " ".join(addrs), file=sys.stderr, flush=True)
        wait_for_signal()
    finally:
        try:
            loop.run(transport.shutdown(), timeout=15)
        finally:
            loop.stop()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from bloombee_core.registry import load_plugins
    from bloombee_core.server.process import peers_arg, serve_forever
    from bloombee_core.settings import ServerJob

    server = {
        "blocks": args.blocks,
        "num_blocks": args.num_blocks,
        "dtype": args.dtype,
        "device": args.device,
        "listen": args.listen,
        "announce": args.announce,
        "identity": args.identity,
        "public_name": args.public_name,
        "cache_bytes": args.cache_bytes,
        "ttl": args.ttl,
        "offload": _choice(args.offload),
        "compressor": _choice(args.compressor),
    }
    job = ServerJob.model_validate(
        {
            "model": {"path": args.model},
            "network": {"initial_peers": peers_arg(args.initial_peers)},
            "server": server,
        }
    )
    return serve_forever(job, load_plugins())


def _choice(text: str) -> Any:
    """A plugin name, or a JSON object ``{"name": ..., **options}``."""
    return json.loads(text) if text.strip().startswith("{") else text


def cmd_generate(args: argparse.Namespace) -> int:
    from bloombee_core.client.generate import generate_text
    from bloombee_core.registry import load_plugins
    from bloombee_core.server.process import peers_arg

    plugins = load_plugins()
    decoding = plugins.create("decoding_strategies", args.decoding, "--decoding")
    generate_text(
        args.model,
        peers_arg(args.initial_peers),
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
        chat=not args.no_chat,
        decoding=decoding,
        plugins=plugins,
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from bloombee_core.cli.status import collect, render
    from bloombee_core.server.process import peers_arg
    from bloombee_core.swarm.aio import LoopThread

    _, transport = _transport()
    loop = LoopThread("bloombee-status")
    try:
        loop.run(transport.start(initial_peers=peers_arg(args.initial_peers), client_mode=True))
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
