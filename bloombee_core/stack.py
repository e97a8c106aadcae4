"""Running the roles a :class:`~bloombee_core.settings.Settings` declares: a bootstrap node, servers,
and a client job.

The bootstrap node and every server run as child processes (``python -m bloombee_core.cli ...``), each
in its own process group, so closing the stack — normally, on an error or on Ctrl-C — stops them and
everything they started (DHT processes, ``p2pd`` daemons). The client job runs in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from bloombee_core.errors import BloombeeError
from bloombee_core.settings import Settings

START_TIMEOUT = 180.0


class StackError(BloombeeError):
    pass


class Child:
    """A role running in a child process; ``ready`` is the JSON its ready line carried."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bloombee_core.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
            start_new_session=True,  # its own process group: we stop it and its p2pd together
        )
        self.ready: dict[str, Any] | None = None
        self._event = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("bloombee-") and "-ready " in line:
                self.ready = json.loads(line.split(" ", 1)[1])
                self._event.set()
        self._event.set()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        self._event.wait(timeout)
        if self.ready is None:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-15:]
            state = "exited" if self.proc.poll() is not None else f"not ready after {timeout:.0f}s"
            raise StackError(f"{self.name} {state}; last log lines:\n  " + "\n  ".join(tail))
        return self.ready

    def terminate(self) -> None:
        if self.proc.poll() is None:  # the leader only: it shuts its DHT process and p2pd down cleanly
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 10.0) -> None:
        self.terminate()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        # whatever is left of the group (a DHT process, a p2pd) goes too
        _signal_group(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log_file.close()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def server_argv(settings: Settings, index: int, model: str, peers: list[str]) -> list[str]:
    server = settings.server[index]
    argv = ["serve", model, "--initial-peers", *peers, "--dtype", server.dtype or settings.model.dtype]
    if server.blocks:
        argv += ["--blocks", server.blocks]
    elif server.num_blocks:
        argv += ["--num-blocks", str(server.num_blocks)]
    argv += ["--device", server.device]
    if server.listen:
        argv += ["--listen", *server.listen]
    if server.announce:
        argv += ["--announce", *server.announce]
    if server.identity:
        argv += ["--identity", str(server.identity)]
    argv += ["--public-name", server.public_name or f"server-{index}"]
    if server.cache_bytes is not None:
        argv += ["--cache-bytes", str(server.cache_bytes)]
    argv += ["--offload", _choice_arg(server.offload), "--compressor", _choice_arg(server.compressor)]
    return argv


def _choice_arg(choice: Any) -> str:
    options = choice.options()
    return json.dumps({"name": choice.name, **options}) if options else choice.name


class Stack:
    def __init__(self, settings: Settings, plugins: Any) -> None:
        self.settings = settings
        self.plugins = plugins
        self.children: list[Child] = []
        self.peers: list[str] = list(settings.network.initial_peers)
        self._logs = tempfile.TemporaryDirectory(prefix="bloombee-stack-")
        self.log_dir = Path(self._logs.name)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        """Start the bootstrap node and the servers; return once every one of them serves."""
        from bloombee_core.model_files import resolve_model

        net = self.settings.network
        if net.bootstrap:
            argv = ["bootstrap"] + (["--listen", *net.listen] if net.listen else [])
            argv += ["--identity", str(net.identity)] if net.identity else []
            boot = self._spawn("bootstrap", argv)
            self.peers = boot.wait_ready()["addrs"] + self.peers
            _say(f"bootstrap node: {' '.join(self.peers)}")
        if self.settings.server and not self.peers:
            raise StackError("servers need a swarm: set network.bootstrap = true or network.initial_peers")
        if self.settings.server:
            model = str(resolve_model(self.settings.model.path))  # convert once, before servers race for it
            pending = []
            for i, server in enumerate(self.settings.server):
                picks_blocks = server.blocks is None
                if picks_blocks:  # it picks the least-served blocks: earlier servers must have announced
                    for other in pending:
                        self._report(other)
                    pending = []
                child = self._spawn(f"server-{i}", server_argv(self.settings, i, model, self.peers))
                if picks_blocks:
                    self._report(child)
                else:
                    pending.append(child)
            for child in pending:
                self._report(child)

    def _spawn(self, name: str, argv: list[str]) -> Child:
        child = Child(name, argv, self.log_dir)
        self.children.append(child)
        return child

    def _report(self, child: Child) -> None:
        info = child.wait_ready()
        _say(f"{child.name}: blocks {info['start']}:{info['end']} as {info['peer']}")

    def run(self) -> int:
        self.start()
        job = self.settings.job
        if job.kind == "generate":
            from bloombee_core.client.generate import generate_text

            if not self.peers:
                raise StackError(
                    "the generate job needs a swarm: set network.bootstrap or network.initial_peers"
                )
            client = self.settings.client
            generate_text(
                self.settings.model.path,
                self.peers,
                job.prompt,
                max_new_tokens=job.max_new_tokens,
                dtype=self.settings.model.dtype,
                chat=job.chat,
                decoding=self.plugins.create("decoding_strategies", client.decoding, "client.decoding"),
                compressor=self.plugins.create("compressors", client.compressor, "client.compressor"),
                plugins=self.plugins,
            )
            return 0
        if self.children:
            _say("serving; press Ctrl-C to stop")
            try:
                while all(c.proc.poll() is None for c in self.children):
                    threading.Event().wait(1.0)
            except KeyboardInterrupt:
                return 0
            dead = [c.name for c in self.children if c.proc.poll() is not None]
            raise StackError(f"{', '.join(dead)} stopped unexpectedly; logs in {self.log_dir}")
        return 0

    def close(self) -> None:
        for child in self.children:  # all at once: each takes a few seconds to leave the DHT
            child.terminate()
        for child in reversed(self.children):
            child.stop()
        self.children = []
        self._logs.cleanup()


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
