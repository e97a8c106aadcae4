"""Per-link byte counts, receive-rate measurement and reports, and ``auto`` choosing per link."""

from __future__ import annotations

import asyncio

import pytest
import torch
from bloombee_compress.auto import AutoCompressor
from bloombee_compress.exponent import ZstdExponentCompressor

from bloombee_core.swarm import wire
from bloombee_core.swarm.links import MEASURE_MIN_BYTES, Link, Links
from tests.test_swarm_units import Pipe


def test_small_messages_do_not_measure_and_reports_are_sent_once_per_change():
    link = Link("peer")
    link.measured(MEASURE_MIN_BYTES - 1, 1e-3)
    assert link.receive_rate is None and link.report() == {} and not link.report_due()
    link.measured(1_000_000, 0.5)
    assert link.receive_rate == 2e6 and link.report_due()
    assert link.report() == {"rx_rate": 2e6}
    assert link.report() == {}  # unchanged: not repeated
    for seconds in (0.25, 0.25, 0.25, 10.0):  # the median of recent samples resists one outlier
        link.measured(1_000_000, seconds)
    assert link.receive_rate == 4e6


@pytest.mark.parametrize("bad", ["fast", float("nan"), float("inf"), True, 0, 1e13, [1e6]])
def test_a_bad_rate_report_is_refused_with_the_field_named(bad):
    with pytest.raises(ValueError, match="rx_rate"):
        Link("peer").heard({"rx_rate": bad})


def test_links_are_bounded_and_forgotten_least_recently_used_first(monkeypatch):
    monkeypatch.setattr("bloombee_core.swarm.links.MAX_LINKS", 3)
    links = Links()
    for peer in "abcd":
        links.get(peer).traffic.sent(10, 5)
    assert [link.peer for link in links.busiest(8)] == ["b", "c", "d"]
    assert links.total.sent_raw == 40  # the totals keep what forgotten links carried


def _send_and_read(tensors, sender_link, receiver_link, compressor):
    async def go():
        stream = Pipe().stream()
        await wire.send(stream, {"type": "step"}, tensors, compressor, sender_link)
        header, metas = await wire.read_header(stream, receiver_link)
        out = await wire.read_tensors(
            stream,
            metas,
            wire.compressor_table({"zstd-exponent": ZstdExponentCompressor()}),
            1 << 30,
            receiver_link,
        )
        return header, metas, out

    return asyncio.run(go())


def test_auto_compresses_for_a_slow_link_and_sends_raw_on_a_fast_one():
    hidden = (torch.randn(1, 256, 576) * 3).to(torch.bfloat16)  # 288 KiB, a 256-token prefill
    auto = AutoCompressor()
    for rate, compressed in ((2.5e6, True), (5e9, False)):  # 20 Mbit/s, 40 Gbit/s
        sender, receiver = Link("receiver"), Link("sender")
        sender.send_rate = rate
        header, metas, out = _send_and_read({"hidden": hidden}, sender, receiver, auto)
        assert torch.equal(out["hidden"].view(torch.int16), hidden.view(torch.int16))
        raw = hidden.numel() * 2
        assert (metas[0].nbytes < 0.75 * raw) is compressed, (rate, metas[0].nbytes)
        # the chosen codec is named on the wire: a raw message is plain "none", no tag byte
        assert metas[0].compressor == ("zstd-exponent" if compressed else "none")
        assert sender.traffic.sent_raw == receiver.traffic.received_raw == raw
        assert sender.traffic.sent_wire == receiver.traffic.received_wire == metas[0].nbytes
        assert receiver.receive_rate is not None  # 288 KiB is enough to measure


def test_the_receivers_measurement_reaches_the_sender_in_its_next_message():
    client, server = Link("server"), Link("client")
    hidden = torch.randn(1, 128, 576)  # 288 KiB of fp32
    _send_and_read({"hidden": hidden}, client, server, AutoCompressor())
    measured = server.receive_rate
    header, _, _ = _send_and_read({}, server, client, AutoCompressor())  # the server's reply
    assert header["rx_rate"] == measured and client.send_rate == measured
    assert client.encoder(AutoCompressor()).bandwidth_bytes_per_s == measured
