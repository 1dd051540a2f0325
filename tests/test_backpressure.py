"""A fast sender and a stalled reader: the server holds at most about two windows."""

from __future__ import annotations

import hashlib
import io

from twisted.internet import defer, protocol, reactor
from twisted.protocols.basic import FileSender
from twisted.trial import unittest

from .harness import SwitchboardTestMixin

TOTAL = 48 * 1024 * 1024


def stream(total: int) -> bytes:
    block = hashlib.sha256(b"nuttconch").digest() * 2048  # 64 KiB, not compressible by accident
    return (block * (total // len(block) + 1))[:total]


class FastDevice(protocol.Protocol):
    """Writes the whole stream as fast as TCP lets it, then closes."""

    def connectionMade(self) -> None:
        sender = FileSender()
        d = sender.beginFileTransfer(io.BytesIO(self.factory.data), self.transport)  # type: ignore[attr-defined]
        d.addCallback(lambda _: self.transport.loseConnection())


def server_buffered(factory: object) -> tuple[int, int]:
    """(bytes queued in channel buffers, bytes queued in TCP write buffers) on the server."""
    channels = 0
    sockets = 0
    for t in factory.transports:  # type: ignore[attr-defined]
        service = t.service
        for chan in getattr(service, "channels", {}).values():
            channels += len(chan.buf)
        tcp = t.transport
        sockets += (
            sum(len(b) for b in getattr(tcp, "_tempDataBuffer", []))
            + len(getattr(tcp, "dataBuffer", b""))
            - getattr(tcp, "offset", 0)
        )
    return channels, sockets


class SlowReaderTests(SwitchboardTestMixin, unittest.TestCase):
    """Real backpressure: the SSH window is the brake, end to end."""

    @defer.inlineCallbacks
    def test_stalled_reader_bounds_server_buffers(self) -> defer.Generator:
        """While the client stops reading, the server buffers at most about two windows;
        once it reads again, every byte arrives intact."""
        data = stream(TOTAL)
        factory = protocol.Factory.forProtocol(FastDevice)
        factory.data = data  # type: ignore[attr-defined]
        device = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(device.stopListening)
        yield self.initiator(self.key("k1"), "dev", f"9000:localhost:{device.getHost().port}")
        name = self.registry.listeners()[0].connect_name
        client = self.spawn(self.key("k2"), "reader", "-W", f"{name}:9000", stdin=None)
        yield self.waitFor(lambda: self.factory.circuitsOpened, 10, "the circuit")
        client.transport.pauseProducing()  # the reader stalls: ssh can no longer write stdout
        peak = (0, 0)
        for _ in range(40):
            yield _sleep(0.05)
            now = server_buffered(self.factory)
            peak = max(peak, now, key=sum)
        window = self.config.channel_window
        self.assertLessEqual(peak[0], 2 * window + 65536, f"channel buffers peaked at {peak}")
        self.assertLessEqual(sum(peak), 3 * window, f"server buffers peaked at {peak}")
        self.assertLess(len(client.out), TOTAL)  # it really was stalled
        client.transport.resumeProducing()
        yield self.waitFor(lambda: len(client.out) >= TOTAL, 60, "the rest of the stream")
        self.assertEqual(len(client.out), TOTAL)
        self.assertEqual(hashlib.sha256(bytes(client.out)).digest(), hashlib.sha256(data).digest())


def _sleep(seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class CongestionFairnessTests(unittest.TestCase):
    """When the socket drains, queued circuit ends take turns going first."""

    def test_resume_rotates_which_channel_flushes_first(self) -> None:
        """Under sustained congestion every circuit end gets to send, none is starved."""
        from nuttconch.connection import SwitchboardConnection

        conn = SwitchboardConnection()
        order: list[int] = []

        class End:
            def __init__(self, n: int) -> None:
                self.n = n

            def flush(self) -> None:
                order.append(self.n)
                conn.congested = True  # each flush fills the socket again

        conn.channels = {n: End(n) for n in range(3)}
        for _ in range(6):
            conn.pauseProducing()
            conn.resumeProducing()
        self.assertEqual(sorted(order), [0, 0, 1, 1, 2, 2])
        self.assertEqual(len(set(order[:3])), 3)
