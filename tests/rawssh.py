"""Hand-built SSH for hostile tests: raw sockets before kex, a Conch client after.

- ``connect_raw`` opens a plain TCP connection (optionally bound to another
  loopback address) whose bytes the test writes itself: version lines,
  unencrypted binary packets (``packet``) and KEXINIT (``kexinit``); what the
  server sends back is parsed by ``parse_server``.
- ``connect_client`` runs Twisted Conch's client up to a chosen stage (key
  exchange done, ``ssh-userauth`` accepted, or logged in) and then lets the
  test send crafted packets with ``transport.sendPacket``. Every message the
  server sends is recorded, and ``expect`` waits for one.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from twisted.conch.ssh import common, connection, keys, service, transport, userauth
from twisted.internet import defer, endpoints, protocol, reactor

NS = common.NS
MSG_DISCONNECT = 1
MSG_IGNORE = 2
MSG_KEXINIT = 20
MSG_NEWKEYS = 21

SSH_VERSION = b"SSH-2.0-rawssh_1.0\r\n"
KEXINIT_DEFAULTS = {
    "kex": b"curve25519-sha256",
    "hostkey": b"ssh-ed25519",
    "cipher": b"aes128-ctr",
    "mac": b"hmac-sha2-256",
    "compression": b"none",
}
_MASK32 = 0xFFFFFFFF


# -- unencrypted framing ------------------------------------------------------


def packet(
    payload: bytes,
    *,
    block: int = 8,
    padding: int | None = None,
    length: int | None = None,
) -> bytes:
    """One binary packet (RFC 4253 6) in the clear; ``padding``/``length`` may lie."""
    if padding is None:
        padding = block - (len(payload) + 5) % block
        if padding < 4:
            padding += block
    body = bytes([padding]) + payload + b"\0" * padding
    declared = len(body) if length is None else length
    return struct.pack(">L", declared) + body


def kexinit(**overrides: bytes) -> bytes:
    """A client KEXINIT payload; name-lists default to one modern algorithm each."""
    names = {**KEXINIT_DEFAULTS, **overrides}
    lists = [
        names["kex"],
        names["hostkey"],
        names["cipher"],
        names["cipher"],
        names["mac"],
        names["mac"],
        names["compression"],
        names["compression"],
        b"",
        b"",
    ]
    return bytes([MSG_KEXINIT]) + os.urandom(16) + b"".join(NS(x) for x in lists) + b"\0" * 5


def parse_kexinit(payload: bytes) -> dict[str, list[bytes]]:
    """The name-lists of a KEXINIT payload (message byte included)."""
    rest = payload[17:]
    fields = (
        "kex",
        "hostkey",
        "cipher_cs",
        "cipher_sc",
        "mac_cs",
        "mac_sc",
        "comp_cs",
        "comp_sc",
        "lang_cs",
        "lang_sc",
    )
    out: dict[str, list[bytes]] = {}
    for name in fields:
        value, rest = common.getNS(rest)
        out[name] = value.split(b",") if value else []
    return out


def parse_server(data: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Split what a server sent before NEWKEYS into its version line and packets."""
    end = data.find(b"\n")
    if end < 0:
        return data, []
    version, rest = data[:end].rstrip(b"\r"), data[end + 1 :]
    messages: list[tuple[int, bytes]] = []
    while len(rest) >= 5:
        (length,) = struct.unpack(">L", rest[:4])
        if len(rest) < 4 + length or length < 2:
            break
        pad = rest[4]
        body = rest[5 : 4 + length - pad]
        messages.append((body[0], body))
        rest = rest[4 + length :]
    return version, messages


def disconnect_code(messages: list[tuple[int, bytes]]) -> int | None:
    for num, body in messages:
        if num == MSG_DISCONNECT:
            return int(struct.unpack(">L", body[1:5])[0])
    return None


class RawProtocol(protocol.Protocol):
    """A TCP client that records everything and reports when the server closes."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: defer.Deferred[float] = defer.Deferred()
        self.openedAt = 0.0
        self.closedAt: float | None = None

    def connectionMade(self) -> None:
        self.openedAt = reactor.seconds()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closedAt = reactor.seconds()
        self.closed.callback(self.closedAt - self.openedAt)

    def send(self, data: bytes) -> None:
        if self.transport is not None and self.closedAt is None:
            self.transport.write(data)

    def messages(self) -> list[tuple[int, bytes]]:
        return parse_server(bytes(self.received))[1]

    def serverKexinit(self) -> dict[str, list[bytes]]:
        for num, body in self.messages():
            if num == MSG_KEXINIT:
                return parse_kexinit(body)
        raise AssertionError(f"no KEXINIT in {bytes(self.received)[:200]!r}")

    def waitClosed(self, timeout: float = 5) -> defer.Deferred[float]:
        """Fires with the connection's lifetime; fails if it is still open after ``timeout``."""
        d: defer.Deferred[float] = defer.Deferred()
        self.closed.addBoth(lambda r: (d.called or d.callback(r), r)[1])
        return d.addTimeout(timeout, reactor)

    def abort(self) -> None:
        if self.transport is not None and self.closedAt is None:
            self.transport.abortConnection()


def connect_raw(port: int, bind: str | None = None) -> defer.Deferred[RawProtocol]:
    """A raw TCP connection to the server on 127.0.0.1, from ``bind`` if given."""
    endpoint = endpoints.TCP4ClientEndpoint(
        reactor, "127.0.0.1", port, timeout=5, bindAddress=(bind, 0) if bind else None
    )
    return endpoints.connectProtocol(endpoint, RawProtocol())


# -- a Conch client that stops where the test wants ---------------------------


class Inbox:
    """Received messages, and Deferreds waiting for particular ones."""

    def __init__(self) -> None:
        self.messages: list[tuple[int, bytes]] = []
        self.waiters: list[tuple[Any, defer.Deferred[tuple[int, bytes]]]] = []

    def put(self, num: int, payload: bytes) -> None:
        for match, d in list(self.waiters):
            if match(num, payload):
                self.waiters.remove((match, d))
                d.callback((num, payload))
                return
        self.messages.append((num, payload))

    def expect(
        self, nums: Any, channel: int | None = None, timeout: float = 5
    ) -> defer.Deferred[tuple[int, bytes]]:
        """The first (num, payload) with num in ``nums`` (and for ``channel``)."""
        wanted = {nums} if isinstance(nums, int) else set(nums)

        def match(num: int, payload: bytes) -> bool:
            if num not in wanted:
                return False
            return channel is None or struct.unpack(">L", payload[:4])[0] == channel

        for item in list(self.messages):
            if match(*item):
                self.messages.remove(item)
                return defer.succeed(item)
        d: defer.Deferred[tuple[int, bytes]] = defer.Deferred()
        self.waiters.append((match, d))
        return d.addTimeout(timeout, reactor)

    def failAll(self, why: str) -> None:
        for _, d in self.waiters:
            d.errback(AssertionError(why))
        self.waiters = []


class RawService(service.SSHService):
    """A service that only records: ssh-userauth left for the test to drive by hand."""

    name = b"ssh-userauth"

    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox

    def serviceStarted(self) -> None:
        self.transport.stageReached()

    def packetReceived(self, messageNum: int, packet: bytes) -> None:
        self.inbox.put(messageNum, packet)


class RawConnection(connection.SSHConnection):
    """ssh-connection that records what it gets; only its own channels go to Conch."""

    def __init__(self, inbox: Inbox) -> None:
        super().__init__()
        self.inbox = inbox
        self.nextRaw = 1000

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self.transport.authenticated = True
        self.transport.stageReached()

    def packetReceived(self, messageNum: int, packet: bytes) -> Any:
        if messageNum == connection.MSG_GLOBAL_REQUEST:
            # Keepalives: answer as OpenSSH does, unless the test is playing dead.
            if not self.transport.playDead:
                return super().packetReceived(messageNum, packet)
        if 91 <= messageNum <= 100 and len(packet) >= 4:
            (local,) = struct.unpack(">L", packet[:4])
            if local in self.channels:
                return super().packetReceived(messageNum, packet)
        self.inbox.put(messageNum, packet)
        return None

    def globalRequest(
        self, name: bytes, data: bytes, wantReply: bool = True
    ) -> defer.Deferred[tuple[int, bytes]] | None:
        """Send GLOBAL_REQUEST with raw data; fires with (81 or 82, payload)."""
        self.transport.sendPacket(80, NS(name) + bytes([int(wantReply)]) + data)
        if not wantReply:
            return None
        return self.inbox.expect((81, 82))

    def openRaw(
        self,
        kind: bytes,
        extra: bytes = b"",
        *,
        window: int = 65536,
        maxPacket: int = 32768,
        sender: int | None = None,
        wait: bool = True,
    ) -> defer.Deferred[tuple[int, bytes]] | int:
        """CHANNEL_OPEN with raw fields; fires with (91 or 92, payload), or returns the id."""
        if sender is None:
            sender = self.nextRaw
            self.nextRaw += 1
        self.transport.sendPacket(
            90, NS(kind) + struct.pack(">3L", sender, window, maxPacket) + extra
        )
        if not wait:
            return sender
        return self.inbox.expect((91, 92), channel=sender)


def direct_tcpip(host: bytes, port: int, orig: bytes = b"127.0.0.1", origPort: int = 1) -> bytes:
    return NS(host) + struct.pack(">L", port) + NS(orig) + struct.pack(">L", origPort)


def open_failure_code(payload: bytes) -> int:
    return int(struct.unpack(">2L", payload[:8])[1])


class KeyAuth(userauth.SSHUserAuthClient):
    """Offers one key; signs with ``signer`` (None: never signs); records banners."""

    def __init__(self, user: bytes, key: keys.Key | None, signer: Any, conn: Any) -> None:
        super().__init__(user, conn)
        self.key = key
        self.signer = signer
        self.offered = False

    def getPublicKey(self) -> keys.Key | None:
        if self.offered or self.key is None:
            return None
        self.offered = True
        return self.key.public()

    def getPrivateKey(self) -> defer.Deferred[keys.Key]:
        if self.signer is None:
            return defer.fail(NotImplementedError("no private key"))
        return defer.succeed(self.signer)

    def ssh_USERAUTH_BANNER(self, packet: bytes) -> None:
        self.transport.banner += common.getNS(packet)[0]

    def ssh_USERAUTH_FAILURE(self, packet: bytes) -> Any:
        self.transport.failures += 1
        return super().ssh_USERAUTH_FAILURE(packet)


class ClientTransport(transport.SSHClientTransport):
    """Conch's client, stopping at ``stage``: "kex", "userauth" or "auth"."""

    playDead = False

    def __init__(
        self,
        stage: str,
        user: bytes,
        key: keys.Key | None,
        signer: Any,
        compressions: list[bytes] | None,
    ) -> None:
        self.stage = stage
        self.user = user
        self.key = key
        self.signer = signer
        if compressions is not None:
            self.supportedCompressions = compressions
        self.inbox = Inbox()
        self.ready: defer.Deferred[ClientTransport] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.banner = b""
        self.failures = 0
        self.authenticated = False
        self.disconnect: tuple[int, bytes] | None = None
        self.conn: RawConnection | None = None
        self.isLost = False

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> defer.Deferred[bool]:
        return defer.succeed(True)

    def stageReached(self) -> None:
        if not self.ready.called:
            self.ready.callback(self)

    def connectionSecure(self) -> None:
        if self.stage == "kex":
            self.stageReached()
        elif self.stage == "userauth":
            self.requestService(RawService(self.inbox))
        else:
            self.conn = RawConnection(self.inbox)
            self.requestService(KeyAuth(self.user, self.key, self.signer, self.conn))

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        if messageNum == MSG_DISCONNECT:
            code = struct.unpack(">L", payload[:4])[0]
            self.disconnect = (code, common.getNS(payload[4:])[0])
        super().dispatchMessage(messageNum, payload)

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        self.transport.loseConnection()

    # Conch counts sequence numbers without wrapping (RFC 4253 6.4 says mod 2^32).
    def sendPacket(self, messageType: int, payload: bytes) -> None:
        super().sendPacket(messageType, payload)
        self.outgoingPacketSequence &= _MASK32

    def getPacket(self) -> Any:
        result = super().getPacket()
        self.incomingPacketSequence &= _MASK32
        return result

    def connectionLost(self, reason: Any = None) -> None:
        self.isLost = True
        try:
            super().connectionLost(reason)
        finally:
            self.inbox.failAll("connection lost")
            self.stageReached()
            self.lost.callback(None)

    def waitLost(self, timeout: float = 5) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.lost.addBoth(lambda r: (d.called or d.callback(None), r)[1])
        return d.addTimeout(timeout, reactor)

    def close(self) -> None:
        if self.transport is not None and not self.isLost:
            self.transport.loseConnection()


def load_key(path: str | None) -> keys.Key | None:
    return keys.Key.fromFile(path) if path else None


def connect_client(
    port: int,
    *,
    stage: str = "auth",
    user: bytes = b"conchcli",
    key: str | None = None,
    sign_with: str | None = "own",
    bind: str | None = None,
    compressions: list[bytes] | None = None,
    timeout: float = 15,
) -> defer.Deferred[ClientTransport]:
    """Connect Conch's client; fires with its transport at ``stage`` or once it is lost.

    After "auth", ``transport.authenticated`` says whether login worked and
    ``transport.conn`` is the RawConnection; ``banner`` holds refusal texts.
    """
    privateKey = load_key(key)
    if sign_with == "own":
        signer = privateKey
    else:
        signer = load_key(sign_with)
    proto = ClientTransport(stage, user, privateKey, signer, compressions)
    endpoint = endpoints.TCP4ClientEndpoint(
        reactor, "127.0.0.1", port, timeout=5, bindAddress=(bind, 0) if bind else None
    )
    d = endpoints.connectProtocol(endpoint, proto)
    d.addCallback(lambda p: p.ready)
    return d.addTimeout(timeout, reactor)


def sign_userauth(
    sessionID: bytes, user: bytes, key: keys.Key, service_name: bytes = b"ssh-connection"
) -> bytes:
    """A complete, signed publickey USERAUTH_REQUEST payload (without the message byte)."""
    alg = key.sshType()
    blob = key.public().blob()
    body = NS(user) + NS(service_name) + NS(b"publickey") + b"\x01" + NS(alg) + NS(blob)
    sigData = NS(sessionID) + bytes([userauth.MSG_USERAUTH_REQUEST]) + body
    return body + NS(key.sign(sigData))
