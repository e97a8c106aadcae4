"""Physical floors: the least time a step can take over a chain of servers, given links and compute.

Every floor is ``hops × one-way latency + Σ compute + bytes on the critical path / bandwidth``.
With server→server push a token visits client → s1 → … → sN → client: N+1 one-way hops. When the
client mediates every hop (sends to s1, gets the answer, sends to s2, …) it costs 2N hops. Each hop
carries one hidden state (batch × tokens × hidden × bytes per element), and in the emulated network
every hop passes exactly one server's link (the proxy in front of the receiving or answering server),
so each hop pays that link's latency once and its bandwidth once.

Pure functions only: the inputs (compute times, link settings) are measured or chosen elsewhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Link:
    """One server link: a one-way delay and a bandwidth cap per direction (``None`` = uncapped)."""

    name: str
    delay_ms: float
    mbit: float | None

    @property
    def bytes_per_s(self) -> float | None:
        return None if self.mbit is None else self.mbit * 1e6 / 8


# The reference settings of shared/BENCHMARKS.md: pure framework overhead, a good link, a poor home link.
# "direct" bypasses the proxy altogether: what the proxy itself costs, next to "0ms".
LINKS: dict[str, Link] = {
    "direct": Link("direct", 0.0, None),
    "0ms": Link("0ms", 0.0, None),
    "20ms": Link("20ms", 20.0, 100.0),
    "50ms": Link("50ms", 50.0, 20.0),
}

DEFAULT_LINKS = ("0ms", "20ms", "50ms")


def parse_link(name: str) -> Link:
    if name not in LINKS:
        raise ValueError(f"unknown link setting {name!r}; choose one of {sorted(LINKS)}")
    return LINKS[name]


@dataclass(frozen=True)
class Floor:
    """A floor and its parts, all in seconds, so a report can say where the time must go."""

    hops: int
    latency_s: float
    compute_s: float
    transfer_s: float

    @property
    def total_s(self) -> float:
        return self.latency_s + self.compute_s + self.transfer_s

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total_s": self.total_s}


def hop_count(servers: int, push: bool = True) -> int:
    """One-way hops of one step: N+1 with server→server push, 2N when the client mediates each hop."""
    if servers < 1:
        raise ValueError(f"a chain needs at least one server, got {servers}")
    return servers + 1 if push else 2 * servers


def hidden_bytes(batch: int, tokens: int, hidden_size: int, itemsize: int) -> int:
    """Bytes of one hidden state on the wire (uncompressed payload; framing headers are negligible)."""
    for label, value in (
        ("batch", batch),
        ("tokens", tokens),
        ("hidden_size", hidden_size),
        ("itemsize", itemsize),
    ):
        if value < 1:
            raise ValueError(f"{label} must be at least 1, got {value}")
    return batch * tokens * hidden_size * itemsize


def step_floor(servers: int, link: Link, compute_s: float, payload_bytes: int, push: bool = True) -> Floor:
    """Floor of one forward step through the whole chain.

    ``compute_s`` is Σ compute of the step measured locally on the same blocks (plus the client's
    embeddings and head), ``payload_bytes`` the hidden state one hop carries.
    """
    if compute_s < 0:
        raise ValueError(f"compute time cannot be negative, got {compute_s}")
    hops = hop_count(servers, push)
    latency = hops * link.delay_ms / 1000
    rate = link.bytes_per_s
    transfer = 0.0 if rate is None else hops * payload_bytes / rate
    return Floor(hops=hops, latency_s=latency, compute_s=compute_s, transfer_s=transfer)


def decode_floor(
    servers: int,
    link: Link,
    compute_s: float,
    hidden_size: int,
    itemsize: int,
    batch: int = 1,
    push: bool = True,
) -> Floor:
    """Floor of one decode step (one new token per sequence)."""
    return step_floor(servers, link, compute_s, hidden_bytes(batch, 1, hidden_size, itemsize), push)


def prefill_floor(
    servers: int,
    link: Link,
    compute_s: float,
    prompt_tokens: int,
    hidden_size: int,
    itemsize: int,
    batch: int = 1,
    push: bool = True,
) -> Floor:
    """Floor of a prompt's prefill (time to the first new token)."""
    return step_floor(
        servers, link, compute_s, hidden_bytes(batch, prompt_tokens, hidden_size, itemsize), push
    )


def pipeline_bubble(stages: int, micro_batches: int) -> float:
    """Idle fraction of an N-stage pipeline fed m micro-batches: (N−1)/(m+N−1)."""
    if stages < 1 or micro_batches < 1:
        raise ValueError(f"stages and micro_batches must be at least 1, got {stages} and {micro_batches}")
    return (stages - 1) / (micro_batches + stages - 1)


def speculative_tokens_per_round(acceptance: float, drafts: int) -> float:
    """Expected tokens per round trip with k drafts accepted with probability a each: (1−a^(k+1))/(1−a)."""
    if not 0 <= acceptance <= 1:
        raise ValueError(f"acceptance must lie in [0, 1], got {acceptance}")
    if acceptance == 1:
        return float(drafts + 1)
    return (1 - acceptance ** (drafts + 1)) / (1 - acceptance)
