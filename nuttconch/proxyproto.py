# -*- test-case-name: tests.test_proxyproto -*-
"""PROXY protocol (v1 text and v2 binary) read before any SSH object exists.

Behind a TCP load balancer every connection comes from the balancer, so
penalties, MaxStartups' per-source share, ``from=`` and the logs would all
see one address. Twisted's ``haproxy:`` endpoint builds the wrapped protocol
(here: the SSH transport, admitted and counted by the factory) when the TCP
connection is accepted, before the header is read. This wrapper instead
reads the header first and only then asks the switchboard factory to build
(or refuse) the SSH transport, giving it the client's own address, so every
decision the factory and the transport make sees the real client.

A connection without a valid header is closed without a byte of SSH: when
``proxy_protocol`` is on, a header-less connection is someone reaching the
port around the balancer.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

from twisted.internet import address, protocol
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from zope.interface import directlyProvides, providedBy

log = Logger()

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line the specification allows, CRLF included
V2_MAX_BODY = 2048  # addresses plus TLVs; balancers send far less
HEADER_TIMEOUT = 10.0
LOG_INTERVAL = 60.0


class ProxyHeaderError(ValueError):
    """Not a PROXY header we accept; str() is the reason logged."""


@dataclass(frozen=True)
class ProxyHeader:
    """What the balancer said: the client's address, or None for a LOCAL/UNKNOWN header
    (the balancer's own health check: the connection's own address stands)."""

    source: IAddress | None
    version: int


def _v1(line: bytes) -> ProxyHeader:
    parts = line.split(b" ")
    if len(parts) < 2 or parts[0] != b"PROXY":
        raise ProxyHeaderError("malformed PROXY v1 line")
    if parts[1] == b"UNKNOWN":
        return ProxyHeader(None, 1)
    if parts[1] not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise ProxyHeaderError("malformed PROXY v1 line")
    try:
        src = ipaddress.ip_address(parts[2].decode("ascii"))
        ipaddress.ip_address(parts[3].decode("ascii"))
        sport, dport = int(parts[4]), int(parts[5])
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError("bad address or port in PROXY v1 line") from None
    if not (0 <= sport <= 65535 and 0 <= dport <= 65535) or parts[4] != str(sport).encode():
        raise ProxyHeaderError("bad port in PROXY v1 line")
    if (src.version == 4) != (parts[1] == b"TCP4"):
        raise ProxyHeaderError("PROXY v1 address does not match its family")
    kind = address.IPv4Address if src.version == 4 else address.IPv6Address
    return ProxyHeader(kind("TCP", str(src), sport), 1)


def _v2(command: int, family: int, body: bytes) -> ProxyHeader:
    if command == 0x20:  # LOCAL
        return ProxyHeader(None, 2)
    if command != 0x21:
        raise ProxyHeaderError("unknown PROXY v2 version or command")
    if family == 0x11 and len(body) >= 12:  # TCP over IPv4
        src = ipaddress.IPv4Address(body[0:4])
        (sport,) = struct.unpack("!H", body[8:10])
        return ProxyHeader(address.IPv4Address("TCP", str(src), sport), 2)
    if family == 0x21 and len(body) >= 36:  # TCP over IPv6
        src6 = ipaddress.IPv6Address(body[0:16])
        (sport,) = struct.unpack("!H", body[32:34])
        return ProxyHeader(address.IPv6Address("TCP", str(src6), sport), 2)
    if family == 0x00:  # UNSPEC: keep the connection's own address
        return ProxyHeader(None, 2)
    raise ProxyHeaderError("unsupported PROXY v2 address family or short address block")


def parse(buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
    """The header and what follows it, None when more bytes are needed; ProxyHeaderError
    as soon as the bytes cannot be a header (a plain SSH client, a scanner)."""
    if buffer[:12] == V2_SIGNATURE[: len(buffer[:12])] and buffer[:1] == b"\r":
        if len(buffer) < 16:
            return None
        version_command, family, length = struct.unpack("!BBH", buffer[12:16])
        if version_command >> 4 != 2:
            raise ProxyHeaderError("unknown PROXY v2 version")
        if length > V2_MAX_BODY:
            raise ProxyHeaderError("PROXY v2 header too long")
        if len(buffer) < 16 + length:
            return None
        return _v2(version_command, family, buffer[16 : 16 + length]), buffer[16 + length :]
    if buffer[:6] != V1_PREFIX[: len(buffer[:6])]:
        raise ProxyHeaderError("no PROXY protocol header")
    end = buffer.find(b"\r\n")
    if end < 0:
        if len(buffer) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 line too long")
        return None
    if end + 2 > V1_MAX:
        raise ProxyHeaderError("PROXY v1 line too long")
    return _v1(buffer[:end]), buffer[end + 2 :]


class _PeerTransport:
    """The TCP transport as the SSH transport sees it: itself, except for getPeer."""

    def __init__(self, transport: Any, peer: IAddress) -> None:
        self._transport = transport
        self._peer = peer
        directlyProvides(self, *providedBy(transport))

    def getPeer(self) -> IAddress:
        return self._peer

    # Asked for on every packet: defined here, not looked up through __getattr__.

    def write(self, data: bytes) -> None:
        self._transport.write(data)

    def writeSequence(self, data: Any) -> None:
        self._transport.writeSequence(data)

    @property
    def disconnecting(self) -> Any:
        return self._transport.disconnecting

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class ProxyHeaderProtocol(protocol.Protocol):
    """Reads the header, then hands the connection to the protocol built for the client."""

    wrapped: protocol.Protocol | None = None
    done = False

    def __init__(self, factory: ProxyHeaderFactory, balancer: IAddress) -> None:
        self.factory = factory
        self.balancer = balancer
        self.buffer = b""
        self.timer: Any = None

    def connectionMade(self) -> None:
        self.factory.pending += 1
        self.timer = self.factory.clock.callLater(self.factory.timeout, self._timedOut)

    def _timedOut(self) -> None:
        self.timer = None
        self._refuse("no PROXY protocol header in time")

    def _refuse(self, why: str) -> None:
        self.factory.refused(getattr(self.balancer, "host", "?"), why)
        self._abort()

    def dataReceived(self, data: bytes) -> None:
        if self.wrapped is not None:
            self.wrapped.dataReceived(data)
            return
        self.buffer += data
        try:
            parsed = parse(self.buffer)
        except ProxyHeaderError as exc:
            self._cancelTimer()
            self._refuse(str(exc))
            return
        if parsed is None:
            return
        self._cancelTimer()
        self._settled()
        header, rest = parsed
        self.buffer = b""
        peer = header.source or self.balancer
        wrapped = self.factory.wrappedFactory.buildProtocol(peer)
        if wrapped is None:
            # Refused by the switchboard (penalised, MaxStartups, fd limit) under the
            # client's own address; the factory has logged it.
            self._abort()
            return
        self.wrapped = wrapped
        wrapped.makeConnection(_PeerTransport(self.transport, peer))
        if rest:
            wrapped.dataReceived(rest)

    def _abort(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def _cancelTimer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _settled(self) -> None:
        """No longer waiting for a header (parsed, refused or gone): leaves ``pending``."""
        if not self.done:
            self.done = True
            self.factory.pending -= 1

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        self._cancelTimer()
        self._settled()
        if self.wrapped is not None:
            self.wrapped.connectionLost(reason)


class ProxyHeaderFactory(protocol.Factory):
    """Wraps the switchboard factory: the SSH side is built once the header is read.

    ``allowed(host)`` says whether a balancer's address may send headers (the
    ``proxy_protocol_from`` patterns): anyone else reaching the port is refused,
    since a header is an unchecked claim about where a client is.
    """

    def __init__(
        self,
        wrappedFactory: Any,
        clock: Any,
        allowed: Any = None,
        timeout: float = HEADER_TIMEOUT,
    ) -> None:
        self.wrappedFactory = wrappedFactory
        self.clock = clock
        self.allowed = allowed
        self.timeout = timeout
        self.refusals = 0
        self.pending = 0  # connections still waiting for their header
        self._logged: dict[str, float] = {}

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def buildProtocol(self, addr: IAddress | None) -> protocol.Protocol | None:
        host = getattr(addr, "host", "?")
        if self.allowed is not None and not self.allowed(host):
            self.refused(host, "not a trusted load balancer (proxy_protocol_from)")
            return None
        # Connections waiting for their header hold descriptors too: count them against
        # the switchboard's open-file guard, or a header-less flood would reach EMFILE.
        guard = getattr(self.wrappedFactory, "descriptors", None)
        if guard is not None:
            held = len(getattr(self.wrappedFactory, "transports", ())) + self.pending
            if not guard.admit(held):
                self.wrappedFactory._descriptorsFull()
                return None
        return ProxyHeaderProtocol(self, addr) if addr is not None else None

    def refused(self, host: str, why: str) -> None:
        """Count every refusal; one log line per balancer address and reason a minute."""
        self.refusals += 1
        now = self.clock.seconds()
        key = f"{host} {why}"
        if now - self._logged.get(key, -1e18) >= LOG_INTERVAL:
            if len(self._logged) > 4096:
                self._logged.clear()
            self._logged[key] = now
            log.info("refused connection from {peer}: {why}", peer=host, why=why)
