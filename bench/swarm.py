"""A benchmark swarm on loopback: a bootstrap node and N servers, each server behind a WAN proxy.

Every server listens on a private port and announces the port of its proxy (``--announce``), so every
byte to or from a server crosses one emulated link. Each child runs in its own process group (its
p2pd daemon and DHT fork included) and is stopped by that group's id: nothing else is touched, and
nothing is left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.floors import Link
from bloombee_core.roles import parse_ready

READY = re.compile(
    r"bloombee-ready server \{.*\}"
)  # printed by `bloombee serve` once it serves (bloombee_core.roles)
MADDR = re.compile(r"/ip4/[0-9.]+/tcp/\d+/p2p/[1-9A-HJ-NP-Za-km-z]{30,}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PGRP, SESSION = 2, 3  # indices of the process group and the session id in ``_stats``' fields


def _stats(field: int, value: int) -> list[tuple[int, list[str]]]:
    """(pid, /proc stat fields after the command name) of every process whose ``field`` (``PGRP`` or
    ``SESSION``) is ``value`` (Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state, ppid, pgrp, ..., utime (12), stime (13)
        if int(fields[field]) == value:
            found.append((int(entry.name), fields))
    return found


def live_group_members(pgid: int) -> list[int]:
    """Pids of processes in group ``pgid`` that are not zombies (Linux /proc; empty elsewhere)."""
    return [pid for pid, fields in _stats(PGRP, pgid) if fields[0] != "Z"]


def live_session_members(sid: int) -> list[int]:
    """Pids of processes in session ``sid`` that are not zombies (Linux /proc; empty elsewhere)."""
    return [pid for pid, fields in _stats(SESSION, sid) if fields[0] != "Z"]


def group_cpu_seconds(pgid: int) -> dict[str, float]:
    """User + system CPU seconds used so far by the live processes of group ``pgid``, by program (p2pd, python)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid, fields in _stats(PGRP, pgid):
        try:
            program = "p2pd" if "p2pd" in os.readlink(f"/proc/{pid}/exe") else "python"
        except OSError:
            program = "?"
        out[program] = out.get(program, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return out


class ChildError(RuntimeError):
    """A child process died or never became ready; the message carries its log tail."""


class Child:
    """One child process in its own process group, its output in a log file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group: p2pd and DHT forks die with it
        )

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ChildError(
                f"{self.name} exited with code {self.proc.returncode}; its log ({self.log_path}) ends with:\n"
                f"{self.log_tail()}"
            )

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float) -> str:
        """Wait until the log matches ``pattern``; returns the first match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = regex.search(self.log_tail(1_000_000))
            if found:
                return found.group(0)
            self.check_alive()
            time.sleep(0.1)
        raise ChildError(
            f"{self.name} printed no {regex.pattern!r} within {timeout:.0f}s; log:\n{self.log_tail()}"
        )

    def stop(self, grace: float = 5.0) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # The leader may be gone while its group (p2pd, DHT fork) lingers: clear the group too.
        deadline = time.monotonic() + 5.0
        while live_group_members(self.proc.pid) and time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.05)
        self._log.close()


class BenchSwarm:
    """Bootstrap + one server per span of ``cuts``, each behind a proxy with ``link``'s delay and cap."""

    def __init__(
        self,
        model_path: Path,
        cuts: list[int],
        link: Link,
        dtype: str = "float32",
        threads: int | None = 1,
        log_dir: Path | None = None,
        start_timeout: float = 120.0,
        variant: str = "",
        proxy_per_server: bool = False,
        server_args: list[str] | None = None,
    ) -> None:
        self.model_path = model_path
        self.server_args = list(server_args or [])  # extra `bloombee serve` flags (e.g. --compressor none)
        self.cuts = cuts
        self.link = link
        self.dtype = dtype
        self.threads = threads  # None: what a user gets, no --threads and no OpenMP variables
        self.proxy_per_server = proxy_per_server  # each server's proxy in its own process
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="bloombee-bench-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        # A trial fix (bench/fastpath.py) runs the servers through its own entry point.
        self.server_module = ["-m", "bench.fastpath", variant] if variant else ["-m", "bloombee_core.cli"]
        self.children: list[Child] = []
        self.proxy_ports: list[int] = []  # one per server, in chain order (empty for the "direct" link)
        self.initial_peers: list[str] = []

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, [sys.executable, *args], self.log_dir, env)
        self.children.append(child)
        return child

    def start(self) -> BenchSwarm:
        try:
            bootstrap = self._spawn("bootstrap", ["-m", "bloombee_core.cli", "bootstrap"])
            self.initial_peers = [bootstrap.wait_for(MADDR, self.start_timeout)]
            spans = list(zip(self.cuts[:-1], self.cuts[1:], strict=True))
            server_ports = [free_port() for _ in spans]
            if self.link.name == "direct":  # no proxy: servers announce their own port
                proxy_ports = server_ports
            else:
                proxy_ports = self.proxy_ports = [free_port() for _ in spans]
                pairs = [f"{p}:127.0.0.1:{s}" for p, s in zip(proxy_ports, server_ports, strict=True)]
                mbit = [] if self.link.mbit is None else ["--mbit", f"{self.link.mbit:g}"]
                groups = [[pair] for pair in pairs] if self.proxy_per_server else [pairs]
                for i, group in enumerate(groups):
                    proxies = self._spawn(
                        "proxies" if i == 0 else f"proxies{i}",
                        ["-m", "bench.proxyhost", "--delay-ms", f"{self.link.delay_ms:g}", *mbit, *group],
                    )
                    proxies.wait_for(r"\bready\b", 30)
            env, thread_flag = None, []
            if self.threads is not None:
                threads = str(self.threads)
                env, thread_flag = (
                    {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
                    ["--threads", threads],
                )
            for i, ((a, b), sport, pport) in enumerate(zip(spans, server_ports, proxy_ports, strict=True)):
                self._spawn(
                    f"server{i}",
                    [
                        *self.server_module, "serve", str(self.model_path),
                        "--initial-peers", *self.initial_peers,
                        "--blocks", f"{a}:{b}",
                        "--dtype", self.dtype,
                        "--listen", f"/ip4/127.0.0.1/tcp/{sport}",
                        "--announce", f"/ip4/127.0.0.1/tcp/{pport}",
                        *thread_flag,
                        *self.server_args,
                    ],
                    env,
                )  # fmt: skip
            for child, pport in zip(self.children[-len(spans) :], proxy_ports, strict=True):
                self._check_behind_proxy(child, pport)
        except BaseException:
            self.close()
            raise
        return self

    def _check_behind_proxy(self, server: Child, proxy_port: int) -> None:
        """Wait for the server's ready line and make sure it announces only its proxy's address."""
        line = server.wait_for(READY, self.start_timeout)
        parsed = parse_ready(line.strip())
        addrs = parsed[1].get("addrs", []) if parsed else []
        if not addrs or any(f"/tcp/{proxy_port}/" not in a for a in addrs):
            raise ChildError(
                f"{server.name} announces {addrs}, not only its proxy (port {proxy_port}): traffic would bypass "
                "the emulated link; check that `bloombee serve --announce` replaces the announced addresses"
            )

    def proxy_bytes(self, timeout: float = 5.0) -> list[tuple[int, int]]:
        """Bytes each server's proxy has carried so far, (to the server, from the server), in chain order."""
        proxies = next((c for c in self.children if c.name == "proxies"), None)
        if self.proxy_per_server:
            raise RuntimeError("byte counts need the proxies in one process (proxy_per_server=False)")
        if proxies is None:
            raise RuntimeError("this swarm has no proxies (link 'direct'); byte counts need a proxied link")
        seen = proxies.log_tail(1_000_000).count("bytes ")
        os.kill(proxies.proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = proxies.log_tail(1_000_000)
            lines = [line for line in text.splitlines() if line.startswith("bytes ")]
            if len(lines) >= seen + len(self.proxy_ports):
                latest = {}
                for line in lines[-len(self.proxy_ports) :]:
                    _, port, up, down = line.split()
                    latest[int(port)] = (int(up.removeprefix("up=")), int(down.removeprefix("down=")))
                return [latest[port] for port in self.proxy_ports]
            time.sleep(0.05)
        raise ChildError(f"the proxy host did not report its byte counts within {timeout}s")

    def check_alive(self) -> None:
        for child in self.children:
            child.check_alive()

    def close(self) -> None:
        # Servers first (they deregister), then the proxies and the bootstrap node.
        for child in reversed(self.children):
            child.stop()
        self.children.clear()

    def __enter__(self) -> BenchSwarm:
        return self.start()

    def __exit__(self, exc_type: type | None, *rest: object) -> None:
        self.close()
        # Logs of a swarm that failed are kept (and named) for diagnosis; a clean run leaves no files behind.
        if exc_type is None and self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        elif exc_type is not None and exc_type is not KeyboardInterrupt:
            print(f"benchmark swarm logs kept in {self.log_dir}", file=sys.stderr)
