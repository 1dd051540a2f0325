"""PROXY protocol (issue 11.5): read before SSH exists, so the switchboard sees the client.

The server listens as ``tap.listener`` builds it with ``proxy_protocol = true``;
clients are raw sockets that write a header themselves, and the real OpenSSH
client behind a small test proxy that prepends one (as haproxy with
``send-proxy``/``send-proxy-v2`` does).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

from twisted.internet import defer, protocol, reactor, task, threads
from twisted.trial import unittest

from nuttconch.proxyproto import ProxyHeaderError, parse
from nuttconch.tap import listener
from tests.harness import SwitchboardTestMixin


def v2_header(source: str, port: int, dest: str = "127.0.0.1", dport: int = 22) -> bytes:
    """A PROXY v2 PROXY-command header for TCP from ``source``."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(dest)
    if src.version == 4:
        body = src.packed + ipaddress.IPv4Address(dest).packed + struct.pack("!HH", port, dport)
        family = 0x11
    else:
        body = src.packed + ipaddress.IPv6Address(str(dst)).packed + struct.pack("!HH", port, dport)
        family = 0x21
    return b"\r\n\r\n\x00\r\nQUIT\n" + struct.pack("!BBH", 0x21, family, len(body)) + body


def v1_header(source: str, port: int) -> bytes:
    family = "TCP4" if ipaddress.ip_address(source).version == 4 else "TCP6"
    dest = "127.0.0.1" if family == "TCP4" else "::1"
    return f"PROXY {family} {source} {dest} {port} 22\r\n".encode()


V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n" + struct.pack("!BBH", 0x20, 0x00, 0)


class ParseTests(unittest.TestCase):
    """parse(bytes) -> (source host, version, rest) | None (need more) | the error."""

    ROWS: list[tuple[str, bytes, Any]] = [
        ("v1 TCP4", v1_header("203.0.113.7", 5555) + b"SSH-2.0-x\r\n",
         ("203.0.113.7", 1, b"SSH-2.0-x\r\n")),
        ("v1 TCP6", v1_header("2001:db8::5", 1) + b"", ("2001:db8::5", 1, b"")),
        ("v1 UNKNOWN keeps the own address", b"PROXY UNKNOWN\r\nSSH", (None, 1, b"SSH")),
        ("v1 half a line", b"PROXY TCP4 203.0.1", None),
        ("v1 only the first bytes", b"PRO", None),
        ("v1 bad address", b"PROXY TCP4 300.1.1.1 1.1.1.1 1 2\r\n", "bad address"),
        ("v1 family mismatch", b"PROXY TCP4 2001:db8::1 ::1 1 2\r\n", "family"),
        ("v1 bad port", b"PROXY TCP4 1.2.3.4 1.1.1.1 70000 2\r\n", "bad port"),
        ("v1 endless line", b"PROXY TCP4 " + b"1" * 200, "too long"),
        ("v2 TCP4", v2_header("198.51.100.9", 4242) + b"SSH-2.0", ("198.51.100.9", 2, b"SSH-2.0")),
        ("v2 TCP6", v2_header("2001:db8::9", 1, "::1"), ("2001:db8::9", 2, b"")),
        ("v2 LOCAL (health check)", V2_LOCAL + b"x", (None, 2, b"x")),
        ("v2 signature only", v2_header("198.51.100.9", 1)[:14], None),
        ("v2 short body", v2_header("198.51.100.9", 1)[:20], None),
        ("v2 bad version", b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + b"\x00" * 12, "version"),
        ("v2 huge length", b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff", "too long"),
        ("plain SSH client", b"SSH-2.0-OpenSSH_9.2\r\n", "no PROXY protocol header"),
        ("HTTP", b"GET / HTTP/1.1\r\n", "no PROXY protocol header"),
    ]  # fmt: skip

    def test_rows(self) -> None:
        """Each row: a PROXY v1/v2 header parses to its addresses or is refused with a reason."""
        for name, data, expected in self.ROWS:
            if isinstance(expected, str):
                with self.assertRaises(ProxyHeaderError, msg=name) as caught:
                    parse(data)
                self.assertIn(expected, str(caught.exception), name)
                continue
            got = parse(data)
            if expected is None:
                self.assertIsNone(got, name)
                continue
            assert got is not None, name
            header, rest = got
            host = header.source.host if header.source is not None else None  # type: ignore[attr-defined]
            self.assertEqual((host, header.version, rest), expected, name)


class _HeaderProxyClient(protocol.Protocol):
    def connectionMade(self) -> None:
        self.peer = self.factory.peer
        self.peer.client = self
        self.transport.write(self.factory.header + self.peer.pending)
        self.peer.pending = b""
        self.peer.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.peer.transport.loseConnection()


class _HeaderProxyServer(protocol.Protocol):
    """A load balancer in miniature: opens a connection to the switchboard, writes the
    PROXY header, then relays bytes both ways."""

    client: Any = None
    pending = b""

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        factory = protocol.ClientFactory()
        factory.protocol = _HeaderProxyClient
        factory.peer = self  # type: ignore[attr-defined]
        factory.header = self.factory.header  # type: ignore[attr-defined]
        reactor.connectTCP("127.0.0.1", self.factory.target, factory)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.client is None:
            self.pending += data
        else:
            self.client.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.client is not None:
            self.client.transport.loseConnection()


class ProxyMixin(SwitchboardTestMixin):
    timeout = 60
    settings = {"proxy_protocol": "true"}

    def startServer(self, **overrides: str) -> Any:
        """Listen as tap.listener builds it (the header reader in front), not as the harness."""
        result = super().startServer(**overrides)
        self.listening.stopListening()
        self.service, _ = listener(self.config, self.factory)
        self.service.startService()
        self.listening = None
        self.port = self.service._port.getHost().port  # type: ignore[attr-defined]
        self.addCleanup(self.service.stopService)
        return result

    def balancer(self, header: bytes) -> int:
        """A header-prepending proxy in front of the switchboard; returns its port."""
        factory = protocol.Factory.forProtocol(_HeaderProxyServer)
        factory.header = header  # type: ignore[attr-defined]
        factory.target = self.port  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def raw(self, data: bytes) -> defer.Deferred[bytes]:
        """Connect, send ``data``, read what the server sends until it closes or 3 s pass."""

        def run() -> bytes:
            with socket.create_connection(("127.0.0.1", self.port), timeout=3) as sock:
                sock.sendall(data)
                got = b""
                try:
                    while len(got) < 4096:
                        part = sock.recv(4096)
                        if not part:
                            break
                        got += part
                except TimeoutError:
                    pass
                except ConnectionResetError:
                    pass  # an abort: what a refused client sees
                return got

        return threads.deferToThread(run)

    def peers(self) -> set[str]:
        return {t._peerHost for t in self.factory.transports}


class ProxyProtocolTests(ProxyMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_v1_raw(self) -> Any:
        """A v1 header: the SSH banner follows, and the transport's peer is the header's."""
        d = self.raw(v1_header("203.0.113.7", 40000) + b"SSH-2.0-raw\r\n")
        yield self.waitFor(lambda: "203.0.113.7" in self.peers(), 5, "peer from the header")
        got = yield d
        self.assertTrue(got.startswith(b"SSH-2.0-nuttconch"), got[:40])

    @defer.inlineCallbacks
    def test_v2_raw(self) -> Any:
        """A v2 header with IPv6 addresses: the server logs the header's client address."""
        d = self.raw(v2_header("2001:db8::77", 40000, "::1") + b"SSH-2.0-raw\r\n")
        yield self.waitFor(lambda: "2001:db8::77" in self.peers(), 5, "peer from the header")
        got = yield d
        self.assertTrue(got.startswith(b"SSH-2.0-nuttconch"), got[:40])

    @defer.inlineCallbacks
    def test_missing_header_refused(self) -> Any:
        """A client reaching the port around the balancer gets no SSH at all, and the
        refusal is logged once, however many try."""
        lines: list[str] = []
        from twisted.logger import formatEvent, globalLogPublisher

        def observe(event: dict[str, Any]) -> None:
            text = formatEvent(event)
            if "no PROXY protocol header" in text:
                lines.append(text)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        for _ in range(5):
            got = yield self.raw(b"SSH-2.0-OpenSSH_9.2p1\r\n")
            self.assertEqual(got, b"", "not a byte of SSH without the header")
        self.assertEqual(len(lines), 1, lines)
        self.assertEqual(self.factory.transports, set())

    @defer.inlineCallbacks
    def test_real_ssh_v1_and_v2_from_sees_proxied_address(self) -> Any:
        """Real ssh through a header-prepending balancer: ``from=`` is checked against the
        address in the header, not the balancer's 127.0.0.1."""
        key = self.key("dev", options='from="192.0.2.55",access="initiate"')
        for header in (v1_header("192.0.2.55", 1234), v2_header("192.0.2.55", 1234)):
            self.port, switchboard = self.balancer(header), self.port
            try:
                out, err, code = yield self.ssh(key, "dev", "-T", command=("whoami",))
            finally:
                self.port = switchboard
            self.assertEqual(code, 0, err)
        # The same key from another claimed address is refused by from=.
        self.port, switchboard = self.balancer(v2_header("198.51.100.1", 1234)), self.port
        try:
            out, err, code = yield self.ssh(key, "dev", "-T", command=("whoami",))
        finally:
            self.port = switchboard
        self.assertNotEqual(code, 0)
        self.assertIn(b"Permission denied", err)

    @defer.inlineCallbacks
    def test_penalty_applies_to_client_not_balancer(self) -> Any:
        """A client penalised behind the balancer is refused; another client behind the same
        balancer is not (the penalty table holds the header's address)."""
        self.factory.penalties.add("203.0.113.66", "garbage")
        self.factory.penalties.add("203.0.113.66", "garbage")
        got = yield self.raw(v1_header("203.0.113.66", 1) + b"SSH-2.0-raw\r\n")
        self.assertEqual(got, b"")
        got = yield self.raw(v1_header("203.0.113.67", 1) + b"SSH-2.0-raw\r\n")
        self.assertTrue(got.startswith(b"SSH-2.0-nuttconch"))
        yield task.deferLater(reactor, 0, lambda: None)


class ProxyFromTests(ProxyMixin, unittest.TestCase):
    """With ``proxy_protocol_from``, only the balancers listed may connect at all."""

    settings = {"proxy_protocol": "true", "proxy_protocol_from": "10.9.9.9"}

    @defer.inlineCallbacks
    def test_untrusted_balancer_refused(self) -> Any:
        """A balancer outside proxy_protocol_from gets no byte of SSH and no transport."""
        got = yield self.raw(v1_header("203.0.113.7", 1) + b"SSH-2.0-raw\r\n")
        self.assertEqual(got, b"")
        self.assertEqual(self.factory.transports, set())


class ProxyDescriptorTests(ProxyMixin, unittest.TestCase):
    """Connections still waiting for their header count against the open-file guard."""

    @defer.inlineCallbacks
    def test_headerless_flood_meets_the_guard(self) -> Any:
        """Connections waiting for their header count against the open-file guard."""
        from nuttconch.limits import DescriptorGuard

        self.factory.descriptors = DescriptorGuard(40, 0, clock=reactor.seconds)  # ceiling 8
        proxy = self.service._port.factory  # type: ignore[attr-defined]

        def flood() -> list[socket.socket]:
            socks = []
            for _ in range(20):
                socks.append(socket.create_connection(("127.0.0.1", self.port), timeout=3))
            return socks

        socks = yield threads.deferToThread(flood)
        self.addCleanup(lambda: [s.close() for s in socks])
        yield self.waitFor(lambda: self.factory.descriptors.refused >= 12, 5, "12 refused")
        self.assertEqual(proxy.pending, 8)
        for sock in socks:
            sock.close()
        yield self.waitFor(lambda: proxy.pending == 0, 5, "pending back to 0")
