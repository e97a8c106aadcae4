"""Running the roles a :class:`~bloombee_core.settings.Settings` declares: a bootstrap node, servers,
and a client job.

The bootstrap node and every server run as child processes (``python -m bloombee_core.roles ROLE``, their
validated settings as JSON on stdin), each in its own process group, so closing the stack — normally, on
an error or on Ctrl-C — stops them and everything they started (DHT processes, ``p2pd`` daemons). The
client job runs in this process. Processes on one machine share its cores: each server and the client
get an equal share of torch threads unless ``server.threads`` says otherwise.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from bloombee_core.errors import BloombeeError
from bloombee_core.registry import PluginSet
from bloombee_core.roles import parse_ready
from bloombee_core.settings import BootstrapJob, ClientJob, ServerJob, Settings

START_TIMEOUT = 180.0


class StackError(BloombeeError):
    pass


class Child:
    """A process that prints a ready line once it serves; ``ready`` is the JSON that line carried.

    ``argv`` follows ``python -m``: ``["bloombee_core.cli", "serve", ...]`` (a command line, as a user
    types it) or ``["bloombee_core.roles", "server"]`` with the role's settings JSON as ``stdin``.
    """

    def __init__(self, name: str, argv: list[str], log_dir: Path, stdin: str | None = None) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *argv],
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
            start_new_session=True,  # its own process group: we stop it and its p2pd together
        )
        if stdin is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(stdin)
            self.proc.stdin.close()
        self.ready: dict[str, Any] | None = None
        self._event = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parsed = parse_ready(line)
            if parsed is not None:
                self.ready = parsed[1]
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


def thread_share(processes: int) -> int:
    """Torch threads for each of ``processes`` compute-heavy processes sharing this machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(processes, 1))


class Stack:
    def __init__(self, settings: Settings, plugins: PluginSet) -> None:
        self.settings = settings
        self.plugins = plugins
        self.children: list[Child] = []
        self.peers: list[str] = list(settings.network.initial_peers)
        self._logs = tempfile.TemporaryDirectory(prefix="bloombee-stack-")
        # compute-heavy processes on this machine: the servers and the client job
        self.threads = thread_share(len(settings.server) + (settings.job.kind != "none"))
        self.log_dir = Path(self._logs.name)
        # Children run in their own process groups, so nothing else would stop them if the program that
        # built this stack ends without closing it: close it at exit (unregistered by close()).
        atexit.register(self.close)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        """Start the bootstrap node and the servers; return once every one of them serves."""
        from bloombee_core.model_files import resolve_model

        settings = self.settings
        net = settings.network
        if net.bootstrap:
            boot = self._spawn("bootstrap", BootstrapJob(network=net, plugins=settings.plugins))
            self.peers = boot.wait_ready()["addrs"] + self.peers
            _say(f"bootstrap node: {' '.join(self.peers)}")
        if self.settings.server and not self.peers:
            raise StackError("servers need a swarm: set network.bootstrap = true or network.initial_peers")
        if self.settings.server:
            model = str(resolve_model(self.settings.model.path))  # convert once, before servers race for it
            pending = []
            network = net.model_copy(update={"initial_peers": self.peers})
            model_settings = settings.model.model_copy(update={"path": str(model)})
            for i, server in enumerate(settings.server):
                picks_blocks = server.blocks is None
                if (
                    picks_blocks
                ):  # it picks the span that raises throughput most: earlier servers must have announced
                    for other in pending:
                        self._report(other)
                    pending = []
                own = {
                    "threads": server.threads or self.threads,
                    "public_name": server.public_name or f"server-{i}",
                }
                job = ServerJob(
                    model=model_settings,
                    network=network,
                    server=server.model_copy(update=own),
                    plugins=settings.plugins,
                )
                child = self._spawn(f"server-{i}", job)
                if picks_blocks:
                    self._report(child)
                else:
                    pending.append(child)
            for child in pending:
                self._report(child)

    def _spawn(self, name: str, job: BootstrapJob | ServerJob) -> Child:
        role = "bootstrap" if isinstance(job, BootstrapJob) else "server"
        child = Child(name, ["bloombee_core.roles", role], self.log_dir, stdin=job.model_dump_json())
        self.children.append(child)
        return child

    def _report(self, child: Child) -> None:
        info = child.wait_ready()
        threads = info.get("threads", "?")
        _say(
            f"{child.name}: blocks {info['start']}:{info['end']} as {info['peer']} (torch threads: {threads})"
        )

    def run(self) -> int:
        job = self.settings.job
        if job.kind == "finetune":  # a missing text file fails before the servers load
            from bloombee_core.finetune import check_data

            check_data(self.settings.finetune)
        self.start()
        if job.kind != "none":
            if not self.peers:
                raise StackError(
                    f"the {job.kind} job needs a swarm: set network.bootstrap or network.initial_peers"
                )
            network = self.settings.network.model_copy(update={"initial_peers": self.peers})
            client_job = ClientJob(
                model=self.settings.model,
                network=network,
                client=self.settings.client,
                job=job,
                finetune=self.settings.finetune,
                api=self.settings.api,
                plugins=self.settings.plugins,
            )
            if job.kind == "finetune":
                from bloombee_core.finetune import run_finetune

                run_finetune(client_job, self.plugins, threads=self.threads)
            elif job.kind == "api":  # serves until Ctrl-C / SIGTERM
                from bloombee_core.api.serve import run_api

                run_api(client_job, self.plugins, threads=self.threads)
            else:
                from bloombee_core.roles import run_generate

                run_generate(client_job, self.plugins, threads=self.threads)
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
        atexit.unregister(self.close)
        for child in self.children:  # all at once: each takes a few seconds to leave the DHT
            child.terminate()
        for child in reversed(self.children):
            child.stop()
        self.children = []
        self._logs.cleanup()


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
