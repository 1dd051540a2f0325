"""Issue 14, transport points 1, 3, 4 and 8: each attack performed against a live server.

The hostile side is a raw socket (``rawssh.connect_raw``) or Conch's client
driven to a stage and then fed crafted packets (``rawssh.connect_client``),
its own message handling replaced by a recorder where the server's answers
would otherwise confuse it.  Each test asserts on what the attacker and the
operator see: the DISCONNECT code, whether the connection survives, what
the server holds in memory, and the log text.  With ``NUTTCONCH_FIGURES=1``
the tests print the figures quoted in the security notes.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import time
from typing import Any

from twisted.conch.ssh import common
from twisted.internet import defer, protocol, reactor, task
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from nuttconch.connection import SwitchboardConnection
from nuttconch.transport import SwitchboardTransport

from . import rawssh
from .rawssh import NS, packet
from .test_threats import DISCONNECT_PROTOCOL_ERROR, ThreatMixin

MSG_IGNORE = 2
MSG_SERVICE_REQUEST = 5
MSG_KEXINIT = 20
MSG_KEX_ECDH_INIT = 30
MSG_KEX_DH_GEX_INIT = 32
MSG_KEX_DH_GEX_REQUEST = 34
MSG_USERAUTH_REQUEST = 50
MSG_GLOBAL_REQUEST = 80
MSG_REQUEST_SUCCESS = 81


def figure(text: str) -> None:
    """Print a measured figure for the security notes when asked to."""
    if os.environ.get("NUTTCONCH_FIGURES"):
        sys.stdout.write(f"\nFIGURE {text}\n")


def deaf(client: rawssh.ClientTransport) -> list[int]:
    """Stop the Conch client from acting on what the server sends: it only notes the
    message numbers (and a DISCONNECT), so a hostile script can keep the upper hand."""
    seen: list[int] = []

    def record(num: int, payload: bytes) -> None:
        seen.append(num)
        if num == rawssh.MSG_DISCONNECT:
            code = struct.unpack(">L", payload[:4])[0]
            client.disconnect = (code, common.getNS(payload[4:])[0])

    client.dispatchMessage = record  # type: ignore[method-assign]
    return seen


def queued(server: Any) -> int:
    """Payload bytes the server holds back because a key exchange is in progress."""
    return sum(len(p) for _, p in server._blockedByKeyExchange or ())


class _Stream(protocol.Protocol):
    """Behind an initiator: streams zeros as fast as the circuit takes them, and does not
    mind being cut off (the tests end while it is still sending)."""

    def connectionMade(self) -> None:
        from twisted.protocols.basic import FileSender

        data = io.BytesIO(bytes(self.factory.size))  # type: ignore[attr-defined]
        d = FileSender().beginFileTransfer(data, self.transport)
        d.addCallbacks(lambda _: self.transport.loseConnection(), lambda _: None)


def listen_stream(testcase: Any, size: int) -> int:
    factory = protocol.Factory.forProtocol(_Stream)
    factory.size = size  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return int(port.getHost().port)


def rss_kib() -> int:
    """This process's resident set (the server runs in it), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


class KeyExchangeMessageTests(ThreatMixin, unittest.TestCase):
    """Point 1: key-exchange messages only inside a key exchange, and no tracebacks."""

    @defer.inlineCallbacks
    def test_repeated_ecdh_init_after_kex_is_refused(self) -> Any:
        """A client that has finished the key exchange and sends ECDH_INIT again (without
        logging in) is disconnected with a protocol error; no key setup is redone."""
        c = yield self.client(stage="kex")
        server = self.serverTransport(c)
        setups: list[int] = []
        original = server._keySetup

        def counting(sharedSecret: bytes, exchangeHash: bytes) -> None:
            setups.append(1)
            original(sharedSecret, exchangeHash)

        server._keySetup = counting
        deaf(c)
        cpu = time.process_time()
        for _ in range(200):
            c.sendPacket(MSG_KEX_ECDH_INIT, NS(os.urandom(32)))
        try:
            yield c.waitLost(5)
        except defer.TimeoutError:
            pass
        figure(
            f"point1 200 stray ECDH_INIT: {len(setups)} key setups redone,"
            f" {time.process_time() - cpu:.3f} s CPU (server and client)"
        )
        self.assertEqual(setups, [])
        self.assertTrue(c.isLost, "connection still open after 200 stray ECDH_INIT")
        self.assertEqual(c.disconnect and c.disconnect[0], DISCONNECT_PROTOCOL_ERROR)
        self.assertIn(b"key exchange message 30 outside a key exchange", c.disconnect[1])
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_group_exchange_messages_refused_without_traceback(self) -> Any:
        """KEX_DH_GEX_INIT (32) or KEX_DH_GEX_REQUEST (34) right after KEXINIT gets
        DISCONNECT protocol error and one log line, never a traceback."""
        cases = {
            "gex request": packet(bytes([MSG_KEX_DH_GEX_REQUEST]) + struct.pack(">3L", 1, 2, 3)),
            "gex init": packet(bytes([MSG_KEX_DH_GEX_INIT]) + common.MP(12345)),
            "31 from a client": packet(bytes([31]) + NS(b"x")),
            "49": packet(bytes([49])),
        }
        before = max([t.connId for t in self.factory.transports] or [0])
        results = {}
        for name, data in cases.items():
            r = yield self.raw(rawssh.SSH_VERSION + packet(rawssh.kexinit()) + data)
            try:
                yield r.waitClosed(3)
            except defer.TimeoutError:
                results[name] = "still open"
                continue
            results[name] = rawssh.disconnect_code(r.messages())
        self.assertEqual(results, {name: DISCONNECT_PROTOCOL_ERROR for name in cases})
        text = self.logs.out.getvalue()
        self.assertNotIn("Traceback", text)
        self.assertNotIn("Unhandled", text)
        self.assertAtMostOneLinePerConnection(since=before)
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_exception_from_peer_input_is_contained(self) -> Any:
        """Any exception raised while handling a peer's message ends that connection with
        a DISCONNECT and one log line; nothing escapes as an unhandled traceback."""

        def boom(self: Any, packet: bytes) -> None:
            raise RuntimeError("injected")

        self.patch(SwitchboardTransport, "ssh_IGNORE", boom)
        c = yield self.client(stage="kex")
        connId = self.serverTransport(c).connId
        deaf(c)
        c.sendPacket(MSG_IGNORE, NS(b"x"))
        yield c.waitLost(5)
        self.assertEqual(c.disconnect and c.disconnect[0], DISCONNECT_PROTOCOL_ERROR)
        lines = self.logs.linesFor(connId)
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("RuntimeError: injected", lines[0])
        self.assertNotIn("Traceback", self.logs.out.getvalue())
        self.assertEqual(self.flushLoggedErrors(), [])
        yield self.assertServing()


class StalledKeyExchangeTests(ThreatMixin, unittest.TestCase):
    """Point 3: a key exchange that never finishes costs bounded memory and time."""

    @defer.inlineCallbacks
    def stalledClientOnCircuit(self, rekeyTimeout: float | None = None) -> Any:
        """An authenticated client with a circuit (advertising ``window``) to an initiator
        whose service streams data, advertising a 4 GiB window; the client then sends
        KEXINIT and never goes on."""
        source = listen_stream(self, 64 * 1024 * 1024)
        key = self.key("src", options='access="initiate"')
        yield self.initiator(key, "src", f"7300:localhost:{source}")
        name = self.registry.listeners()[0].connect_name
        c = yield self.authed()
        server = self.serverTransport(c)
        num, _ = yield c.conn.openRaw(
            b"direct-tcpip", rawssh.direct_tcpip(name.encode(), 7300), window=0xFFFFFFFF
        )
        self.assertEqual(num, 91)
        if rekeyTimeout is not None:
            server.rekeyTimeout = rekeyTimeout
        seen = deaf(c)
        c.sendPacket(MSG_KEXINIT, rawssh.kexinit()[1:])
        return c, server, seen

    @defer.inlineCallbacks
    def test_stalled_rekey_does_not_queue_circuit_data(self) -> Any:
        """While a client's KEXINIT goes unfinished, data for its circuit stays behind the
        circuit's window instead of piling up in the transport's key-exchange queue."""
        rss = rss_kib()
        c, server, _ = yield self.stalledClientOnCircuit()
        peak = 0
        held = 0
        for i in range(100):  # 2 s, or longer on a loaded machine until data has arrived
            if i >= 20 and held:
                break
            yield sleep(0.1)
            peak = max(peak, queued(server))
            held = max(held, sum(len(ch.buf) for ch in server.service.channels.values()))
        figure(
            f"point3 stalled KEXINIT, after {i / 10:.1f} s: {peak} bytes queued, {held} held by the"
            f" circuit, RSS +{(rss_kib() - rss) // 1024} MiB"
        )
        self.assertFalse(c.isLost)
        self.assertGreater(held, 0)  # the initiator's data did arrive
        self.assertLess(peak, 64 * 1024, peak)
        self.assertLess(held, 2 * self.config.channel_window + 1024 * 1024, held)
        self.assertTrue(server.service.congested)

    @defer.inlineCallbacks
    def test_stalled_rekey_hits_the_deadline(self) -> Any:
        """A rekey that the peer never completes ends the connection at the rekey deadline
        with a DISCONNECT that says so."""
        c, server, _ = yield self.stalledClientOnCircuit(rekeyTimeout=1.0)
        connId = server.connId
        try:
            yield c.waitLost(10)
        except defer.TimeoutError:
            self.fail("a stalled rekey was never ended")
        self.assertEqual(c.disconnect and c.disconnect[1], b"key exchange timed out")
        self.assertIn("key exchange timed out", "\n".join(self.logs.linesFor(connId)))
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_blind_replies_during_peer_kex_are_refused(self) -> Any:
        """After its KEXINIT a peer may send only transport messages until its NEWKEYS:
        a blind keepalive answer (REQUEST_SUCCESS) then is a protocol error."""
        c = yield self.authed()
        server = self.serverTransport(c)
        deaf(c)
        answered: list[object] = []
        for _ in range(3):  # keepalives the client has not answered yet
            d = server.service.sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=1)
            d.addBoth(answered.append)
        c.sendPacket(MSG_KEXINIT, rawssh.kexinit()[1:])
        for _ in range(3):
            c.sendPacket(MSG_REQUEST_SUCCESS, b"")
        try:
            yield c.waitLost(5)
        except defer.TimeoutError:
            self.fail("connection messages during the peer's key exchange were accepted")
        self.assertEqual(c.disconnect and c.disconnect[0], DISCONNECT_PROTOCOL_ERROR)
        self.assertEqual([x for x in answered if not isinstance(x, Failure)], [])
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_queue_during_rekey_stops_reading(self) -> Any:
        """During a server-started rekey a peer that ignores it and floods requests makes
        the server queue replies only up to a bound; then it stops reading that peer."""
        c = yield self.authed()
        server = self.serverTransport(c)
        deaf(c)
        server.sendKexInit()  # as a volume rekey (RekeyLimit) would
        request = NS(b"no-such@example.org") + b"\x01"
        for _ in range(40000):
            c.sendPacket(MSG_GLOBAL_REQUEST, request)
        entries = 0
        for _ in range(30):
            yield sleep(0.1)
            entries = max(entries, len(server._blockedByKeyExchange or ()))
        figure(f"point3 replies queued for 40000 requests during a rekey: {entries}")
        self.assertFalse(c.isLost)
        self.assertLess(entries, 10000, entries)
        yield self.assertServing()


class ServiceRequestTests(ThreatMixin, unittest.TestCase):
    """Point 4: one service per connection, and the connection service always registered
    for its socket's congestion."""

    @defer.inlineCallbacks
    def test_service_request_after_login_disconnects(self) -> Any:
        """A second SERVICE_REQUEST ssh-connection after login ends the connection with a
        protocol error instead of replacing the connection service."""
        c = yield self.authed()
        server = self.serverTransport(c)
        service = server.service
        seen = deaf(c)
        c.sendPacket(MSG_SERVICE_REQUEST, NS(b"ssh-connection"))
        try:
            yield c.waitLost(5)
        except defer.TimeoutError:
            self.fail("SERVICE_REQUEST after login was accepted")
        self.assertNotIn(6, seen)  # no SERVICE_ACCEPT
        self.assertIs(server.service, service)
        self.assertEqual(c.disconnect and c.disconnect[0], DISCONNECT_PROTOCOL_ERROR)
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_service_request_during_userauth_disconnects(self) -> Any:
        """A second SERVICE_REQUEST ssh-userauth (which would reset the attempt counters)
        ends the connection."""
        c = yield self.client(stage="userauth")
        deaf(c)
        c.sendPacket(MSG_SERVICE_REQUEST, NS(b"ssh-userauth"))
        yield c.waitLost(5)
        self.assertEqual(c.disconnect and c.disconnect[0], DISCONNECT_PROTOCOL_ERROR)

    @defer.inlineCallbacks
    def test_new_connection_service_registers_for_congestion(self) -> Any:
        """A connection service started on a transport whose socket already has a producer
        takes that place, so its circuits still see the socket's congestion."""
        c = yield self.authed()
        server = self.serverTransport(c)
        tcp = server.transport
        self.assertIs(tcp.producer, server.service)
        replacement = SwitchboardConnection()
        server.setService(replacement)
        self.assertIs(tcp.producer, replacement)
        c.close()


class UnsupportedKeyAlgorithmTests(ThreatMixin, unittest.TestCase):
    """Point 8: a hostile public-key algorithm name costs one short, escaped info line."""

    @defer.inlineCallbacks
    def test_huge_hostile_algorithm_name_is_truncated_and_escaped(self) -> Any:
        """A 200 KB algorithm name full of ESC, BEL, CR and braces, with a key blob that
        does not parse, is logged once at info, truncated and escaped."""
        levels: list[LogLevel] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical):
                levels.append(event["log_level"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        c = yield self.client(stage="userauth")
        connId = self.serverTransport(c).connId
        alg = (b"evil{0}\x1b[2J\x07\rFORGED LINE " * 8000)[:200_000]
        request = NS(b"cli") + NS(b"ssh-connection") + NS(b"publickey") + b"\x00"
        request += NS(alg) + NS(b"not a key blob")
        c.sendPacket(MSG_USERAUTH_REQUEST, request)
        num, _ = yield c.inbox.expect(51)  # USERAUTH_FAILURE: the client may go on
        c.close()
        yield c.waitLost(5)
        yield sleep(0.05)
        text = self.logs.out.getvalue()
        figure(f"point8 log bytes for one 200 KB algorithm name: {len(text.encode())}")
        self.assertLess(len(text), 4000, text[:300])
        for ch in "\x1b\x07\r":
            self.assertNotIn(ch, text)
        self.assertEqual(levels, [])
        lines = [x for x in self.logs.linesFor(connId) if "unsupported key type" in x]
        self.assertEqual(len(lines), 1, self.logs.linesFor(connId))
        self.assertIn("evil{0}\\x1b[2J\\x07\\rFORGED", lines[0])
