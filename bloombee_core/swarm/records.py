"""DHT records: what a server announces, under which keys, and how a client reads the swarm's state.

Keys (values expire; servers refresh them every ``ttl / 3`` seconds):

* ``bloombee.models`` — subkey: model key; value: ``{"name", "family", "num_blocks"}`` (for ``status``).
* ``<model key>.block.<i>`` — subkey: server peer id; value: a :class:`ServerRecord` as a map.

The model key is the family's model type plus a hash of the checkpoint's config and a fingerprint of its
weights (:func:`weights_fingerprint`), so servers and clients that loaded the same checkpoint meet under
the same keys wherever the files live on their disks, and checkpoints that share a config do not.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bloombee_core.transport import Transport

if TYPE_CHECKING:
    from transformers import PretrainedConfig

MODELS_KEY = "bloombee.models"
# config keys that differ between copies of one model (where it was saved, by which version, in what dtype)
_VOLATILE = {"transformers_version", "dtype", "torch_dtype", "_name_or_path", "_commit_hash", "architectures"}


def model_key(config: PretrainedConfig, folder: str | Path | None = None) -> str:
    """``<model_type>-<hash>`` of the config and, given the checkpoint folder, a fingerprint of its
    weights: two checkpoints with one config but different weights must never meet under one key."""
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE and not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode())
    if folder is not None:
        digest.update(weights_fingerprint(folder).encode())
    return f"{config.model_type}-{digest.hexdigest()[:12]}"


def public_model_name(path: str | Path) -> str:
    """What a server publishes as its model's name: a hub id as given, but of a local folder or file
    only its last part (a record is public: it must not show where a server keeps its files)."""
    local = Path(path).expanduser()
    return local.name if local.is_absolute() or local.exists() else str(path)


FINGERPRINT_SAMPLES = 16  # blocks of tensor data read per file
FINGERPRINT_BLOCK = 4096


def weights_fingerprint(folder: str | Path) -> str:
    """A cheap hash of a checkpoint's weights: each safetensors file's name, size and header (tensor
    names, dtypes, shapes, offsets), plus 16 blocks of 4 KiB of tensor data spread evenly over the file.

    Reads about 64 KiB per file, whatever the model's size. Two different trainings or fine-tunes differ
    in (almost) every block; a change confined to bytes between the samples would go unseen.
    """
    digest = hashlib.sha256()
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder} to fingerprint")
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}:".encode())
        with file.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len <= min(size - 8, 100 << 20):
                raise ValueError(f"{file} is not a safetensors file (header length {header_len})")
            digest.update(f.read(header_len))
            data_start, data_len = 8 + header_len, size - 8 - header_len
            for i in range(FINGERPRINT_SAMPLES):
                f.seek(data_start + data_len * i // FINGERPRINT_SAMPLES)
                digest.update(f.read(FINGERPRINT_BLOCK))
    return digest.hexdigest()


MEMORY_FIELDS = 8


def block_key(model: str, index: int) -> str:
    return f"{model}.block.{index}"


@dataclass
class ServerRecord:
    """What one server announces for each block it hosts."""

    peer: str
    start: int
    end: int
    throughput: float  # tokens per second through the whole span, measured at start
    cache_left: int  # bytes of KV-cache budget not yet promised to sessions
    dtype: str
    family: str
    version: str
    public_name: str = ""
    state: str = "online"  # "online" | "offline" (announced on a clean shutdown)
    addrs: list[str] = field(default_factory=list)
    movable: bool = False  # chose its blocks itself and may move (see bloombee_core.swarm.placement)
    row_cost: float | None = None  # a decode step's extra cost per extra row, as a fraction of 1 row
    # tensor bytes since start: [sent raw, sent on the wire, received raw, received on the wire], in total
    # and for its busiest links ([peer, the same four]); see bloombee_core.swarm.links
    traffic: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    links: list[list[Any]] = field(default_factory=list)
    # where it keeps the span: [weight bytes on the device, in CPU memory, on disk, KV-cache layers on the
    # device, in CPU memory, on disk, memory budget (0: none), peak memory used]; see bloombee_core.offload
    memory: list[int] = field(default_factory=lambda: [0] * MEMORY_FIELDS)

    def to_value(self) -> dict[str, Any]:
        value = asdict(self)
        value.pop("peer")
        return value

    @classmethod
    def from_value(cls, peer: str, value: Any) -> ServerRecord | None:
        """Parse a record from the DHT; anything malformed (another version, a bad peer) is ignored."""
        if not isinstance(value, dict):
            return None
        try:
            record = cls(
                peer=peer,
                start=int(value["start"]),
                end=int(value["end"]),
                throughput=float(value["throughput"]),
                cache_left=int(value["cache_left"]),
                dtype=str(value["dtype"]),
                family=str(value["family"]),
                version=str(value["version"]),
                public_name=str(value.get("public_name", "")),
                state=str(value.get("state", "online")),
                addrs=[str(a) for a in value.get("addrs", [])][:8],
                movable=value.get("movable") is True,
                row_cost=_row_cost(value.get("row_cost")),
                traffic=_counts(value.get("traffic")) or [0, 0, 0, 0],
                links=_links(value.get("links")),
                memory=_counts(value.get("memory"), MEMORY_FIELDS) or [0] * MEMORY_FIELDS,
            )
        except (KeyError, TypeError, ValueError):
            return None
        return record if 0 <= record.start < record.end else None


def _row_cost(value: Any) -> float | None:
    """An announced row cost, or None where it is missing or not a finite number in [0, 10]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0 <= value <= 10 else None  # NaN fails both comparisons


def _counts(value: Any, length: int = 4) -> list[int] | None:
    """``length`` counts, or None where the value is not a list of that many non-negative integers."""
    if not isinstance(value, list) or len(value) != length:
        return None
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value):
        return None
    return list(value)


def _links(value: Any) -> list[list[Any]]:
    """Announced per-link counts ``[[peer, four counts], ...]`` (at most 8); malformed entries dropped."""
    if not isinstance(value, list):
        return []
    out = []
    for item in value[:8]:
        if isinstance(item, list) and len(item) == 5 and isinstance(item[0], str):
            counts = _counts(item[1:])
            if counts is not None:
                out.append([item[0][:64], *counts])
    return out


async def announce(
    transport: Transport,
    model: str,
    record: ServerRecord,
    ttl: float,
    model_info: dict[str, Any],
) -> bool:
    """Store ``record`` under every block of its span (and the model under the models key)."""
    expiration = transport.now() + ttl
    value = record.to_value()
    stores = [transport.store(MODELS_KEY, model, model_info, expiration)]
    for index in range(record.start, record.end):
        stores.append(transport.store(block_key(model, index), record.peer, value, expiration))
    return all(await asyncio.gather(*stores))


async def withdraw(
    transport: Transport, model: str, record: ServerRecord, blocks: Iterable[int], ttl: float
) -> bool:
    """Mark ``record``'s peer offline under ``blocks`` (blocks it no longer hosts).

    A DHT keeps, per subkey, the value that expires last, so the offline mark must outlive the online
    record it replaces: it expires ``ttl`` from now, later than any announcement made before.
    """
    expiration = transport.now() + ttl
    value = replace(record, state="offline").to_value()
    stores = [transport.store(block_key(model, i), record.peer, value, expiration) for i in blocks]
    return all(await asyncio.gather(*stores))


async def fetch_servers(transport: Transport, model: str, num_blocks: int) -> dict[str, ServerRecord]:
    """Online servers of ``model`` by peer id. A record counts if one of its block keys has it; where a
    peer has several (it moved, and a key of its old span still holds the old record), the one announced
    last wins."""
    found = await transport.get_many([block_key(model, i) for i in range(num_blocks)])
    servers: dict[str, ServerRecord] = {}
    announced: dict[str, float] = {}
    for index, entries in enumerate(found.values()):
        for peer, item in entries.items():
            record = ServerRecord.from_value(peer, item.value)
            if record is None or record.state != "online" or not record.start <= index < record.end:
                continue
            if record.end > num_blocks:
                continue
            if item.expiration > announced.get(peer, float("-inf")):
                servers[peer], announced[peer] = record, item.expiration
    return servers


async def fetch_models(transport: Transport) -> dict[str, dict[str, Any]]:
    found = await transport.get_many([MODELS_KEY])
    out = {}
    for key, item in found[MODELS_KEY].items():
        value = item.value
        if (
            isinstance(value, dict)
            and isinstance(value.get("num_blocks"), int)
            and 0 < value["num_blocks"] < 10_000
        ):
            out[key] = value
    return out


def coverage(servers: Sequence[ServerRecord], num_blocks: int) -> list[int]:
    """How many servers host each block."""
    counts = [0] * num_blocks
    for record in servers:
        for index in range(max(record.start, 0), min(record.end, num_blocks)):
            counts[index] += 1
    return counts
