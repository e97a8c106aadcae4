"""What a peer knows about each of its links: bytes sent and received (raw and on the wire) and how fast
the other side receives what it sends, so that ``auto`` compression can decide per message.

Bandwidth is measured where it can be: at the receiver. A sender's writes return as soon as the local
daemon (``p2pd``) has buffered them, but a receiver sees the payload frames of one message arrive at the
link's pace (the sender encodes every payload before it writes the header). For each message of at
least :data:`MEASURE_MIN_BYTES` on the wire the receiver takes ``wire bytes / seconds`` from the end of
the header to the end of the last frame, keeps the median of its last few samples, and reports it to
the sender in the header of its next message to it (``rx_rate``, bytes per second). Until a sender has
heard a report it uses the compressor's own default estimate.

Both directions are measured separately (home links are often asymmetric): what a server reports is
the client-to-server rate, what the client reports is the server-to-client rate, and a server
receiving pushes reports to the pushing server on the push stream.
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bloombee_core.compression import Compressor

MEASURE_MIN_BYTES = 64 * 1024  # smaller messages are dominated by latency jitter, not bandwidth
SAMPLES = 5
MIN_RATE, MAX_RATE = 1e3, 1e12  # bytes/s a peer may report (1 kB/s .. 1 TB/s)
MAX_LINKS = 1024  # peers remembered; the least recently used ones are forgotten first
RATE_KEY = "rx_rate"


class LinkReportError(ValueError):
    """A peer's ``rx_rate`` is not a number of bytes per second in the accepted range."""


@dataclass
class Traffic:
    """Bytes of tensor payloads sent and received: raw (their in-memory size) and on the wire."""

    sent_raw: int = 0
    sent_wire: int = 0
    received_raw: int = 0
    received_wire: int = 0
    parent: Traffic | None = field(default=None, repr=False)  # also counted there (a session's link)

    def sent(self, raw: int, wire: int) -> None:
        self.sent_raw += raw
        self.sent_wire += wire
        if self.parent is not None:
            self.parent.sent(raw, wire)

    def received(self, raw: int, wire: int) -> None:
        self.received_raw += raw
        self.received_wire += wire
        if self.parent is not None:
            self.parent.received(raw, wire)

    def as_dict(self) -> dict[str, int]:
        return {
            "sent_raw": self.sent_raw,
            "sent_wire": self.sent_wire,
            "received_raw": self.received_raw,
            "received_wire": self.received_wire,
        }


class Link:
    """This peer's link to one other peer (see the module docstring)."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.traffic = Traffic()
        self.send_rate: float | None = None  # bytes/s the peer reports receiving from us
        self._samples: deque[float] = deque(maxlen=SAMPLES)  # bytes/s we measured receiving from it
        self._reported: float | None = None  # the last rate we told the peer

    @property
    def receive_rate(self) -> float | None:
        return statistics.median(self._samples) if self._samples else None

    def measured(self, wire_bytes: int, seconds: float) -> None:
        """One received message of ``wire_bytes`` took ``seconds`` from header to last payload byte."""
        if wire_bytes >= MEASURE_MIN_BYTES and seconds > 0:
            self._samples.append(min(max(wire_bytes / seconds, MIN_RATE), MAX_RATE))

    def report_due(self) -> bool:
        """Whether our measured receive rate changed since we last reported it."""
        rate = self.receive_rate
        return rate is not None and rate != self._reported

    def report(self) -> dict[str, float]:
        """Header fields for our next message to the peer: our measured receive rate, once per change."""
        rate = self.receive_rate
        if rate is None or rate == self._reported:
            return {}
        self._reported = rate
        return {RATE_KEY: rate}

    def heard(self, header: dict[str, Any]) -> None:
        """Take the peer's report from a header it sent.

        :raises LinkReportError: ``rx_rate`` is there but not a finite number in [1e3, 1e12].
        """
        if RATE_KEY not in header:
            return
        rate = header[RATE_KEY]
        if (
            not isinstance(rate, int | float)
            or isinstance(rate, bool)
            or not math.isfinite(rate)
            or not MIN_RATE <= rate <= MAX_RATE
        ):
            raise LinkReportError(
                f"header field {RATE_KEY!r} must be a receive rate in bytes/s between {MIN_RATE:g} and "
                f"{MAX_RATE:g}, got {rate!r:.40}"
            )
        self.send_rate = float(rate)

    def encoder(self, compressor: Compressor) -> Compressor:
        """``compressor`` adapted to this link's measured speed (``auto`` decides with it)."""
        return compressor.for_link(self.send_rate)

    def as_dict(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            **self.traffic.as_dict(),
            "send_rate": self.send_rate,
            "receive_rate": self.receive_rate,
        }


class SessionLink:
    """A session's view of a :class:`Link`: the link's estimate, with the session's own byte counts
    (which also count on the link)."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.peer = link.peer
        self.traffic = Traffic(parent=link.traffic)

    def measured(self, wire_bytes: int, seconds: float) -> None:
        self.link.measured(wire_bytes, seconds)

    def report(self) -> dict[str, float]:
        return self.link.report()

    def heard(self, header: dict[str, Any]) -> None:
        self.link.heard(header)

    def encoder(self, compressor: Compressor) -> Compressor:
        return self.link.encoder(compressor)


class Links:
    """A peer's links, by the other peer's id (at most :data:`MAX_LINKS`, least recently used dropped)."""

    def __init__(self) -> None:
        self._links: OrderedDict[str, Link] = OrderedDict()
        self.total = Traffic()  # every link's bytes, including forgotten links'

    def get(self, peer: str) -> Link:
        link = self._links.get(peer)
        if link is None:
            link = self._links[peer] = Link(peer)
            link.traffic.parent = self.total
            while len(self._links) > MAX_LINKS:
                self._links.popitem(last=False)
        else:
            self._links.move_to_end(peer)
        return link

    def session(self, peer: str) -> SessionLink:
        return SessionLink(self.get(peer))

    def busiest(self, count: int) -> list[Link]:
        """The ``count`` links that carried the most wire bytes."""
        key = lambda link: link.traffic.sent_wire + link.traffic.received_wire  # noqa: E731
        return sorted(self._links.values(), key=key, reverse=True)[:count]

    def as_dict(self, count: int = 16) -> dict[str, Any]:
        return {"total": self.total.as_dict(), "links": [link.as_dict() for link in self.busiest(count)]}


LinkLike = Link | SessionLink
