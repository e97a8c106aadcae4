"""Session-scoped swarms on loopback: a real bootstrap node and real server processes.

Every process the tests start (servers, their DHT processes, p2pd daemons, in-process client DHTs)
inherits ``BLOOMBEE_TEST_TAG``; at the end of the session none of them may be left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from family_helpers import FAMILY_CONFIGS
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from bloombee_core.stack import Child

TAG = uuid.uuid4().hex
os.environ["BLOOMBEE_TEST_TAG"] = TAG

# uneven splits; llama also has a replica of its middle span (for the fault-tolerance test)
SPLITS = {name: ["0:1", "1:4"] for name in FAMILY_CONFIGS} | {
    "llama": ["0:1", "1:3", "1:3", "3:4"],
    "gemma4": ["0:2", "2:6"],  # the second server's per-layer inputs travel with the first one's push
}
SMOLLM2_SPLIT = ["0:7", "7:20", "20:30"]


def tagged_processes() -> list[tuple[int, str]]:
    """Processes (other than this one) that inherited this session's tag.

    torch's ``torch_shm_manager`` is left out: hivemind's shared-memory futures start one per process
    tree, it is not ours to stop, and it exits by itself once the processes using it are gone.
    """
    found = []
    needle = f"BLOOMBEE_TEST_TAG={TAG}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if not cmd.startswith("torch_shm_manager"):
                    found.append((int(entry.name), cmd[:200]))
        except OSError:
            continue
    return found


def kill_all(pids: Iterable[int]) -> None:
    """SIGKILL every one of ``pids`` that is still there."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Swarm:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        boot = self._spawn("bootstrap", ["bootstrap"])
        self.peers: list[str] = boot.wait_ready()["addrs"]

    def _spawn(self, name: str, argv: list[str]) -> Child:
        child = Child(f"{name}-{len(self.children)}", ["bloombee_core.cli", *argv], self.log_dir)
        self.children.append(child)
        return child

    def serve(self, model: Path | str, blocks: str, *extra: str) -> Child:
        argv = [
            "serve",
            str(model),
            "--initial-peers",
            *self.peers,
            "--blocks",
            blocks,
            "--ttl",
            "15",
            *extra,
        ]
        return self._spawn(f"server-{Path(str(model)).name}-{blocks.replace(':', '-')}", argv)

    def kill9(self, child: Child) -> None:
        """SIGKILL the server and everything it started (its DHT process and p2pd)."""
        os.killpg(child.proc.pid, signal.SIGKILL)
        child.proc.wait(10)

    def close(self) -> None:
        for child in self.children:
            child.terminate()
        for child in reversed(self.children):
            child.stop()


@pytest.fixture(scope="session")
def swarm(tmp_path_factory):
    instance = Swarm(tmp_path_factory.mktemp("swarm-logs"))
    try:
        yield instance
    finally:
        instance.close()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, make in FAMILY_CONFIGS.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(f"tiny-{name}")
        AutoModelForCausalLM.from_config(make(), dtype=torch.float32).save_pretrained(folder)
        out[name] = folder
    return out


class FamilyServers:
    """Each family's tiny model served by its uneven split. llama stays up for the whole session; the
    other families run one at a time (started on first use, stopped when the next family starts), so
    the suite never holds more than a handful of server processes."""

    def __init__(self, swarm: Swarm, models: dict[str, Path]) -> None:
        self.swarm, self.models = swarm, models
        self.running: dict[str, list[Child]] = {}

    def __getitem__(self, family: str) -> list[Child]:
        if family not in self.running:
            for other in [f for f in self.running if f != "llama"]:
                for child in self.running.pop(other):
                    child.stop()
            self.running[family] = [self.swarm.serve(self.models[family], b) for b in SPLITS[family]]
            for child in self.running[family]:
                child.wait_ready()
        return self.running[family]


@pytest.fixture(scope="session")
def family_servers(swarm, tiny_models) -> FamilyServers:
    return FamilyServers(swarm, tiny_models)


@pytest.fixture(scope="session")
def smollm2(swarm) -> Path:
    from bloombee_core.model_files import resolve_model

    return resolve_model("smollm2")


@pytest.fixture(scope="session")
def smollm2_servers(swarm, smollm2) -> list[Child]:
    children = [swarm.serve(smollm2, b) for b in SMOLLM2_SPLIT]
    for child in children:
        child.wait_ready()
    return children


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory, smollm2) -> Path:
    """A tiny random llama with SmolLM2's tokenizer: a whole `bloombee run` with it is quick."""
    folder = tmp_path_factory.mktemp("tiny-with-tokenizer")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def remote_model(swarm):
    """Distributed client models by folder, closed at the end of the session."""
    from bloombee_core.client import AutoDistributedModelForCausalLM

    models = {}

    def get(folder: Path):
        if folder not in models:
            models[folder] = AutoDistributedModelForCausalLM.from_pretrained(folder, swarm.peers)
        return models[folder]

    yield get
    for model in models.values():
        model.close()


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes(request):
    yield
    # runs after every other session fixture (the swarm, the clients) has been torn down
    for _ in range(20):  # daemons of closed clients may take a moment to exit
        leftovers = tagged_processes()
        if not leftovers:
            break
        time.sleep(0.5)
    kill_all(pid for pid, _ in leftovers)
    assert not leftovers, f"processes left behind: {leftovers}"


@pytest.fixture(scope="session")
def raw_client(swarm):
    """A bare transport in the swarm (its loop thread and itself): for requests no client would send."""
    from bloombee_hivemind import HivemindTransport

    from bloombee_core.swarm.aio import LoopThread

    loop = LoopThread("raw-client")
    transport = HivemindTransport()
    loop.run(transport.start(initial_peers=swarm.peers, client_mode=True))
    yield loop, transport
    loop.run(transport.shutdown(), timeout=20)
    loop.stop()
