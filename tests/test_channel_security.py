"""Issue 15 and issue 14 points 2, 5, 6, 7 and 9: attacks on channels and circuits.

Each test performs the attack against an in-process server with a hostile
raw client (``rawssh.connect_client``), a raw initiator that answers the
server's ``forwarded-tcpip`` opens by hand, or paramiko, and asserts on what
a user or operator sees: the connection and its other circuits survive,
window granted, bytes buffered, refusal texts and log lines.

With ``NUTT_FIGURES=1`` in the environment the tests print the figures that
the security notes quote.
"""

from __future__ import annotations

import gc
import hashlib
import os
import struct
import threading
import time
from typing import Any

from twisted.conch.ssh import channel, common
from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from nuttconch import circuit as circuitmod
from nuttconch.connection import MIN_MAX_PACKET, READ_PAUSE_BUFFERED

from . import rawssh
from .rawssh import NS, direct_tcpip, open_failure_code
from .test_threats import DISCONNECT_PROTOCOL_ERROR, OPEN_PROHIBITED, ThreatMixin

FIGURES = bool(os.environ.get("NUTT_FIGURES"))


def figure(text: str) -> None:
    """Print a measured figure when asked to (NUTT_FIGURES=1)."""
    if FIGURES:
        print(f"\nFIGURE: {text}")


def failure_text(payload: bytes) -> bytes:
    """The description of a CHANNEL_OPEN_FAILURE payload."""
    return common.getNS(payload[8:])[0]


def server_channel_buffers(factory: Any) -> int:
    """Bytes queued in the server's circuit-end buffers, all connections."""
    total = 0
    for t in factory.transports:
        for chan in getattr(getattr(t, "service", None), "channels", {}).values():
            total += len(chan.buf)
    return total


def tcp_buffered(tcp: Any) -> int:
    """Bytes in one Twisted TCP transport's write buffer."""
    return (
        len(getattr(tcp, "dataBuffer", b""))
        - getattr(tcp, "offset", 0)
        + sum(len(x) for x in getattr(tcp, "_tempDataBuffer", []))
    )


def drain(inbox: rawssh.Inbox, num: int, chan: int) -> list[bytes]:
    """Take every recorded message ``num`` for channel ``chan`` out of the inbox."""
    taken = [p for n, p in inbox.messages if n == num and struct.unpack(">L", p[:4])[0] == chan]
    inbox.messages = [
        (n, p)
        for n, p in inbox.messages
        if not (n == num and struct.unpack(">L", p[:4])[0] == chan)
    ]
    return taken


def rss_kib() -> int:
    """This process's resident set (server and test clients together), KiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pause(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


class RawCircuit:
    """A circuit between a raw client and a raw initiator, both driven by the test.

    ``client``/``init`` are the Conch client transports; ``cid`` is the client's own
    channel id and ``cremote`` the server's id for it; ``iid``/``iremote`` the same on
    the initiator's side; ``cwindow``/``iwindow`` the windows the server granted.
    """

    client: rawssh.ClientTransport
    init: rawssh.ClientTransport
    cid: int
    cremote: int
    cwindow: int
    cmax: int
    iid: int
    iremote: int
    iwindow: int
    imax: int


class ChannelMixin(ThreatMixin):
    _nextInitId = 500

    @defer.inlineCallbacks
    def rawInitiator(self, name: str = "sink", port: int = 80) -> Any:
        """A raw initiator holding ``port``; returns (transport, connect name)."""
        init = yield self.authed('access="initiate"', name=name)
        num, _ = yield init.conn.globalRequest(b"tcpip-forward", NS(b"") + struct.pack(">L", port))
        self.assertEqual(num, 81)
        listener = next(x for x in self.registry.listeners() if x.hostname == name)
        return init, listener.connect_name.encode()

    @defer.inlineCallbacks
    def rawCircuit(
        self,
        client: rawssh.ClientTransport,
        init: rawssh.ClientTransport,
        name: bytes,
        port: int = 80,
        *,
        clientWindow: int = 65536,
        clientMax: int = 32768,
        initWindow: int = 65536,
        initMax: int = 32768,
    ) -> Any:
        """Open a circuit; fires with a RawCircuit, or with the client's OPEN_FAILURE
        payload if the server refused it."""
        rc = RawCircuit()
        rc.client, rc.init = client, init
        rc.cid = client.conn.openRaw(  # type: ignore[assignment]
            b"direct-tcpip",
            direct_tcpip(name, port),
            window=clientWindow,
            maxPacket=clientMax,
            wait=False,
        )
        _, openPayload = yield init.inbox.expect(90)
        _, rest = common.getNS(openPayload)
        rc.iremote, rc.iwindow, rc.imax = struct.unpack(">3L", rest[:12])
        rc.iid = ChannelMixin._nextInitId
        ChannelMixin._nextInitId += 1
        init.sendPacket(91, struct.pack(">4L", rc.iremote, rc.iid, initWindow, initMax))
        num, payload = yield client.inbox.expect((91, 92), channel=rc.cid)
        if num == 92:
            return payload
        rc.cremote, rc.cwindow, rc.cmax = struct.unpack(">3L", payload[4:16])
        return rc

    def serverConn(self, client: rawssh.ClientTransport) -> Any:
        return self.serverTransport(client).service


# ---------------------------------------------------------------------------
# Issue 15: late messages for a channel that has just closed
# ---------------------------------------------------------------------------


class _Download(channel.SSHChannel):
    """A client's ``direct-tcpip`` channel that keeps what arrives; closes early if told."""

    name = b"direct-tcpip"

    def __init__(self, closeAfter: int | None, **kw: Any) -> None:
        super().__init__(localWindow=256 * 1024, localMaxPacket=32768, **kw)
        self.closeAfter = closeAfter
        self.data = bytearray()
        self.done: defer.Deferred[_Download] = defer.Deferred()
        self.failed: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.closeAfter is not None and len(self.data) >= self.closeAfter and not self.closing:
            self.loseConnection()

    def eofReceived(self) -> None:
        pass

    def openFailed(self, reason: Any) -> None:
        self.failed = reason
        if not self.done.called:
            self.done.callback(self)

    def closed(self) -> None:
        if not self.done.called:
            self.done.callback(self)


class LateMessageTests(ChannelMixin, unittest.TestCase):
    """Issue 15."""

    @defer.inlineCallbacks
    def test_late_messages_after_close_are_ignored(self) -> Any:
        """Every channel message for an id that closed both ways is dropped: the connection
        and its other circuit live on; an id never allocated is still a protocol error."""
        _, listener = yield self.echoInitiator(tag=b"")
        name = listener.connect_name.encode()
        c = yield self.authed('access="listen"')
        serverConn = self.serverConn(c)
        circuits = []
        for _ in range(2):
            num, payload = yield c.conn.openRaw(b"direct-tcpip", direct_tcpip(name, 7100))
            self.assertEqual(num, 91)
            circuits.append(struct.unpack(">2L", payload[:8]))
        (aId, aRemote), (bId, bRemote) = circuits
        # Close A and wait for the server's CLOSE: A is now closed both ways.
        c.sendPacket(97, struct.pack(">L", aRemote))
        yield c.inbox.expect(97, channel=aId)
        yield self.waitFor(lambda: aRemote not in serverConn.channels, what="A gone")
        late = [
            (93, struct.pack(">2L", aRemote, 4096)),
            (94, struct.pack(">L", aRemote) + NS(b"late data")),
            (95, struct.pack(">2L", aRemote, 1) + NS(b"late stderr")),
            (96, struct.pack(">L", aRemote)),
            (97, struct.pack(">L", aRemote)),
            (98, struct.pack(">L", aRemote) + NS(b"exit-status") + b"\x01" + b"\0\0\0\0"),
            (99, struct.pack(">L", aRemote)),
            (100, struct.pack(">L", aRemote)),
        ]
        for num, body in late:
            c.sendPacket(num, body)
        # The other circuit still carries data both ways.
        c.sendPacket(94, struct.pack(">L", bRemote) + NS(b"still here"))
        got = b""
        while len(got) < len(b"still here"):
            _, payload = yield c.inbox.expect(94, channel=bId)
            got += common.getNS(payload[4:])[0]
        self.assertEqual(got, b"still here")
        self.assertFalse(c.isLost)
        self.assertEqual(serverConn.lateMessages, len(late))
        # An id the server never allocated is still a protocol error.
        c.sendPacket(93, struct.pack(">2L", serverConn.localChannelID + 10, 1))
        yield c.waitLost()
        self.assertEqual(c.disconnect[0], DISCONNECT_PROTOCOL_ERROR)
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_paramiko_initiator_with_early_closing_clients(self) -> Any:
        """A paramiko initiator (which sends DATA built before it saw our CLOSE) serves 150
        circuits, half of whose clients close early: its connection survives and every
        complete download arrives intact (SHA-256)."""
        import paramiko

        keyPath = self.key("pinit", options='access="initiate"')
        payload = os.urandom(256 * 1024)
        errors: list[BaseException] = []
        workers: list[threading.Thread] = []

        def serve(chan: Any) -> None:
            try:
                chan.sendall(payload)
                chan.shutdown_write()
                chan.close()
            except (OSError, EOFError, paramiko.SSHException):
                pass  # the client closed early
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        def handler(chan: Any, origin: Any, server: Any) -> None:
            worker = threading.Thread(target=serve, args=(chan,), daemon=True)
            workers.append(worker)
            worker.start()

        def connect() -> Any:
            pkey = paramiko.Ed25519Key.from_private_key_file(keyPath)
            t = paramiko.Transport(("127.0.0.1", self.port))
            t.connect(username="pinit", pkey=pkey)
            t.request_port_forward("", 7300, handler=handler)
            return t

        pt = yield threads.deferToThread(connect)
        self.addCleanup(lambda: threads.deferToThread(pt.close))
        listener = yield self.waitPort(7300)
        name = listener.connect_name.encode()
        initiatorConn = listener.opener.conn
        c = yield self.authed('access="listen"')
        digest = hashlib.sha256(payload).hexdigest()
        complete = early = 0
        bad: list[str] = []
        started = time.monotonic()
        for wave in range(15):
            downloads = []
            for i in range(10):
                chan = _Download(closeAfter=1 if i % 2 else None)
                c.conn.openChannel(chan, direct_tcpip(name, 7300))
                downloads.append(chan)
            results = yield defer.gatherResults([d.done for d in downloads]).addTimeout(60, reactor)
            for chan in results:
                if chan.failed is not None:
                    bad.append(f"wave {wave}: open failed {chan.failed.value}")
                elif chan.closeAfter is None:
                    got = hashlib.sha256(chan.data).hexdigest()
                    if got != digest:
                        bad.append(f"wave {wave}: {len(chan.data)} of {len(payload)} bytes")
                    complete += 1
                else:
                    early += 1
        figure(
            f"paramiko initiator, 150 circuits: {complete} complete, {early} early,"
            f" {len(bad)} bad, late messages ignored {getattr(initiatorConn, 'lateMessages', '-')},"
            f" {time.monotonic() - started:.1f}s"
        )
        self.assertEqual(bad, [])
        self.assertEqual((complete, early), (75, 75))
        self.assertTrue(pt.is_active())
        self.assertFalse(initiatorConn.stopped)
        self.assertEqual(errors, [])
        self.assertFalse(c.isLost)
        yield self.assertServing()


# ---------------------------------------------------------------------------
# 14.2: extended data must not refill a circuit's window
# ---------------------------------------------------------------------------


class ExtendedDataTests(ChannelMixin, unittest.TestCase):
    """Issue 14 point 2."""

    @defer.inlineCallbacks
    def pushWithExtendedData(
        self, sender: rawssh.ClientTransport, remote: int, local: int, window: int, maxPacket: int
    ) -> Any:
        """Fill the granted window but one byte with data, add one byte of extended data,
        take whatever window comes back, four times; returns how many bytes went in."""
        pushed = 0
        chunk = b"x" * maxPacket
        for _ in range(4):
            while window > 1:
                size = min(window - 1, maxPacket)
                sender.sendPacket(94, struct.pack(">L", remote) + NS(chunk[:size]))
                window -= size
                pushed += size
            if window:
                sender.sendPacket(95, struct.pack(">2L", remote, 1) + NS(b"!"))
                window -= 1
            yield pause(0.3)
            for adjust in drain(sender.inbox, 93, local):
                window += struct.unpack(">L", adjust[4:8])[0]
            self.assertFalse(sender.isLost)
        return pushed

    @defer.inlineCallbacks
    def checkExtendedDataWindow(self, fromClient: bool) -> Any:
        """Push data and extended data from one side of a circuit whose far end does not
        read: it gets back no more window than the far end took plus the extended bytes,
        and the server holds at most one window."""
        init, name = yield self.rawInitiator()
        c = yield self.authed('access="listen"')
        # The far end (the one not pushing) gets the small window.
        small = {"initWindow" if fromClient else "clientWindow": 65536}
        rc = yield self.rawCircuit(c, init, name, **small)
        self.assertIsInstance(rc, RawCircuit)
        if fromClient:
            label, sender = "client->initiator", c
            remote, local, window, maxPacket = rc.cremote, rc.cid, rc.cwindow, rc.cmax
        else:
            label, sender = "initiator->client", init
            remote, local, window, maxPacket = rc.iremote, rc.iid, rc.iwindow, rc.imax
        rss = rss_kib()
        pushed = yield self.pushWithExtendedData(sender, remote, local, window, maxPacket)
        held = server_channel_buffers(self.factory)
        figure(
            f"14.2 {label}: window {window}, pushed {pushed}, held {held},"
            f" process RSS {rss_kib() - rss:+d} KiB"
        )
        self.assertLessEqual(pushed, window + 65536 + 4)
        self.assertLessEqual(held, window)
        yield self.assertServing()

    def test_client_extended_data_does_not_refill_window(self) -> Any:
        """A client pushing into an initiator that does not read gets back no more window
        than the initiator took plus the extended bytes: at most one window is held."""
        return self.checkExtendedDataWindow(fromClient=True)

    def test_initiator_extended_data_does_not_refill_window(self) -> Any:
        """The same from the initiator's side, toward a client that does not read."""
        return self.checkExtendedDataWindow(fromClient=False)

    @defer.inlineCallbacks
    def test_extended_data_past_window_is_a_protocol_error(self) -> Any:
        """Extended data larger than the circuit end's packet size is refused as data is."""
        init, name = yield self.rawInitiator()
        c = yield self.authed('access="listen"')
        rc = yield self.rawCircuit(c, init, name)
        c.sendPacket(95, struct.pack(">2L", rc.cremote, 1) + NS(b"x" * (rc.cmax + 1)))
        yield c.waitLost()
        self.assertEqual(c.disconnect[0], DISCONNECT_PROTOCOL_ERROR)
        self.assertFalse(init.isLost)


# ---------------------------------------------------------------------------
# 14.5 and 14.7: tiny maximum packet sizes
# ---------------------------------------------------------------------------


class _FakeTransport:
    """Counts CHANNEL_DATA packets; says the socket is full after ``fullAfter``."""

    def __init__(self, conn: Any, fullAfter: int) -> None:
        self.conn = conn
        self.fullAfter = fullAfter
        self.packets: list[int] = []

    def sendChannelData(self, remote: int, data: Any) -> None:
        self.packets.append(len(data))
        if len(self.packets) >= self.fullAfter:
            self.conn.congested = True


class _FakeConn:
    def __init__(self) -> None:
        self.congested = False
        self.channelsToRemoteChannel: dict[Any, int] = {}
        self.transport = _FakeTransport(self, 3)


class MaxPacketTests(ChannelMixin, unittest.TestCase):
    """Issue 14 points 5 and 7."""

    @defer.inlineCallbacks
    def test_tiny_max_packet_on_open_refused(self) -> Any:
        """direct-tcpip (or any open) with a maximum packet under the minimum is refused
        with a reason that says so; the minimum itself is accepted."""
        _, listener = yield self.echoInitiator(tag=b"")
        name = listener.connect_name.encode()
        c = yield self.authed('access="listen"')
        for size in (1, MIN_MAX_PACKET - 1):
            num, payload = yield c.conn.openRaw(
                b"direct-tcpip", direct_tcpip(name, 7100), maxPacket=size
            )
            self.assertEqual((num, open_failure_code(payload)), (92, OPEN_PROHIBITED))
            self.assertIn(b"maximum packet size %d is too small" % size, failure_text(payload))
        num, payload = yield c.conn.openRaw(
            b"direct-tcpip", direct_tcpip(name, 7100), maxPacket=MIN_MAX_PACKET
        )
        self.assertEqual(num, 91)
        self.assertFalse(c.isLost)
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_tiny_max_packet_confirmation_refused(self) -> Any:
        """An initiator confirming forwarded-tcpip with max packet 0 or 1: the client's open
        fails with the reason, the initiator's channel is closed, both connections and the
        client's other circuit survive (14.7: max packet 0 used to drop the client)."""
        init, name = yield self.rawInitiator()
        c = yield self.authed('access="listen"')
        good = yield self.rawCircuit(c, init, name)
        self.assertIsInstance(good, RawCircuit)
        for size in (0, 1):
            result = yield self.rawCircuit(c, init, name, initMax=size)
            if isinstance(result, RawCircuit):
                # Before the fix: confirmed; the client's first byte breaks its connection.
                c.sendPacket(94, struct.pack(">L", result.cremote) + NS(b"x" * 100))
                yield pause(0.3)
                self.assertFalse(c.isLost, f"max packet {size}: client connection dropped")
                self.fail(f"max packet {size}: circuit was confirmed")
            self.assertIn(b"maximum packet size %d is too small" % size, failure_text(result))
            _, closing = yield init.inbox.expect(97)
            self.assertEqual(struct.unpack(">L", closing[:4])[0], ChannelMixin._nextInitId - 1)
        # The other circuit still relays, the initiator sees the bytes.
        c.sendPacket(94, struct.pack(">L", good.cremote) + NS(b"fine"))
        _, data = yield init.inbox.expect(94, channel=good.iid)
        self.assertEqual(common.getNS(data[4:])[0], b"fine")
        self.assertFalse(c.isLost or init.isLost)
        yield self.assertServing()

    def test_one_send_stops_when_the_socket_is_full(self) -> None:
        """A 1 MiB write into a 4 GiB window at the minimum packet size seals packets only
        until the socket reports congestion; the rest waits in the buffer."""
        conn = _FakeConn()
        end = circuitmod.ClientEnd(
            localWindow=65536,
            localMaxPacket=32768,
            remoteWindow=0xFFFFFFFF,
            remoteMaxPacket=MIN_MAX_PACKET,
            conn=conn,
        )
        conn.channelsToRemoteChannel[end] = 7
        data = b"y" * (1024 * 1024)
        end.write(data)
        self.assertEqual(conn.transport.packets, [MIN_MAX_PACKET] * 3)
        self.assertEqual(len(end.buf), len(data) - 3 * MIN_MAX_PACKET)
        self.assertEqual(end.remoteWindowLeft, 0xFFFFFFFF - 3 * MIN_MAX_PACKET)
        # The socket drains: the next flush goes on where the last one stopped.
        conn.congested = False
        conn.transport.fullAfter = 6
        end.flush()
        self.assertEqual(len(conn.transport.packets), 6)
        self.assertEqual(len(end.buf), len(data) - 6 * MIN_MAX_PACKET)

    @defer.inlineCallbacks
    def test_error_on_one_end_stays_on_its_circuit(self) -> Any:
        """An exception while passing bytes to the other end closes that circuit only: the
        sending connection and its other circuits live on."""
        init, name = yield self.rawInitiator()
        c = yield self.authed('access="listen"')
        a = yield self.rawCircuit(c, init, name)
        b = yield self.rawCircuit(c, init, name)
        serverConn = self.serverConn(c)
        clientEnd = serverConn.channels[a.cremote]

        def boom(data: bytes) -> None:
            raise RuntimeError("injected failure on the initiator's end")

        clientEnd.peer.write = boom
        c.sendPacket(94, struct.pack(">L", a.cremote) + NS(b"trigger"))
        yield c.inbox.expect(97, channel=a.cid)
        yield init.inbox.expect(97, channel=a.iid)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        c.sendPacket(94, struct.pack(">L", b.cremote) + NS(b"other"))
        _, data = yield init.inbox.expect(94, channel=b.iid)
        self.assertEqual(common.getNS(data[4:])[0], b"other")
        self.assertFalse(c.isLost or init.isLost)


# ---------------------------------------------------------------------------
# 14.6: unbounded peer text
# ---------------------------------------------------------------------------


class PeerTextTests(ChannelMixin, unittest.TestCase):
    """Issue 14 point 6."""

    @defer.inlineCallbacks
    def test_huge_channel_type_is_cut(self) -> Any:
        """A 250,000-byte unknown channel type gets a short refusal, quickly, and no long
        log line."""
        c = yield self.authed('access="listen"')
        started = time.process_time()
        replies = []
        for _ in range(5):
            replies.append((yield c.conn.openRaw(b"\x1b[2J" + b"t" * 250_000)))
        cpu = (time.process_time() - started) / 5
        figure(
            f"14.6 250 KB channel type: {cpu * 1000:.1f} ms CPU per open (client included),"
            f" reason {len(failure_text(replies[0][1]))} bytes"
        )
        for num, payload in replies:
            self.assertEqual(num, 92)
            self.assertLess(len(failure_text(payload)), 300)
        self.assertNotIn("\x1b", self.logs.out.getvalue())
        self.assertEqual([x[:100] for x in self.logs.lines() if len(x) > 500], [])
        self.assertFalse(c.isLost)

    @defer.inlineCallbacks
    def test_huge_initiator_refusal_is_cut(self) -> Any:
        """An initiator refusing with a 250 KB reason (packets are capped at 256 KiB): the
        client's failure text and the log line stay short."""
        init, name = yield self.rawInitiator()
        c = yield self.authed('access="listen"')
        cid = c.conn.openRaw(b"direct-tcpip", direct_tcpip(name, 80), wait=False)
        _, openPayload = yield init.inbox.expect(90)
        _, rest = common.getNS(openPayload)
        iremote = struct.unpack(">L", rest[:4])[0]
        init.sendPacket(92, struct.pack(">2L", iremote, 2) + NS(b"\x07no" * 83_333) + NS(b""))
        num, payload = yield c.inbox.expect(92, channel=cid)
        text = failure_text(payload)
        figure(f"14.6 250 KB initiator refusal: {len(text)} bytes to the client")
        self.assertTrue(text.startswith(b"initiator refused: "), text[:100])
        self.assertLess(len(text), 300)
        self.assertNotIn("\x07", self.logs.out.getvalue())
        self.assertEqual([x[:100] for x in self.logs.lines() if len(x) > 500], [])
        self.assertFalse(c.isLost or init.isLost)

    @defer.inlineCallbacks
    def test_peer_that_leaves_replies_unread_is_not_read(self) -> Any:
        """A client that sends opens but reads none of the refusals: the server's output
        buffer stops near the threshold, and once the client reads again every reply
        comes and the connection works."""
        c = yield self.authed('access="listen"')
        serverTCP = self.serverTransport(c).transport
        c.transport.pauseProducing()
        count = 20000
        kind = b"u" * 190
        for _ in range(count):
            c.conn.openRaw(kind, wait=False)
        peak = 0
        for _ in range(60):
            yield pause(0.05)
            peak = max(peak, tcp_buffered(serverTCP))
        # (the kernel's socket buffers hold some of the replies before Twisted's does)
        figure(f"14.6 {count} unread refusals: server output buffer peak {peak}")
        self.assertLess(peak, READ_PAUSE_BUFFERED + 128 * 1024)
        c.transport.resumeProducing()
        yield self.waitFor(
            lambda: sum(1 for n, _ in c.inbox.messages if n == 92) == count,
            timeout=30,
            what="every refusal",
        )
        num, _ = yield c.conn.globalRequest(b"no-such@example.org", b"")
        self.assertEqual(num, 82)


# ---------------------------------------------------------------------------
# 14.9: malformed channel requests
# ---------------------------------------------------------------------------


class ChannelRequestTests(ChannelMixin, unittest.TestCase):
    """Issue 14 point 9."""

    @defer.inlineCallbacks
    def test_malformed_and_repeated_requests(self) -> Any:
        """Malformed requests with and without want-reply, and repeated execs after a
        shell, leave no traceback, at most one log line, and a working connection."""
        c = yield self.authed('access="listen"', name="requester")
        connId = self.serverTransport(c).connId
        num, payload = yield c.conn.openRaw(b"session", sender=1)
        self.assertEqual(num, 91)
        remote = struct.unpack(">2L", payload[:8])[1]
        head = struct.pack(">L", remote)
        for wantReply in (b"\x00", b"\x01"):
            c.sendPacket(98, head + NS(b"\xff\xfe\x80") + wantReply)
            c.sendPacket(98, head + NS(b"window-change") + wantReply + b"\0\0")
            c.sendPacket(98, head + NS(b"pty-req") + wantReply + b"\0")
        for _ in range(3):
            num, _ = yield c.inbox.expect((99, 100), channel=1)
            self.assertEqual(num, 100)
        c.sendPacket(98, head + NS(b"shell") + b"\x01")
        num, _ = yield c.inbox.expect((99, 100), channel=1)
        self.assertEqual(num, 99)
        for _ in range(5):
            c.sendPacket(98, head + NS(b"exec") + b"\x01" + NS(b"whoami"))
            num, _ = yield c.inbox.expect((99, 100), channel=1)
            self.assertEqual(num, 100)
        gc.collect()
        yield pause(0.1)
        text = self.logs.out.getvalue()
        figure(f"14.9 log for 6 malformed requests and 5 repeated execs: {len(text)} bytes")
        self.assertNotIn("Unhandled error", text)
        self.assertNotIn("Traceback", text)
        self.assertNotIn("multiple session-client requests", text)
        lines = [x for x in self.logs.lines() if f"conn {connId}: " in x]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("channel request \\xff\\xfe\\x80 failed", lines[0])
        self.assertIn("further bad requests on this connection are not logged", lines[0])
        self.assertFalse(c.isLost)
        num, _ = yield c.conn.globalRequest(b"no-such@example.org", b"")
        self.assertEqual(num, 82)
        yield self.assertServing()
