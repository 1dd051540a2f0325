"""THREATS.md section 4, cases 1 to 38, against an in-process server.

Each class is one THREATS section (a to e); each test names its case. The
hostile side is the real OpenSSH client, a raw socket (``rawssh.connect_raw``)
or Conch's client driven to a stage and then fed crafted packets
(``rawssh.connect_client``). After every hostile case a fresh legitimate
``ssh ... whoami`` must still work (``assertServing``). The load cases 24,
26, 28 and 29 are in ``tests.test_stress``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import socket
import struct
import subprocess
import time
from typing import Any

from twisted.conch.ssh import keys
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import globalLogPublisher
from twisted.python.procutils import which
from twisted.trial import unittest
from zope.interface import implementer

from nuttconch import authkeys, commands
from nuttconch.logs import make_observer
from nuttconch.names import escape

from . import rawssh
from .harness import SSHProcess, SwitchboardTestMixin, listen_echo, listening_sockets, missing
from .rawssh import NS, connect_client, connect_raw, direct_tcpip, open_failure_code, packet

AUTOSSH = (which("autossh") or [None])[0]
DISCONNECT_PROTOCOL_ERROR = 2
OPEN_PROHIBITED = 1
OPEN_CONNECT_FAILED = 2
OPEN_UNKNOWN_TYPE = 3
OPEN_RESOURCE_SHORTAGE = 4


class LogCapture:
    """What an operator sees at level info: the server's own text log lines."""

    def __init__(self) -> None:
        self.out = io.StringIO()
        self.observer = make_observer("info", "text", out=self.out)

    def start(self, testcase: Any) -> LogCapture:
        globalLogPublisher.addObserver(self.observer)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.observer)
        return self

    def lines(self) -> list[str]:
        return [x for x in self.out.getvalue().splitlines() if x.strip()]

    def linesFor(self, connId: int) -> list[str]:
        return [x for x in self.lines() if f"conn {connId} " in x]


class ThreatMixin(SwitchboardTestMixin):
    """Helpers: a legit key, the still-serving check, and server-side lookups."""

    def setUp(self) -> Any:
        result = super().setUp()
        self.logs = LogCapture().start(self)
        self.legit = self.key("legit", options='access="listen",access="initiate"')
        return result

    @defer.inlineCallbacks
    def assertServing(self) -> Any:
        """A fresh legitimate login still works."""
        out, err, code = yield self.ssh(self.legit, "legit", command=("whoami",))
        self.assertEqual(code, 0, err)
        self.assertIn(b"hostname: legit", out)

    def serverTransport(self, client: rawssh.ClientTransport) -> Any:
        """The server's transport for a Conch client connection on loopback."""
        port = client.transport.getHost().port
        for t in self.factory.transports:
            if t.transport.getPeer().port == port:
                return t
        raise AssertionError("no server transport for this client")

    def newConnIds(self, before: int) -> list[int]:
        return [t.connId for t in self.factory.transports if t.connId > before]

    @defer.inlineCallbacks
    def client(self, key: str | None = None, user: bytes = b"cli", **kw: Any) -> Any:
        c = yield connect_client(self.port, key=key, user=user, **kw)
        self.addCleanup(c.close)
        return c

    @defer.inlineCallbacks
    def authed(self, options: str = 'access="listen",access="initiate"', name: str = "cli") -> Any:
        key = self.key(name, options=options)
        c = yield self.client(key, name.encode())
        self.assertTrue(c.authenticated, c.banner)
        return c

    @defer.inlineCallbacks
    def raw(self, data: bytes = b"", bind: str | None = None) -> Any:
        r = yield connect_raw(self.port, bind)
        self.addCleanup(r.abort)
        if data:
            r.send(data)
        return r

    def readKeys(self) -> bytes:
        with open(self.akfile, "rb") as handle:
            return handle.read()

    def assertAtMostOneLinePerConnection(self, since: int = 0) -> None:
        """No connection logged more than one line (THREATS 1, F13)."""
        byConn: dict[str, list[str]] = {}
        for line in self.logs.lines():
            marker = line.find(" conn ")
            if marker < 0:
                continue
            connId = line[marker + 6 :].split(" ", 1)[0].rstrip(":")
            if connId.isdigit() and int(connId) > since:
                byConn.setdefault(connId, []).append(line)
        for connId, lines in byConn.items():
            self.assertLessEqual(len(lines), 1, f"conn {connId} logged {lines}")

    @defer.inlineCallbacks
    def echoInitiator(self, user: str = "dev", port: int = 7100, tag: bytes = b"DEV:") -> Any:
        """A real ``ssh -N -R`` initiator in front of an echo service; returns its listener."""
        target = listen_echo(self, tag)
        key = self.key(user, options='access="initiate"')
        proc = yield self.initiator(key, user, f"{port}:localhost:{target}")
        listener = yield self.waitFor(
            lambda: next((x for x in self.registry.listeners() if x.hostname == user), None)
        )
        return proc, listener


# ---------------------------------------------------------------------------
# (a) Bad input at the SSH layer
# ---------------------------------------------------------------------------


class A_SSHLayerTests(ThreatMixin, unittest.TestCase):
    """THREATS section (a): cases 1 to 12."""

    @defer.inlineCallbacks
    def test_01_garbage_and_hostile_banners(self) -> Any:
        """Case 1: garbage and hostile banners are closed within about 1 s, one log line each."""
        cases = {
            "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "no newline": b"A" * 5000,
            "ssh-1.5": b"SSH-1.5-x\r\n",
            "4096-byte banner": b"SSH-2.0-" + b"x" * 4096 + b"\r\n",
            "nul and crcrlf": b"SSH-2.0-\0\0\0\r\r\n" + b"\0" * 64,
            "1000 pre-banner lines": b"hello there\r\n" * 1000,
        }
        conns = []
        for name, data in cases.items():
            r = yield self.raw(data)
            conns.append((name, r))
        for name, r in conns:
            try:
                lifetime = yield r.waitClosed(3)
            except defer.TimeoutError:
                self.fail(f"{name}: still open after 3 s")
            self.assertLess(lifetime, 1.5, name)
        self.assertAtMostOneLinePerConnection()
        self.assertEqual([x[:120] for x in self.logs.lines() if len(x) > 300], [])
        self.assertNotIn("Traceback", self.logs.out.getvalue())
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_01_slow_banner_closed_at_deadline(self) -> Any:
        """Case 1: one byte every 5 s is closed at the handshake deadline, not before."""
        clock = task.Clock()
        self.factory.clock = clock
        r = yield self.raw(b"S")
        yield self.waitFor(lambda: self.factory.transports, what="accept")
        for ch in b"SH-2.0-slo":
            clock.advance(5)
            r.send(bytes([ch]))
            if clock.seconds() >= 25:
                break
        self.assertIsNone(r.closedAt)
        clock.advance(self.config.login_grace_time - clock.seconds() + 0.1)
        yield r.waitClosed(2)
        self.factory.clock = reactor
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_02_bad_packet_framing_before_kex(self) -> Any:
        """Case 2: bad framing before kex gets DISCONNECT_PROTOCOL_ERROR without buffering."""
        body = rawssh.kexinit()
        cases = {
            "length 0": struct.pack(">LB", 0, 4) + b"\0" * 11,
            "length 1": struct.pack(">LB", 1, 4) + b"\0" * 11,
            "length 2^32-1": struct.pack(">LB", 0xFFFFFFFF, 4) + b"\0" * 11,
            "length 1MiB+1": struct.pack(">LB", 1024 * 1024 + 1, 4) + b"\0" * 11,
            "not a block multiple": packet(body, padding=5),
            "padding >= length": struct.pack(">LB", 12, 200) + b"\x14" + b"\0" * 10,
            "padding < 4": packet(body, padding=2),
        }
        results = {}
        for name, data in cases.items():
            r = yield self.raw(rawssh.SSH_VERSION + data)
            try:
                yield r.waitClosed(3)
            except defer.TimeoutError:
                results[name] = "still open"
                continue
            results[name] = rawssh.disconnect_code(r.messages())
        self.assertEqual(results, {name: DISCONNECT_PROTOCOL_ERROR for name in cases})
        self.assertAtMostOneLinePerConnection()
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_03_no_zlib_before_auth(self) -> Any:
        """Case 3: zlib is not offered, and a zlib-only client never reaches userauth."""
        r = yield self.raw(rawssh.SSH_VERSION)
        yield self.waitFor(lambda: r.messages(), what="server KEXINIT")
        offered = r.serverKexinit()
        self.assertEqual(offered["comp_cs"], [b"none"])
        self.assertEqual(offered["comp_sc"], [b"none"])
        key = self.key("zip", options='access="listen"')
        c = yield connect_client(self.port, key=key, user=b"zip", compressions=[b"zlib"])
        self.assertFalse(c.authenticated)
        self.assertEqual(self.factory.checker.calls, 0)
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_04_out_of_order_before_kex(self) -> Any:
        """Case 4: SERVICE_REQUEST, USERAUTH_REQUEST or NEWKEYS before kex, or a second
        KEXINIT mid-kex, get an immediate DISCONNECT and never reach the checker."""
        key = keys.Key.fromFile(self.legit)
        userauthReq = bytes([50]) + NS(b"legit") + NS(b"ssh-connection") + NS(b"publickey") + b"\0"
        userauthReq += NS(b"ssh-ed25519") + NS(key.public().blob())
        cases = {
            "service request": packet(bytes([5]) + NS(b"ssh-userauth")),
            "userauth request": packet(userauthReq),
            "newkeys": packet(bytes([21])),
            "second kexinit": packet(rawssh.kexinit()) + packet(rawssh.kexinit()),
            "kexinit then newkeys": packet(rawssh.kexinit()) + packet(bytes([21])),
        }
        results = {}
        for name, data in cases.items():
            r = yield self.raw(rawssh.SSH_VERSION + data)
            try:
                lifetime = yield r.waitClosed(3)
            except defer.TimeoutError:
                results[name] = "still open"
                continue
            results[name] = (rawssh.disconnect_code(r.messages()), lifetime < 1)
        self.assertEqual(results, {name: (DISCONNECT_PROTOCOL_ERROR, True) for name in cases})
        self.assertEqual(self.factory.checker.calls, 0)
        self.assertEqual(self.factory.portal.realm.avatars, 0)
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_04_connection_service_and_channel_open_before_auth(self) -> Any:
        """Case 4: SERVICE_REQUEST ssh-connection and CHANNEL_OPEN before auth disconnect."""
        before = self.readKeys()
        c = yield self.client(stage="kex")
        c.sendPacket(5, NS(b"ssh-connection"))
        yield c.waitLost()
        self.assertIsNotNone(c.disconnect)
        c2 = yield self.client(stage="userauth")
        c2.sendPacket(90, NS(b"session") + struct.pack(">3L", 0, 65536, 32768))
        try:
            yield c2.waitLost(3)
        except defer.TimeoutError:
            self.fail("CHANNEL_OPEN before auth did not end the connection")
        self.assertIsNotNone(c2.disconnect)
        self.assertEqual(self.factory.checker.calls, 0)
        self.assertEqual(self.factory.portal.realm.avatars, 0)
        self.assertEqual(self.readKeys(), before)
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_05_prekex_message_flood(self) -> Any:
        """Case 5: IGNORE, unknown and GLOBAL_REQUEST floods before kex end after a budget."""
        ignore = packet(bytes([2]) + NS(b"x" * 100))
        r = yield self.raw(rawssh.SSH_VERSION + packet(rawssh.kexinit()))
        sent = 0
        # In batches, waiting after each, so the server's DISCONNECT is not lost to a RST.
        while r.closedAt is None and sent < 10000:
            r.send(ignore * 10)
            sent += 10
            yield task.deferLater(reactor, 0.01, lambda: None)
        yield r.waitClosed(3)
        self.assertEqual(rawssh.disconnect_code(r.messages()), DISCONNECT_PROTOCOL_ERROR)
        self.assertLess(sent, 10000)
        for kind in (200, 80):
            r = yield self.raw(rawssh.SSH_VERSION + packet(bytes([kind]) + NS(b"x")))
            yield r.waitClosed(3)
            self.assertEqual(rawssh.disconnect_code(r.messages()), DISCONNECT_PROTOCOL_ERROR)
        self.assertAtMostOneLinePerConnection()
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_06_malformed_global_requests(self) -> Any:
        """Case 6: malformed tcpip-forward requests fail with no partial registration."""
        c = yield self.authed()
        conn = c.conn
        tf = b"tcpip-forward"
        bad = {
            "truncated address": struct.pack(">L", 100) + b"abc",
            "address length 2^32-1": struct.pack(">L", 0xFFFFFFFF) + b"abc",
            "invalid utf-8": NS(b"\xff\xfe") + struct.pack(">L", 80),
            "port 65536": NS(b"") + struct.pack(">L", 65536),
            "port 2^32-1": NS(b"") + struct.pack(">L", 0xFFFFFFFF),
        }
        for name, data in bad.items():
            num, _ = yield conn.globalRequest(tf, data)
            self.assertEqual(num, 82, name)
            self.assertEqual(self.registry.listeners(), [], name)
        num, _ = yield conn.globalRequest(b"cancel-tcpip-forward", NS(b"") + struct.pack(">L", 80))
        self.assertEqual(num, 82)
        num, _ = yield conn.globalRequest(b"no-such-request@example.org", b"")
        self.assertEqual(num, 82)
        num, payload = yield conn.globalRequest(tf, NS(b"") + struct.pack(">L", 0))
        self.assertEqual(num, 81, "port 0 allocates a virtual port (README)")
        (allocated,) = struct.unpack(">L", payload[:4])
        [listener] = self.registry.listeners()
        self.assertEqual(list(listener.ports), [allocated])
        # Undecodable framing (no want-reply byte): a clean disconnect.
        c.sendPacket(80, NS(tf))
        yield c.waitLost()
        yield self.waitFor(lambda: not self.registry.listeners(), what="registry cleanup")
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_07_malformed_channel_opens(self) -> Any:
        """Case 7: malformed or unsupported channel opens get OPEN_FAILURE with the right code."""
        yield self.echoInitiator()
        c = yield self.authed('access="listen"')
        conn = c.conn
        dt = b"direct-tcpip"
        cases = [
            ("truncated", dt, NS(b"dev") + b"\0\0", OPEN_CONNECT_FAILED),
            ("invalid utf-8 host", dt, direct_tcpip(b"\xff\xfe", 7100), OPEN_CONNECT_FAILED),
            ("10 KB host", dt, direct_tcpip(b"a" * 10240, 7100), OPEN_CONNECT_FAILED),
            ("port 0", dt, direct_tcpip(b"dev", 0), OPEN_CONNECT_FAILED),
            ("port 65536", dt, direct_tcpip(b"dev", 65536), OPEN_CONNECT_FAILED),
            ("port 2^32-1", dt, direct_tcpip(b"dev", 0xFFFFFFFF), OPEN_CONNECT_FAILED),
            ("x11", b"x11", NS(b"127.0.0.1") + struct.pack(">L", 1), OPEN_UNKNOWN_TYPE),
            ("agent", b"auth-agent@openssh.com", b"", OPEN_UNKNOWN_TYPE),
            ("tun", b"tun@openssh.com", struct.pack(">2L", 1, 0), OPEN_UNKNOWN_TYPE),
            ("forwarded-tcpip", b"forwarded-tcpip", direct_tcpip(b"a", 1), OPEN_UNKNOWN_TYPE),
        ]
        got = {}
        for name, kind, extra, _ in cases:
            num, payload = yield conn.openRaw(kind, extra)
            got[name] = open_failure_code(payload) if num == 92 else "confirmed"
        self.assertEqual(got, {name: code for name, _, _, code in cases})
        # maxpacket 0 is refused; window 0 and maxpacket 2^32-1 open without a busy loop.
        num, payload = yield conn.openRaw(b"session", maxPacket=0)
        self.assertEqual((num, open_failure_code(payload)), (92, OPEN_PROHIBITED))
        num, _ = yield conn.openRaw(b"session", window=0, maxPacket=0xFFFFFFFF, sender=5)
        self.assertEqual(num, 91)
        # Duplicate sender channel id.
        num, payload = yield conn.openRaw(b"session", sender=5)
        self.assertEqual((num, open_failure_code(payload)), (92, OPEN_PROHIBITED))
        # A window of 0 holds the server's output: nothing arrives, nothing spins.
        c.sendPacket(98, struct.pack(">L", 0) + NS(b"shell") + b"\x01")
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertFalse([m for m in c.inbox.messages if m[0] == 94])
        self.assertFalse(c.isLost)
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_08_hostile_usernames(self) -> Any:
        """Case 8: hostile user names are refused before any registry or file effect."""
        names = [
            b"\xff\xfeinvalid",
            b"",
            b"a" * 1024,
            b"b" * 65536,
            b"ctl\x01x",
            b"new\nline",
            b"ansi\x1b[2J",
            b"-leading",
            b"name~1",
            b"star*",
            b"com,ma",
            b'quo"te',
            b"eq=ual",
            b"spa ce",
            b"sl/ash",
            "\u0440rod".encode(),  # Cyrillic er
        ]
        key = self.key("hostile")
        before = self.readKeys()
        for name in names:
            # One at a time: concurrent unauthenticated connections meet MaxStartups.
            c = yield connect_client(self.port, key=key, user=name)
            self.assertFalse(c.authenticated, name[:40])
            self.assertIn(b"nuttconch: ", c.banner, name[:40])
        self.assertEqual(self.readKeys(), before)
        self.assertEqual(self.registry.listeners(), [])
        self.assertEqual(self.factory.portal.realm.avatars, 0)
        text = self.logs.out.getvalue()
        self.assertNotIn("\x1b", text)
        self.assertNotIn("ctl\x01x", text)
        # Hostile names must not amplify the log (F13: < 300 bytes per connection).
        self.assertEqual([x[:120] for x in self.logs.lines() if len(x) > 300], [])
        # Case variants are one name.
        out, err, code = yield self.ssh(self.legit, "LEGIT", command=("whoami",))
        self.assertEqual(code, 0, err)
        self.assertIn(b"hostname: legit\n", out)
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_09_channel_protocol_abuse(self) -> Any:
        """Case 9: data beyond the window, unknown channel ids, window overflow, requests
        after CLOSE and double CLOSE end the channel or connection and leave maps clean."""
        _, listener = yield self.echoInitiator()
        initiatorConn = listener.opener.conn

        @defer.inlineCallbacks
        def circuit() -> Any:
            c = yield self.authed('access="listen"', name=f"abuser{len(self.factory.avatars)}")
            num, payload = yield c.conn.openRaw(
                b"direct-tcpip", direct_tcpip(listener.connect_name.encode(), 7100)
            )
            self.assertEqual(num, 91)
            remote, window = struct.unpack(">4L", payload[:16])[1:3]
            return c, remote, window

        # Data beyond the window: protocol error, and the initiator's end is closed too.
        c, remote, window = yield circuit()
        yield self.waitFor(lambda: initiatorConn.channels, what="initiator channel")
        c.sendPacket(94, struct.pack(">L", remote) + NS(b"x" * 32768))
        c.sendPacket(94, struct.pack(">L", remote) + NS(b"x" * 40000))
        yield c.waitLost()
        self.assertEqual(c.disconnect[0], DISCONNECT_PROTOCOL_ERROR)
        yield self.waitFor(lambda: not initiatorConn.channels, what="initiator end closed")
        # Data and EOF on an unknown channel id.
        for msg, body in ((94, struct.pack(">L", 777) + NS(b"x")), (96, struct.pack(">L", 777))):
            c = yield self.authed('access="listen"', name=f"unknown{msg}")
            c.sendPacket(msg, body)
            yield c.waitLost()
            self.assertEqual(c.disconnect[0], DISCONNECT_PROTOCOL_ERROR)
        # WINDOW_ADJUST past 2^32-1.
        c, remote, window = yield circuit()
        c.sendPacket(93, struct.pack(">2L", remote, 0xFFFFFFFF))
        yield c.waitLost()
        self.assertEqual(c.disconnect[0], DISCONNECT_PROTOCOL_ERROR)
        yield self.waitFor(lambda: not initiatorConn.channels, what="initiator end closed")
        # Requests after CLOSE, and a double CLOSE, on a session channel.
        c = yield self.authed('access="listen"', name="closer")
        num, payload = yield c.conn.openRaw(b"session", sender=1)
        remote = struct.unpack(">2L", payload[:8])[1]
        c.sendPacket(97, struct.pack(">L", remote))
        c.sendPacket(98, struct.pack(">L", remote) + NS(b"exec") + b"\x01" + NS(b"whoami"))
        c.sendPacket(97, struct.pack(">L", remote))
        yield task.deferLater(reactor, 0.3, lambda: None)
        server = [t for t in self.factory.transports if getattr(t, "avatar", None)]
        for t in server:
            if t.avatar.identity.hostname == "closer":
                self.assertEqual(t.service.channels, {})
        self.assertEqual([len(x.ports) for x in self.registry.listeners()], [1])
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_09_close_during_pending_open(self) -> Any:
        """Case 9: a client that leaves during a pending OPEN frees it; the late answer is
        closed toward the initiator."""
        init = yield self.authed('access="initiate"', name="hung")
        num, _ = yield init.conn.globalRequest(b"tcpip-forward", NS(b"") + struct.pack(">L", 80))
        self.assertEqual(num, 81)
        name = self.registry.listeners()[0].connect_name.encode()
        c = yield self.authed('access="listen"', name="leaver")
        c.conn.openRaw(b"direct-tcpip", direct_tcpip(name, 80), sender=3, wait=False)
        _, openPayload = yield init.inbox.expect(90)
        serverConn = self.serverTransport(c).service
        yield self.waitFor(lambda: serverConn.pendingOpens, what="pending open")
        c.close()
        yield c.waitLost()
        yield self.waitFor(lambda: serverConn.stopped, what="server side gone")
        self.assertEqual(serverConn.pendingOpens, {})
        ctype, rest = rawssh.common.getNS(openPayload)
        senderId = struct.unpack(">L", rest[:4])[0]
        init.sendPacket(91, struct.pack(">4L", senderId, 50, 65536, 32768))
        yield init.inbox.expect(97, channel=50)
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_10_channel_and_forward_caps(self) -> Any:
        """Case 10: channels and forwards beyond the per-connection caps are refused with
        OPEN_FAILURE 4 and REQUEST_FAILURE (full counts: tests.test_stress)."""
        yield self.stopServer()
        self.startServer(max_channels="8", max_forwards="4")
        self.legit = self.key("legit2", options='access="listen",access="initiate"')
        c = yield self.authed()
        results = []
        for _ in range(12):
            num, payload = yield c.conn.openRaw(b"session")
            results.append(open_failure_code(payload) if num == 92 else 0)
        self.assertEqual(results, [0] * 8 + [OPEN_RESOURCE_SHORTAGE] * 4)
        replies = []
        for port in range(1, 8):
            num, _ = yield c.conn.globalRequest(b"tcpip-forward", NS(b"") + struct.pack(">L", port))
            replies.append(num)
        self.assertEqual(replies, [81] * 4 + [82] * 3)
        self.assertEqual(len(self.registry.listeners()[0].ports), 4)
        # Many aliases on one key: bounded by the line length, and all of them route.
        aliases = ",".join(f'alias="al{i}"' for i in range(800))
        self.key("many", options=f'access="initiate",{aliases}')
        c2 = yield self.client(os.path.join(self.dir, "many"), b"many")
        self.assertTrue(c2.authenticated, c2.banner)
        num, _ = yield c2.conn.globalRequest(b"tcpip-forward", NS(b"") + struct.pack(">L", 22))
        self.assertEqual(num, 81)
        listener = self.registry.find("al799")
        self.assertEqual(self.registry.resolve("al799", 22).listener_id, listener.id)
        self.assertIn("al0", listener.aliases)
        self.assertEqual(self.factory.dropped, 0)
        out, err, code = yield self.ssh(self.legit, "legit2", command=("whoami",))
        self.assertEqual(code, 0, err)

    @defer.inlineCallbacks
    def test_11_sequence_numbers_wrap(self) -> Any:
        """Case 11: packet sequence numbers wrap mod 2^32 on a live connection."""
        c = yield self.authed()
        server = self.serverTransport(c)
        near = 0xFFFFFFFE
        server.incomingPacketSequence = c.outgoingPacketSequence = near
        server.outgoingPacketSequence = c.incomingPacketSequence = near
        for i in range(4):
            num, _ = yield c.conn.globalRequest(b"no-such@example.org", b"")
            self.assertEqual(num, 82, f"request {i}")
        self.assertFalse(c.isLost)
        self.assertLess(server.incomingPacketSequence, 10)
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_11_client_rekey_mid_circuit(self) -> Any:
        """Case 11: a client rekey (RekeyLimit=256k) mid-circuit keeps the data intact."""
        _, listener = yield self.echoInitiator(tag=b"")
        data = os.urandom(3 * 1024 * 1024)
        out, err, code = yield self.ssh(
            self.legit,
            "legit",
            "-v",
            "-o",
            "RekeyLimit=256k",
            "-W",
            f"{listener.connect_name}:7100",
            stdin=data,
            timeout=60,
        )
        self.assertEqual(code, 0, err[-2000:])
        self.assertEqual(hashlib.sha256(out).hexdigest(), hashlib.sha256(data).hexdigest())
        self.assertGreaterEqual(err.count(b"SSH2_MSG_KEXINIT sent"), 3)

    @defer.inlineCallbacks
    def test_12_algorithm_posture(self) -> Any:
        """Case 12: only modern kex, ciphers, MACs and host keys; no none, CBC, SHA-1 or zlib."""
        out, err, code = yield self.ssh(self.legit, "legit", "-vv", command=("whoami",))
        self.assertEqual(code, 0, err)
        kex = [x for x in err.decode().splitlines() if "kex: " in x]
        text = "\n".join(kex)
        self.assertRegex(text, r"kex: algorithm: (mlkem768x25519-sha256|curve25519-sha256)")
        self.assertRegex(text, r"kex: host key algorithm: (ssh-ed25519|ecdsa-sha2|rsa-sha2)")
        modern = r"(aes\d+-ctr MAC: hmac-sha2-\d+|chacha20-poly1305@openssh.com MAC: <implicit>"
        modern += r"|aes\d+-gcm@openssh.com MAC: <implicit>)"
        self.assertRegex(text, rf"server->client cipher: {modern} compression: none")
        self.assertRegex(text, rf"client->server cipher: {modern} compression: none")
        refused = [
            ("-o", "Ciphers=aes128-cbc"),
            ("-o", "Ciphers=3des-cbc"),
            ("-o", "Ciphers=aes128-ctr", "-o", "MACs=hmac-sha1"),
            ("-o", "Ciphers=aes128-ctr", "-o", "MACs=hmac-md5"),
            ("-o", "KexAlgorithms=diffie-hellman-group14-sha1"),
            ("-o", "KexAlgorithms=diffie-hellman-group-exchange-sha1"),
            ("-o", "HostKeyAlgorithms=ssh-rsa"),
            ("-o", "HostKeyAlgorithms=ssh-dss"),
        ]
        results = yield defer.gatherResults(
            [self.ssh(self.legit, "legit", *opt, command=("whoami",)) for opt in refused]
        )
        for opt, (_, err, code) in zip(refused, results, strict=True):
            self.assertEqual(code, 255, opt)
            self.assertIn(b"no matching", err, opt)
        r = yield self.raw(rawssh.SSH_VERSION)
        yield self.waitFor(lambda: r.messages(), what="server KEXINIT")
        offered = r.serverKexinit()
        algorithms = [a for k, v in offered.items() if not k.startswith("comp") for a in v]
        for bad in (b"none", b"zlib", b"zlib@openssh.com", b"hmac-sha1", b"ssh-dss", b"ssh-rsa"):
            self.assertNotIn(bad, algorithms)
        self.assertEqual(offered["comp_cs"], [b"none"])
        self.assertFalse([c for c in offered["cipher_cs"] if b"cbc" in c])
        yield self.assertServing()


# ---------------------------------------------------------------------------
# (b) Authentication and authorisation
# ---------------------------------------------------------------------------


def rsa_blob(bits: int) -> bytes:
    """An ssh-rsa public blob with a random odd modulus of ``bits`` bits (never signs)."""
    n = int.from_bytes(os.urandom(bits // 8), "big") | (1 << (bits - 1)) | 1
    return NS(b"ssh-rsa") + rawssh.common.MP(65537) + rawssh.common.MP(n)


def pty_shell(conn: Any, sender: int) -> None:
    modes = b"\0"
    conn.transport.sendPacket(
        98,
        struct.pack(">L", sender)
        + NS(b"pty-req")
        + b"\x01"
        + NS(b"xterm")
        + struct.pack(">4L", 80, 24, 0, 0)
        + NS(modes),
    )


class B_AuthTests(ThreatMixin, unittest.TestCase):
    """THREATS section (b): cases 13 to 23."""

    settings = {"per_source_penalty_exempt_list": "127.0.0.1"}

    @defer.inlineCallbacks
    def restart(self, **overrides: str) -> Any:
        yield self.stopServer()
        self.startServer(**overrides)

    @defer.inlineCallbacks
    def test_13_denied_wins(self) -> Any:
        """Case 13: access="denied" refuses at USERAUTH, also with admin or on another line."""
        k1 = self.key("d1", options='access="listen",access="denied"')
        k2 = self.key("d2", options='access="admin",access="denied"')
        k3 = self.key("d3", options='access="listen"')
        with open(k3 + ".pub") as handle:
            self.addAuthorized(" ".join(handle.read().split()[:2]), 'access="denied"', "again")
        for key in (k1, k2, k3):
            out, err, code = yield self.ssh(key, "someone", command=("whoami",))
            self.assertEqual(code, 255, err)
            self.assertIn(b"nuttconch: this key is denied", err)
            self.assertIn(b"Permission denied (publickey)", err)
        self.assertEqual(self.factory.portal.realm.avatars, 0)
        self.assertIn("login refused for someone: denied", self.logs.out.getvalue())
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_14_from_semantics(self) -> Any:
        """Case 14: from= matches like OpenSSH; invalid patterns and hostnames fail closed,
        and with use_dns off no DNS lookup is ever made (issue 12.2 made hostname patterns
        look names up by default; tests/test_key_options.py covers that)."""
        yield self.restart(per_source_penalty_exempt_list="127.0.0.0/8", use_dns="false")
        table = [
            ('from="127.0.0.2"', True),
            ('from="127.0.0.0/24"', True),
            ('from="127.0.0.0/24,!127.0.0.2"', False),
            ('from="127.0.0.0/8",from="127.0.0.2"', True),
            ('from="127.0.0.0/8",from="127.0.0.3"', False),
            ('from="127.0.0.*"', True),
            ('from="::ffff:127.0.0.2"', True),
            ('from="::1"', False),
            ('from="localhost"', False),
            ('from="1.2.3.0/33,127.0.0.2"', False),
        ]
        lookups: list[Any] = []
        for name in ("gethostbyaddr", "getnameinfo", "getaddrinfo", "gethostbyname"):
            real = getattr(socket, name)

            def counting(*a: Any, _real: Any = real, _name: str = name) -> Any:
                lookups.append((_name, a))
                return _real(*a)

            self.patch(socket, name, counting)
        got = []
        for i, (options, _) in enumerate(table):
            key = self.key(f"from{i}", options=f'access="listen",{options}')
            out, err, code = yield self.ssh(key, f"f{i}", "-b", "127.0.0.2", command=("whoami",))
            got.append((options, code == 0))
        self.assertEqual(got, table)
        self.assertTrue(authkeys.match_from("127.0.0.1", "::ffff:127.0.0.1"))
        self.assertFalse(authkeys.match_from("*.example.org", "127.0.0.1", "127.0.0.1"))
        self.assertEqual([x for x in lookups if x[0] != "getaddrinfo"], [])
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_15_parser_robustness(self) -> Any:
        """Case 15: a bad authorized_keys line is ignored (its key gets nothing), good lines
        work, and one warning per bad line is logged once per reload."""
        good = self.key("good")
        bad = self.key("bad")
        goodPub = open(good + ".pub").read().split()
        badPub = " ".join(open(bad + ".pub").read().split()[:2])
        badLines = [
            f'access="nonsense" {badPub}',
            f'nosuchoption="x" {badPub}',
            f'access="listen {badPub}',
            f'access="listen", {badPub}',
            f'hostname="a",hostname="b" {badPub}',
            f'expiry-time="notatime" {badPub}',
            f'access="listen",from="{"1," * 9000}" {badPub}',
            "ssh-ed25519 AAAA!!notbase64 broken",
        ]
        with open(self.akfile, "wb") as handle:
            handle.write(b"\xef\xbb\xbf# comment after a BOM\r\n")
            for line in badLines:
                handle.write(line.encode() + b"\r\n")
            handle.write(
                f'access=listen,hostname="gw\\"x" {goodPub[0]} {goodPub[1]} g\r\n'.encode()
            )
        # The parser on its own: each bad line is one error, the good line survives.
        entries, errors = authkeys.parse_text(self.readKeys().decode("utf-8-sig"))
        self.assertEqual(len(errors), len(badLines), errors)
        self.assertEqual(len(entries), 1)
        self.assertEqual(entries[0].access, frozenset({"listen"}))
        self.assertEqual(entries[0].hostname, 'gw"x')
        self.assertEqual(authkeys.parse_text(f"{goodPub[0]} {goodPub[1]}")[0][0].access, set())
        # End to end: the good key logs in (its odd hostname is refused as a name), the
        # key on bad lines is refused.
        out, err, code = yield self.ssh(good, "good", command=("whoami",))
        self.assertIn(b"hostname option", err)
        out, err, code = yield self.ssh(bad, "bad", command=("whoami",))
        self.assertEqual(code, 255, err)
        self.factory.checkKeys()
        warnings = [x for x in self.logs.lines() if "line ignored" in x]
        self.assertEqual(len(warnings), len(badLines), warnings)
        yield self.assertServing()

    def test_16_parser_fuzz_and_round_trip(self) -> None:
        """Case 16: arbitrary option strings raise only AuthorizedKeyError; serialise round-trips
        (examples: NUTTCONCH_FUZZ_EXAMPLES, default 300)."""
        from hypothesis import HealthCheck, given, settings
        from hypothesis import strategies as st

        pub = open(self.legit + ".pub").read().split()
        keyPart = f"{pub[0]} {pub[1]}"
        examples = int(os.environ.get("NUTTCONCH_FUZZ_EXAMPLES", "300"))
        alphabet = st.sampled_from(list('ab=",\\ \t!*#\x00\n\r\u00e9cesfromlia'))

        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.text(alphabet=alphabet, max_size=80) | st.text(max_size=40))
        def fuzz(options: str) -> None:
            try:
                entry = authkeys.parse_line(f"{options} {keyPart} c")
            except authkeys.AuthorizedKeyError:
                return
            if entry is None:
                return
            try:
                text = authkeys.serialise(entry)
            except authkeys.AuthorizedKeyError:
                return
            again = authkeys.parse_line(text)
            assert again is not None
            assert (again.options, again.blob, again.keytype) == (
                entry.options,
                entry.blob,
                entry.keytype,
            ), (options, text)

        fuzz()

    @defer.inlineCallbacks
    def test_17_name_hijack(self) -> Any:
        """Case 17: another key using the name prod, K1's alias as user name, or a reconnect,
        never takes K1's routes; same-key reconnect takes index 0."""
        k1 = self.key("k1", options='access="initiate",alias="prod"')
        echo1 = listen_echo(self, b"K1:")
        echo2 = listen_echo(self, b"K2:")
        p1 = yield self.initiator(k1, "gw1", f"22:localhost:{echo1}")
        [l1] = self.registry.listeners()
        generated = l1.aliases[0]
        k2 = self.key("k2")  # accepted on first use
        for user in ("prod", generated):
            proc = self.spawn(k2, user, "-N", "-R", f"22:localhost:{echo2}", stdin=None)
            yield self.waitFor(lambda: len(self.registry.listeners()) == 2, what="K2")
            [l2] = [x for x in self.registry.listeners() if x is not l1]
            self.assertNotIn("prod", l2.aliases)
            self.assertNotIn(generated, l2.aliases)
            for target in ("prod", generated):
                out, err, code = yield self.ssh(self.legit, "legit", "-W", f"{target}:22")
                self.assertTrue(out.startswith(b"K1:"), (user, target, out, err))
            yield proc.kill()
            yield self.waitFor(lambda: len(self.registry.listeners()) == 1, what="K2 gone")
        # Aliases are keyed by the server secret: another secret gives another alias.
        from nuttconch.names import generated_alias

        self.assertNotEqual(generated_alias(b"other", l1.fingerprint.encode(), "gw1"), generated)
        # Same-key reconnect: the new connection is index 0, the old one ~1, then it goes.
        echo3 = listen_echo(self, b"K1b:")
        p1b = yield self.initiator(k1, "gw1", f"22:localhost:{echo3}")
        yield self.waitFor(lambda: len(self.registry.listeners()) == 2, what="reconnect")
        out, _, _ = yield self.ssh(self.legit, "legit", "-W", "prod:22")
        self.assertTrue(out.startswith(b"K1b:"), out)
        out, _, _ = yield self.ssh(self.legit, "legit", "-W", "prod~1:22")
        self.assertTrue(out.startswith(b"K1:"), out)
        yield p1.kill()
        yield self.waitFor(lambda: len(self.registry.listeners()) == 1, what="old gone")
        out, _, _ = yield self.ssh(self.legit, "legit", "-W", "prod:22")
        self.assertTrue(out.startswith(b"K1b:"), out)
        yield p1b.kill()

    @defer.inlineCallbacks
    def test_18_tofu_option_injection(self) -> Any:
        """Case 18: hostile user names never add options or lines to authorized_keys."""
        names = [
            b'a",access="admin',
            b"a\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJunk attacker",
            b"a\\",
            b"a b",
            b'a,alias="prod"',
            b"x" * 300,
            b"a\0b",
            b"\xc3\x28",
            b"#comment",
        ]
        before = self.readKeys()
        for i, name in enumerate(names):
            key = self.key(f"inj{i}")
            c = yield connect_client(self.port, key=key, user=name)
            self.assertFalse(c.authenticated, name)
        self.assertEqual(self.readKeys(), before)
        # A well-formed name is appended as exactly one line with only the TOFU access.
        key = self.key("fine")
        c = yield self.client(key, b"fine.host-1")
        self.assertTrue(c.authenticated)
        entries, errors = authkeys.parse_text(self.readKeys().decode())
        self.assertEqual(errors, [])
        self.assertEqual(len(self.readKeys().splitlines()), len(before.splitlines()) + 1)
        self.assertEqual(entries[-1].access, frozenset({"initiate", "listen"}))
        self.assertEqual(entries[-1].comment, "fine.host-1@127.0.0.1")
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_19_tofu_race(self) -> Any:
        """Case 19: 50 new keys logging in at once while an admin edits the file with sed -i
        add exactly 50 well-formed lines and lose no admin edit."""
        yield self.restart(max_startups="200", per_source_max_startups="200")
        self.legit = self.key("legit3", options='access="listen",access="initiate"')
        count = 50
        paths = [self.key(f"race{i}") for i in range(count)]
        logins = [
            connect_client(self.port, key=p, user=f"race{i}".encode()) for i, p in enumerate(paths)
        ]
        sed = subprocess.Popen(["sed", "-i", "1i # admin edit", self.akfile])
        results = yield defer.gatherResults(logins)
        yield task.deferLater(reactor, 0, lambda: None)
        self.assertEqual(sed.wait(10), 0)
        for c in results:
            self.assertTrue(c.authenticated, c.banner)
        data = self.readKeys().decode()
        entries, errors = authkeys.parse_text(data)
        self.assertEqual(errors, [])
        self.assertIn("# admin edit\n", data)
        added = [e for e in entries if e.comment.startswith("race")]
        self.assertEqual(len(added), count)
        self.assertTrue(data.endswith("\n"))
        out, err, code = yield self.ssh(self.legit, "legit3", command=("whoami",))
        self.assertEqual(code, 0, err)

    @defer.inlineCallbacks
    def test_20_tofu_only_after_proof(self) -> Any:
        """Case 20: a query without signature, a bad signature, a from=-denied key or a pre-kex
        USERAUTH never writes authorized_keys."""
        other = self.key("other")
        victim = self.key("victim")
        fromDenied = self.key("fromdenied", options='access="listen",from="10.9.9.9"')
        before = self.readKeys()
        mtime = os.stat(self.akfile).st_mtime_ns
        c = yield connect_client(self.port, key=victim, user=b"v", sign_with=None)
        self.assertFalse(c.authenticated)
        c = yield connect_client(self.port, key=victim, user=b"v", sign_with=other)
        self.assertFalse(c.authenticated)
        self.assertIn(b"bad signature", c.banner)
        c = yield connect_client(self.port, key=fromDenied, user=b"v")
        self.assertFalse(c.authenticated)
        self.assertIn(b"not allowed from 127.0.0.1", c.banner)
        r = yield self.raw(rawssh.SSH_VERSION + packet(bytes([50]) + NS(b"v")))
        yield r.waitClosed()
        self.assertEqual(self.readKeys(), before)
        self.assertEqual(os.stat(self.akfile).st_mtime_ns, mtime)
        self.assertEqual(self.registry.listeners(), [])
        self.assertEqual(self.factory.portal.realm.avatars, 0)
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_21_pipelined_and_duplicate_auth(self) -> Any:
        """Case 21: pipelined signed USERAUTH_REQUESTs give one success, one avatar, one logout;
        a user name change disconnects."""
        created: list[Any] = []
        realLoggedIn = self.factory.loggedIn
        self.patch(self.factory, "loggedIn", lambda a: (created.append(a), realLoggedIn(a)))
        for n in (4, 100):
            key = keys.Key.fromFile(self.key(f"pipe{n}"))  # new key: asynchronous TOFU checker
            c = yield self.client(stage="userauth")
            request = rawssh.sign_userauth(c.sessionID, b"pipe", key)
            del created[:]
            for _ in range(n):
                c.sendPacket(50, request)
            yield task.deferLater(reactor, 0.5, lambda: None)
            successes = [m for m in c.inbox.messages if m[0] == 52]
            self.assertLessEqual(len(successes), 1, n)
            self.assertLessEqual(len(created), 1, n)
            if not c.isLost:
                # USERAUTH after success is ignored.
                c.sendPacket(50, request)
                c.close()
            yield self.waitFor(lambda: all(a.loggedOut for a in created), what="logouts")
            yield self.waitFor(lambda: not self.factory.transports, what="connection gone")
            self.assertEqual(self.factory.avatars, set())
        c = yield self.client(stage="userauth")
        key = keys.Key.fromFile(self.key("changer"))
        c.sendPacket(50, rawssh.sign_userauth(c.sessionID, b"one", key, b"ssh-nope"))
        c.sendPacket(50, rawssh.sign_userauth(c.sessionID, b"two", key))
        yield c.waitLost()
        self.assertEqual(c.disconnect[0], DISCONNECT_PROTOCOL_ERROR)
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_22_brute_force_bounds(self) -> Any:
        """Case 22: the 7th failed key is never tried, 'none' is capped, the source is penalised,
        huge RSA blobs are cheap to refuse and RSA < 2048 bits is rejected."""
        yield self.restart(allow_new_clients="false")
        self.legit = self.key("legit4", options='access="listen",access="initiate"')
        idents = []
        for i in range(8):
            idents += ["-i", self.key(f"bf{i}")]
        calls = self.factory.checker.calls
        out, err, code = yield self.ssh(None, "bf", "-b", "127.0.0.2", *idents, command=("true",))
        self.assertEqual(code, 255)
        self.assertLessEqual(self.factory.checker.calls - calls, 6)
        # 10^4 'none' requests: disconnected at the cap, the checker never asked.
        c = yield self.client(stage="userauth")
        calls = self.factory.checker.calls
        none = NS(b"u") + NS(b"ssh-connection") + NS(b"none")
        for _ in range(10000):
            if c.isLost:
                break
            c.sendPacket(50, none)
        yield c.waitLost()
        self.assertEqual(self.factory.checker.calls, calls)
        self.assertIsNotNone(c.disconnect)
        # A 16384-bit RSA blob and a 1024-bit one: answered at once, the small one refused.
        c = yield self.client(stage="userauth")
        for bits in (16384, 1024):
            blob = rsa_blob(bits)
            started = time.monotonic()
            c.sendPacket(
                50,
                NS(b"u")
                + NS(b"ssh-connection")
                + NS(b"publickey")
                + b"\0"
                + NS(b"rsa-sha2-256")
                + NS(blob),
            )
            num, payload = yield c.inbox.expect((51, 60))
            self.assertLess(time.monotonic() - started, 1.0)
            self.assertEqual(num, 51, bits)
        banners = b"".join(rawssh.common.getNS(p)[0] for n, p in c.inbox.messages if n == 53)
        self.assertIn(b"RSA keys need at least 2048 bits", banners)
        # Repeated failures from 127.0.0.2 get the source refused; 127.0.0.1 is exempt.
        for _ in range(3):
            yield self.ssh(None, "bf", "-b", "127.0.0.2", *idents[:2], command=("true",))
        self.assertTrue(self.factory.penalties.refused("127.0.0.2"))
        dropped = self.factory.dropped
        out, err, code = yield self.ssh(self.legit, "legit4", "-b", "127.0.0.2", command=("true",))
        self.assertEqual(code, 255)
        self.assertGreater(self.factory.dropped, dropped)
        out, err, code = yield self.ssh(self.legit, "legit4", command=("whoami",))
        self.assertEqual(code, 0, err)

    @defer.inlineCallbacks
    def test_23_permission_matrix(self) -> Any:
        """Case 23: each access set allows exactly its actions (forward, circuit, listeners,
        shell), as SPEC.md's table."""
        yield self.echoInitiator("target", 7100)
        target = self.registry.listeners()[0].connect_name.encode()
        matrix = {
            # access: (forward, circuit, listeners, shell)
            'access="listen"': (False, True, False, False),
            'access="initiate"': (True, False, False, False),
            'access="list"': (False, False, True, False),
            'access="admin"': (False, False, False, True),
            "": (False, False, False, False),
            'access="listen",access="initiate"': (True, True, False, False),
        }
        got = {}
        for i, options in enumerate(matrix):
            c = yield self.authed(options, name=f"perm{i}")
            num, _ = yield c.conn.globalRequest(
                b"tcpip-forward", NS(b"") + struct.pack(">L", 9000 + i)
            )
            forward = num == 81
            num, _ = yield c.conn.openRaw(b"direct-tcpip", direct_tcpip(target, 7100))
            circuit = num == 91
            num, payload = yield c.conn.openRaw(b"session", sender=1)
            remote = struct.unpack(">2L", payload[:8])[1]
            c.sendPacket(98, struct.pack(">L", remote) + NS(b"exec") + b"\0" + NS(b"listeners"))
            _, status = yield c.inbox.expect(98, channel=1)
            listeners = status.endswith(struct.pack(">L", 0))
            num, payload = yield c.conn.openRaw(b"session", sender=2)
            remote = struct.unpack(">2L", payload[:8])[1]
            pty_shell(c.conn, remote)
            c.sendPacket(98, struct.pack(">L", remote) + NS(b"shell") + b"\0")
            text = b""
            # A key with no shell and no virtual port is told why on stderr (issue 12.5).
            ends = (b"nuttconch> ", b"Welcome", b"no interactive shell")
            while not any(end in text for end in ends):
                num, data = yield c.inbox.expect((94, 95), channel=2)
                text += rawssh.common.getNS(data[8:] if num == 95 else data[4:])[0]
            yield task.deferLater(reactor, 0.05, lambda: None)
            for n, p in list(c.inbox.messages):
                if n == 94 and p[:4] == struct.pack(">L", 2):
                    text += rawssh.common.getNS(p[4:])[0]
            shell = b"nuttconch> " in text
            got[options] = (forward, circuit, listeners, shell)
            c.close()
        self.assertEqual(got, matrix)
        yield self.assertServing()


# ---------------------------------------------------------------------------
# (c) Resource exhaustion (load cases 24, 26, 28, 29: tests.test_stress)
# ---------------------------------------------------------------------------


class _Source(protocol.Protocol):
    """Behind an initiator: writes a fixed stream as fast as the circuit takes it, then closes."""

    def connectionMade(self) -> None:
        from twisted.protocols.basic import FileSender

        data = self.factory.data  # type: ignore[attr-defined]
        d = FileSender().beginFileTransfer(io.BytesIO(data), self.transport)
        d.addCallback(lambda _: self.transport.loseConnection())


def listen_source(testcase: Any, data: bytes) -> int:
    factory = protocol.Factory.forProtocol(_Source)
    factory.data = data  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return port.getHost().port


def server_buffered(factory: Any) -> int:
    """Bytes the server holds for its connections: TCP write buffers and channel buffers."""
    total = 0
    for t in factory.transports:
        tcp = t.transport
        total += len(getattr(tcp, "dataBuffer", b""))
        total += sum(len(x) for x in getattr(tcp, "_tempDataBuffer", []))
        service = getattr(t, "service", None)
        for chan in getattr(service, "channels", {}).values():
            total += len(chan.buf)
    return total


class C_ResourceTests(ThreatMixin, unittest.TestCase):
    """THREATS section (c): cases 25, 27 and 30."""

    @defer.inlineCallbacks
    def test_25_slowloris_at_each_stage(self) -> Any:
        """Case 25: a client stalling after KEXINIT, NEWKEYS or SERVICE_ACCEPT, or sending 'none'
        now and then, is closed at the handshake deadline measured from accept."""
        clock = task.Clock()
        self.factory.clock = clock
        grace = self.config.login_grace_time
        r = yield self.raw(rawssh.SSH_VERSION + packet(rawssh.kexinit()))
        kex = yield self.client(stage="kex")
        ua = yield self.client(stage="userauth")
        nones = yield self.client(stage="userauth")
        none = NS(b"u") + NS(b"ssh-connection") + NS(b"none")
        while clock.seconds() < grace - 1:
            nones.sendPacket(50, none)
            yield task.deferLater(reactor, 0.01, lambda: None)
            clock.advance(min(9.0, grace - 1 - clock.seconds()))
        self.assertEqual([x.isLost for x in (kex, ua, nones)], [False] * 3)
        self.assertIsNone(r.closedAt)
        clock.advance(1.5)
        yield r.waitClosed()
        for c in (kex, ua, nones):
            yield c.waitLost()
        self.factory.clock = reactor
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_27_fast_sender_slow_reader(self) -> Any:
        """Case 27: a stalled reader keeps the server's buffering near one window per direction,
        and after resume the stream arrives intact."""
        data = os.urandom(24 * 1024 * 1024)
        source = listen_source(self, data)
        key = self.key("fast", options='access="initiate"')
        yield self.initiator(key, "fast", f"7200:localhost:{source}")
        name = self.registry.listeners()[0].connect_name
        proc = self.spawn(self.legit, "legit", "-W", f"{name}:7200", stdin=None)
        proc.transport.pauseProducing()
        yield self.waitFor(lambda: self.factory.circuitsOpened, what="circuit")
        peak = 0
        for _ in range(20):
            yield task.deferLater(reactor, 0.1, lambda: None)
            peak = max(peak, server_buffered(self.factory))
        window = self.config.channel_window
        self.assertLess(peak, 2 * window + 1024 * 1024, peak)
        proc.transport.resumeProducing()
        out, err, code = yield proc.ended.addTimeout(60, reactor)
        self.assertEqual(len(out), len(data), err[-500:])
        self.assertEqual(hashlib.sha256(out).digest(), hashlib.sha256(data).digest())
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_30_hung_initiator(self) -> Any:
        """Case 30: an initiator that never answers CHANNEL_OPEN makes the client's open fail
        within the open timeout; other initiators are unaffected."""
        yield self.stopServer()
        self.startServer(channel_open_timeout="1")
        self.legit = self.key("legit5", options='access="listen",access="initiate"')
        hung = yield self.authed('access="initiate"', name="hung")
        num, _ = yield hung.conn.globalRequest(b"tcpip-forward", NS(b"") + struct.pack(">L", 80))
        self.assertEqual(num, 81)
        hungName = self.registry.listeners()[0].connect_name
        yield self.echoInitiator("healthy", 7100, b"OK:")
        healthy = [x for x in self.registry.listeners() if x.hostname == "healthy"][0]
        started = time.monotonic()
        stuck = self.ssh(self.legit, "legit5", "-W", f"{hungName}:80")
        out, err, code = yield self.ssh(self.legit, "legit5", "-W", f"{healthy.connect_name}:7100")
        self.assertEqual(out, b"OK:")
        out, err, code = yield stuck
        self.assertLess(time.monotonic() - started, 3)
        self.assertEqual(code, 255)
        self.assertIn(b"initiator did not answer in time", err)
        for t in self.factory.transports:
            self.assertEqual(getattr(t.service, "pendingOpens", {}), {})


# ---------------------------------------------------------------------------
# (d) Faults
# ---------------------------------------------------------------------------


class D_FaultTests(ThreatMixin, unittest.TestCase):
    """THREATS section (d): cases 31 to 36."""

    @defer.inlineCallbacks
    def test_31_initiator_dies_with_fin(self) -> Any:
        """Case 31: kill -9 of the initiator ends the client's circuit at once and unregisters
        the name."""
        proc, listener = yield self.echoInitiator()
        name = listener.connect_name
        client = self.spawn(self.legit, "legit", "-W", f"{name}:7100", stdin=None)
        yield client.waitOutput(b"DEV:")
        killed = time.monotonic()
        proc.transport.signalProcess("KILL")
        yield client.ended.addTimeout(5, reactor)
        self.assertLess(time.monotonic() - killed, 1.5)
        yield self.waitFor(lambda: not self.registry.listeners(), what="unregistered")
        out, err, code = yield self.ssh(self.legit, "legit", "-W", f"{name}:7100")
        self.assertIn(b"no such listener", err)
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_31_initiator_blackholed(self) -> Any:
        """Case 31: a blackholed initiator is dropped after keepalive interval x count, and its
        names go."""
        clock = task.Clock()
        self.factory.clock = clock
        c = yield self.authed('access="initiate"', name="hole")
        num, _ = yield c.conn.globalRequest(b"tcpip-forward", NS(b"") + struct.pack(">L", 80))
        self.assertEqual(num, 81)
        c.playDead = True
        interval = self.config.client_alive_interval
        for _ in range(self.config.client_alive_count_max):
            clock.advance(interval)
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertFalse(c.isLost)
        clock.advance(interval)
        yield c.waitLost()
        self.assertIn(b"keepalive", c.disconnect[1])
        self.assertEqual(self.registry.listeners(), [])
        self.factory.clock = reactor
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_32_client_dies_and_half_close(self) -> Any:
        """Case 32: a killed client closes the initiator's channel; EOF one way lets 10 MiB
        come back intact."""
        proc, listener = yield self.echoInitiator(tag=b"")
        initiatorConn = listener.opener.conn
        client = self.spawn(self.legit, "legit", "-W", f"{listener.connect_name}:7100", stdin=None)
        yield self.waitFor(lambda: initiatorConn.channels, what="circuit")
        client.transport.signalProcess("KILL")
        yield self.waitFor(lambda: not initiatorConn.channels, what="initiator end closed")
        data = os.urandom(10 * 1024 * 1024)
        out, err, code = yield self.ssh(
            self.legit, "legit", "-W", f"{listener.connect_name}:7100", stdin=data, timeout=60
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(hashlib.sha256(out).digest(), hashlib.sha256(data).digest())
        yield self.assertServing()

    def spawnAutossh(self, key: str, user: str, forward: str) -> SSHProcess:
        args = self.sshArgs(key, user, "-N", "-R", forward, "-o", "ServerAliveInterval=1")
        argv = [AUTOSSH or "autossh", "-M", "0", *args[1:]]
        proc = SSHProcess(None)
        env = {"PATH": os.environ.get("PATH", ""), "AUTOSSH_GATETIME": "0", "AUTOSSH_POLL": "1"}
        reactor.spawnProcess(proc, argv[0], argv, env=env)
        self.processes.append(proc)
        return proc

    @defer.inlineCallbacks
    def restartServer(self, graceful: bool) -> Any:
        port = self.port
        yield self.listening.stopListening()
        if graceful:
            yield self.factory.disconnectAll()
        else:
            for t in list(self.factory.transports):
                t.transport.abortConnection()
            yield task.deferLater(reactor, 0.05, lambda: None)
        from nuttconch.tap import build

        self.factory, self.registry = build(self.config)
        self.listening = reactor.listenTCP(port, self.factory, interface="127.0.0.1")

    @defer.inlineCallbacks
    def test_33_server_restart_with_autossh(self) -> Any:
        """Case 33: autossh initiators re-register under the same names after a graceful stop
        (which sends DISCONNECT) and after a hard kill."""
        if AUTOSSH is None:
            raise RuntimeError("autossh is not installed")
        count = int(os.environ.get("NUTTCONCH_AUTOSSH_COUNT", "3"))
        for i in range(count):
            key = self.key(f"auto{i}", options='access="initiate"')
            self.spawnAutossh(key, f"auto{i}", f"{7300 + i}:localhost:{listen_echo(self)}")
        yield self.waitFor(lambda: len(self.registry.listeners()) == count, 20, "autossh up")
        names = sorted(x.connect_name for x in self.registry.listeners())
        watcher = yield self.authed('access="listen"', name="watcher")
        for graceful in (True, False):
            started = time.monotonic()
            yield self.restartServer(graceful)
            yield self.waitFor(lambda: len(self.registry.listeners()) == count, 30, "autossh back")
            self.assertEqual(sorted(x.connect_name for x in self.registry.listeners()), names)
            self.assertLess(time.monotonic() - started, 20)
        self.assertEqual(watcher.disconnect, (11, b"server is shutting down"))
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_34_disk_full_during_tofu_append(self) -> Any:
        """Case 34: ENOSPC or EIO during a TOFU append refuses the login, leaves no partial
        line, and the next append works."""
        realWrite = os.write
        akfile = os.path.realpath(self.akfile)

        for code in (errno.ENOSPC, errno.EIO):

            def failingWrite(fd: int, data: Any, _code: int = code) -> int:
                try:
                    target = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    target = ""
                if target == akfile:
                    realWrite(fd, bytes(data)[:7])  # a partial line reaches the disk
                    raise OSError(_code, os.strerror(_code))
                return realWrite(fd, data)

            self.patch(authkeys.os, "write", failingWrite)
            before = self.readKeys()
            key = self.key(f"full{code}")
            c = yield connect_client(self.port, key=key, user=b"full")
            self.assertFalse(c.authenticated)
            self.assertIn(b"cannot persist your key", c.banner)
            self.assertEqual(self.readKeys(), before)
            self.patch(authkeys.os, "write", realWrite)
            c = yield self.client(key, b"full")
            self.assertTrue(c.authenticated, c.banner)
            self.assertEqual(len(self.readKeys().splitlines()), len(before.splitlines()) + 1)
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_34_tmpfs_full(self) -> Any:
        """Case 34: on a full 64 KiB tmpfs the TOFU login is refused and the file keeps only
        complete lines."""
        if os.geteuid() != 0:
            missing("root (this test mounts a tmpfs)", "run the tests as root, as CI does")
        mnt = os.path.join(self.dir, "tmpfs")
        os.makedirs(mnt)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", mnt], check=True)
        self.addCleanup(subprocess.run, ["umount", "-l", mnt])
        shutil.copy(self.akfile, os.path.join(mnt, "authorized_keys"))
        with open(os.path.join(mnt, "authorized_keys"), "ab") as handle:
            # Fill the file's last page, so that an append needs a new one.
            size = handle.tell()
            handle.write(b"#" * (4096 - size - 1) + b"\n")
        with open(os.path.join(mnt, "filler"), "wb", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 4096)
            except OSError:
                pass
        self.factory.keysFile.path = os.path.join(mnt, "authorized_keys")
        self.factory.checker.keys_file.path = self.factory.keysFile.path
        with open(self.factory.keysFile.path, "rb") as handle:
            before = handle.read()
        c = yield connect_client(self.port, key=self.key("tmpfskey"), user=b"tmpfs")
        with open(self.factory.keysFile.path, "rb") as handle:
            after = handle.read()
        self.assertFalse(c.authenticated)
        self.assertEqual(after, before)
        os.unlink(os.path.join(mnt, "filler"))
        c = yield connect_client(self.port, key=os.path.join(self.dir, "tmpfskey"), user=b"tmpfs")
        self.assertTrue(c.authenticated, c.banner)
        c.close()
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_35_authorized_keys_changed_while_running(self) -> Any:
        """Case 35: appends, removals, access changes, renames, truncation, half lines and
        deletion take effect; removed keys' connections close; a missing file fails closed."""
        yield self.stopServer()
        self.startServer(allow_new_clients="false")
        self.legit = self.key("legit6", options='access="listen",access="initiate"')
        good = self.readKeys()
        newKey = self.key("late")
        late = " ".join(open(newKey + ".pub").read().split()[:2])

        @defer.inlineCallbacks
        def can(key: str, user: str = "late") -> Any:
            c = yield connect_client(self.port, key=key, user=user.encode())
            c.close()
            return c.authenticated

        self.assertFalse((yield can(newKey)))
        self.addAuthorized(late, 'access="listen"', "late")
        self.assertTrue((yield can(newKey)))
        # A live session whose access changes keeps running with the new access at once;
        # the session of a removed key is closed.
        session = yield self.client(newKey, b"late")
        with open(self.akfile, "wb") as handle:
            handle.write(good + f'access="initiate" {late} late\n'.encode())
        self.factory.checkKeys()
        live = [a for a in self.factory.avatars if a.identity.hostname == "late"]
        self.assertEqual([a.identity.access for a in live], [frozenset({"initiate"})])
        tmp = self.akfile + ".new"
        with open(tmp, "wb") as handle:
            handle.write(good)
        os.replace(tmp, self.akfile)  # an editor's atomic rename
        self.factory.checkKeys()
        yield session.waitLost()
        self.assertFalse((yield can(newKey)))
        # A half-written line is ignored; the other lines keep working.
        with open(self.akfile, "ab") as handle:
            handle.write(f'access="listen" {late[:40]}'.encode())
        self.assertFalse((yield can(newKey)))
        self.assertTrue((yield can(self.legit, "legit6")))
        # Truncation to 0 bytes: nobody gets in, existing sessions of the keys are closed.
        session = yield self.client(self.legit, b"legit6")
        with open(self.akfile, "wb"):
            pass
        self.factory.checkKeys()
        yield session.waitLost()
        self.assertFalse((yield can(self.legit, "legit6")))
        # chmod 000 (root still reads it) and deletion: the server stays up, fails closed.
        with open(self.akfile, "wb") as handle:
            handle.write(good)
        os.chmod(self.akfile, 0)
        self.factory.checkKeys()
        self.assertEqual((yield can(self.legit, "legit6")), os.geteuid() == 0)
        os.chmod(self.akfile, 0o600)
        session = yield self.client(self.legit, b"legit6")
        os.unlink(self.akfile)
        self.factory.checkKeys()
        c = yield connect_client(self.port, key=self.legit, user=b"legit6")
        self.assertFalse(c.authenticated)
        self.assertIn(b"cannot read its authorized keys", c.banner)
        self.assertFalse(session.isLost)
        self.assertIn("unavailable", self.logs.out.getvalue())
        with open(self.akfile, "wb") as handle:
            handle.write(good)
        out, err, code = yield self.ssh(self.legit, "legit6", command=("whoami",))
        self.assertEqual(code, 0, err)

    @defer.inlineCallbacks
    def test_36_exception_containment(self) -> Any:
        """Case 36: an exception in tcpip-forward, lookupChannel, the TOFU writer or a command
        fails only that request, with a clean reply."""
        from nuttconch.avatar import SwitchboardAvatar

        def boom(*a: Any, **kw: Any) -> Any:
            raise RuntimeError("injected")

        c = yield self.authed()
        patches = [self.patch(SwitchboardAvatar, "global_tcpip_forward", boom)]
        num, _ = yield c.conn.globalRequest(b"tcpip-forward", NS(b"") + struct.pack(">L", 80))
        self.assertEqual(num, 82)
        self.assertEqual(self.registry.listeners(), [])
        patches.append(self.patch(SwitchboardAvatar, "lookupChannel", boom))
        num, _ = yield c.conn.openRaw(b"session")
        self.assertEqual(num, 92)
        patches.append(self.patch(authkeys.AuthorizedKeysFile, "append", boom))
        t = yield connect_client(self.port, key=self.key("boomkey"), user=b"boom")
        self.assertFalse(t.authenticated)
        self.addCleanup(commands.COMMANDS.__setitem__, "listeners", commands.COMMANDS["listeners"])
        commands.COMMANDS["listeners"] = boom
        out, err, code = yield self.ssh(self.legit, "legit", command=("listeners",))
        self.assertNotEqual(code, 0)
        self.assertFalse(c.isLost)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)) >= 3, True)
        num, _ = yield c.conn.globalRequest(b"no-such@example.org", b"")
        self.assertEqual(num, 82)
        for p in patches:
            p.restore()
        yield self.assertServing()


# ---------------------------------------------------------------------------
# (e) Security boundaries
# ---------------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class _Canary(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.hits += 1  # type: ignore[attr-defined]
        self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        pass

    def writeConnectionLost(self) -> None:
        pass


class E_BoundaryTests(ThreatMixin, unittest.TestCase):
    """THREATS section (e): cases 37 and 38."""

    @defer.inlineCallbacks
    def test_37_no_real_egress(self) -> Any:
        """Case 37: direct-tcpip to anything but a registered virtual port fails with a reason,
        and the server makes no connect(), no DNS query and opens no listening socket."""
        canary = protocol.Factory.forProtocol(_Canary)
        canary.hits = 0  # type: ignore[attr-defined]
        canaryPort = reactor.listenTCP(0, canary, interface="127.0.0.1")
        self.addCleanup(canaryPort.stopListening)
        cport = canaryPort.getHost().port
        _, listener = yield self.echoInitiator()
        name = listener.connect_name.encode()
        c = yield self.authed()
        calls: list[Any] = []
        for mod, attr in (
            (socket, "getaddrinfo"),
            (socket, "gethostbyname"),
            (socket, "gethostbyaddr"),
            (socket, "create_connection"),
        ):
            real = getattr(mod, attr)
            self.patch(mod, attr, lambda *a, _r=real, _n=attr: (calls.append((_n, a)), _r(*a))[1])
        realConnect = reactor.connectTCP
        self.patch(
            reactor,
            "connectTCP",
            lambda *a, **k: (calls.append(("connectTCP", a)), realConnect(*a, **k))[1],
        )
        realResolve = reactor.resolve
        self.patch(
            reactor,
            "resolve",
            lambda *a, **k: (calls.append(("resolve", a)), realResolve(*a, **k))[1],
        )
        listeningBefore = listening_sockets()
        targets = [
            (b"nosuchname", 80),
            (b"127.0.0.1", cport),
            (b"localhost", self.port),
            (b"169.254.169.254", 80),
            (b"::1", cport),
            (b"[::1]", cport),
            (name, 7999),
            (name + b"~99", 7100),
            (b"example.org", 80),
        ]
        for host, port in targets:
            num, payload = yield c.conn.openRaw(b"direct-tcpip", direct_tcpip(host, port))
            self.assertEqual(num, 92, host)
            self.assertEqual(open_failure_code(payload), OPEN_CONNECT_FAILED, host)
            reason = rawssh.common.getNS(payload[8:])[0]
            self.assertIn(b"no such", reason)
        for port in (22, 0, cport):
            num, _ = yield c.conn.globalRequest(b"tcpip-forward", NS(b"") + struct.pack(">L", port))
            self.assertEqual(num, 81)
        self.assertEqual(canary.hits, 0)  # type: ignore[attr-defined]
        self.assertEqual(calls, [])
        self.assertEqual(listening_sockets(), listeningBefore)
        yield self.assertServing()

    @defer.inlineCallbacks
    def test_38_enumeration_and_leaks(self) -> Any:
        """Case 38: permission errors are uniform, names cannot be probed without listen or list,
        no admin shell via exec or subsystem, and names are escaped for admins."""
        _, listener = yield self.echoInitiator()
        initOnly = self.key("initonly", options='access="initiate"')
        out, err, code = yield self.ssh(initOnly, "io", command=("listeners",))
        self.assertNotEqual(code, 0)
        self.assertIn(b"Permission denied", err)
        self.assertNotIn(listener.connect_name.encode(), out + err)
        c = yield self.authed('access="initiate"', name="prober")
        reasons = []
        for host in (listener.connect_name.encode(), b"nosuchname"):
            num, payload = yield c.conn.openRaw(b"direct-tcpip", direct_tcpip(host, 7100))
            self.assertEqual(num, 92)
            reasons.append((open_failure_code(payload), rawssh.common.getNS(payload[8:])[0]))
        self.assertEqual(reasons[0], reasons[1])
        admin = self.key("admin", options='access="admin"')
        for extra, command in ((("-s",), ("sftp",)), ((), ("shell",)), ((), ("help; whoami",))):
            out, err, code = yield self.ssh(admin, "adm", *extra, command=command)
            self.assertNotEqual(code, 0, (extra, command))
            self.assertNotIn(b"nuttconch> ", out)
        out, err, code = yield self.ssh(
            self.legit, "legit", "-A", "-X", "-o", "SetEnv=EVIL=1", command=("whoami",)
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(escape("a\x1b[2Jb\r\n\x07"), "a\\x1b[2Jb\\r\\n\\x07")
        self.assertNotIn("\x1b", escape("\x1b]0;owned\x07"))
        yield self.assertServing()
