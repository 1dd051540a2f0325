# -*- test-case-name: tests.test_crypto,tests.test_protocol_security -*-
"""The SSH transport: safe algorithms, a handshake deadline, and no tracebacks.

Stock Conch negotiates zlib before authentication (a memory bomb), offers
CBC, SHA-1 and group exchange, advertises ``server-sig-algs`` from the host
keys only (so OpenSSH will not offer RSA user keys to an Ed25519 host),
holds a silent connection forever, and lets a malformed packet escape as
an unhandled exception.  This subclass fixes each of those in one place.

It also holds the peer to the key exchange's message order, because Conch
does not: a key-exchange method message (30-49) is accepted only between
the peer's KEXINIT and our NEWKEYS, and only the one our methods use (30;
group exchange is not offered), so a repeated ECDH_INIT cannot make the
server redo a host-key signature; after its KEXINIT the peer may send no
connection-layer message until its NEWKEYS (RFC 4253 7.1).  A service is
requested once per connection.  While a rekey is in progress the
connection's circuits are treated as congested (their data waits behind
their windows rather than in Conch's key-exchange queue), reading from
the peer stops once that queue passes ``KEX_QUEUE_LIMIT``, and a rekey
that takes longer than ``rekeyTimeout`` seconds ends the connection.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.conch.ssh import transport as conch_transport
from twisted.internet import reactor as default_reactor
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import access
from .crypto import (
    DEFAULT_CIPHERS,
    DEFAULT_KEX,
    DEFAULT_MACS,
    MSG_CHANNEL_DATA,
    ModernTransportMixin,
    available_kex,
)
from .logs import conch_logger
from .names import escape

log = Logger()

# User key signature algorithms we verify; ssh-rsa (SHA-1) is deliberately absent.
USER_SIG_ALGS = (
    b"ssh-ed25519",
    b"ecdsa-sha2-nistp256",
    b"ecdsa-sha2-nistp384",
    b"ecdsa-sha2-nistp521",
    b"sk-ssh-ed25519@openssh.com",
    b"sk-ecdsa-sha2-nistp256@openssh.com",
    b"rsa-sha2-512",
    b"rsa-sha2-256",
)

# DISCONNECT, IGNORE, UNIMPLEMENTED, DEBUG: allowed (boundedly) before the first NEWKEYS.
PREKEX_GENERIC = frozenset({1, 2, 3, 4})
MAX_PREKEX_MESSAGES = 100
# Client-initiated rekeys: free after 16 KiB of traffic either way (OpenSSH RekeyLimit),
# else taken from a bucket of 20 refilled at 1/s, so an empty rekey storm is cut off.
REKEY_FREE_AFTER = 16 * 1024
REKEY_BURST = 20.0
REKEY_PER_SECOND = 1.0

# The one key-exchange method message a client sends with the methods we offer (ECDH,
# curve25519, ML-KEM hybrid): KEXDH_INIT / KEX_ECDH_INIT / KEX_HYBRID_INIT all share 30.
MSG_KEX_INIT = 30
GROUP_EXCHANGE_MESSAGES = frozenset({32, 33, 34})
# A rekey (any key exchange after the first) must finish within this many seconds: one
# round trip and a host-key signature, so a minute is generous even on a slow link.
REKEY_TIMEOUT = 60.0
# Payload bytes queued behind a key exchange before we stop reading from the peer.  Circuits
# hold their data back during a rekey, so only control messages should ever queue here.
KEX_QUEUE_LIMIT = 256 * 1024

_MALFORMED = (struct.error, KeyError, IndexError, ValueError, UnicodeDecodeError, TypeError)


class SwitchboardTransport(ModernTransportMixin, conch_transport.SSHServerTransport):
    """Server transport with nuttconch's algorithm policy and deadlines."""

    _log = conch_logger("nuttconch.transport.SwitchboardTransport")

    supportedCiphers = list(DEFAULT_CIPHERS)
    supportedMACs = list(DEFAULT_MACS)
    supportedKeyExchanges = list(available_kex(DEFAULT_KEX))
    supportedCompressions = [b"none"]
    ourVersionString = b"SSH-2.0-nuttconch_0.1"

    clock: IReactorTime = default_reactor
    factory: Any
    transport: Any
    loginGraceTime: float = 30.0
    _deadline: Any = None
    _peerHost: str = "?"
    connId: int = 0
    _closeReason = "connection lost"

    @property
    def isAuthenticated(self) -> bool:
        """Whether user authentication finished (Conch then sets ``avatar``).

        Not ``authenticated``: that name is the hook called when it happens.
        """
        return access.authenticated(self)

    firstKexDone = False
    gotKexInit = False
    bytesIn = 0
    bytesOut = 0
    _bytesAtRekey = 0
    _rekeyTokens = 0.0
    _rekeyStamp = 0.0
    preauthCounted = False
    startedAt = 0.0
    # What an unauthenticated close is penalised as (PerSourcePenalties kinds).
    penaltyKind = "noauth"
    preKexMessages = 0
    rekeyTimeout: float = REKEY_TIMEOUT
    kexQueueLimit: int = KEX_QUEUE_LIMIT
    _rekeyDeadline: Any = None

    def connectionMade(self) -> None:
        """Enable TCP_NODELAY and start the handshake deadline before anything is read."""
        tcp = self.transport
        for option in ("setTcpNoDelay", "setTcpKeepAlive"):
            setter = getattr(tcp, option, None)
            if setter is not None:
                try:
                    setter(True)
                except OSError:
                    pass
        peer = tcp.getPeer()
        self._peerHost = getattr(peer, "host", "?")
        self.factory.transportStarted(self)
        self._rekeyTokens = REKEY_BURST
        self._rekeyStamp = self.clock.seconds()
        if self.loginGraceTime > 0:
            self._deadline = self.clock.callLater(self.loginGraceTime, self._handshakeTimedOut)
        super().connectionMade()

    def _handshakeTimedOut(self) -> None:
        self._deadline = None
        self.penaltyKind = "grace-exceeded"
        self.sendDisconnect(
            conch_transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
            b"login grace time exceeded",
        )

    def authenticated(self) -> None:
        """Called once the connection service starts: the handshake is over."""
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self.factory.preauthDone(self)

    def setService(self, service: Any) -> None:
        super().setService(service)
        if service.name == b"ssh-connection":
            self.authenticated()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._cancelRekeyDeadline()
        log.info(
            "conn {conn_id} from {peer}: closed: {why}",
            conn_id=self.connId,
            peer=self._peerHost,
            why=self._closeReason,
        )
        try:
            super().connectionLost(reason)
        finally:
            self.factory.transportLost(self)

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        """The peer sent DISCONNECT: an ordinary end of a connection, not an error."""
        self._closeReason = f"peer disconnected ({escape(description[:200])})"
        self.closeTCP()

    def sendExtInfo(self, extensions: list[tuple[bytes, bytes]]) -> None:
        """Advertise the user-key algorithms we verify, not our host key types."""
        fixed = [
            (name, b",".join(USER_SIG_ALGS) if name == b"server-sig-algs" else value)
            for name, value in extensions
        ]
        super().sendExtInfo(fixed)

    def dataReceived(self, data: bytes) -> None:
        """Turn a malformed message into one log line and a protocol-error disconnect."""
        if self.transport is None or getattr(self.transport, "disconnecting", False):
            return
        self.bytesIn += len(data)
        try:
            super().dataReceived(data)
        except _MALFORMED as exc:
            self.protocolError(f"malformed message ({type(exc).__name__})")
        except Exception as exc:
            # Conch's handlers assert and dereference state a hostile peer controls (GEX
            # messages out of turn raised AssertionError/AttributeError); whatever the
            # cause, the peer's connection ends cleanly and the reason is logged once.
            self.protocolError(f"message could not be handled ({type(exc).__name__})")
            if self._closeReason.startswith("disconnected by server (message could not"):
                # The operator's one line says what failed; the peer is told only the type.
                self._closeReason = (
                    f"disconnected by server (message could not be handled:"
                    f" {type(exc).__name__}: {escape(str(exc)[:200])})"
                )

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        if getattr(self.transport, "disconnecting", False):
            return
        if messageNum >= 80 and not self.isAuthenticated:
            # Connection-protocol messages (channels, global requests) before login.
            self.protocolError(f"message {messageNum} before authentication")
            return
        if 30 <= messageNum <= 49:
            if not self._kexMessageAllowed(messageNum):
                return
        elif messageNum >= 50 and self._kexInitReceived:
            # RFC 4253 7.1: between its KEXINIT and its NEWKEYS a peer sends only transport
            # messages; anything else (blind keepalive answers, say) is hostile.
            self.protocolError(f"message {messageNum} during key exchange")
            return
        if messageNum == conch_transport.MSG_SERVICE_REQUEST and self.service is not None:
            # One service per connection: a second ssh-userauth would reset the attempt
            # counters, a second ssh-connection replace the live one and its circuits.
            self.protocolError("service already started")
            return
        if messageNum == conch_transport.MSG_KEXINIT and self.firstKexDone:
            if not self._rekeyAllowed():
                self.protocolError("too many key re-exchanges")
                return
        if not self.firstKexDone:
            # Before the first key exchange completes only KEX messages make sense (and the
            # method-specific ones only after KEXINIT); a few IGNORE/DEBUG are tolerated;
            # anything else, or a flood of anything, ends the connection.
            self.preKexMessages += 1
            if self.preKexMessages > MAX_PREKEX_MESSAGES:
                self.protocolError("too many messages before key exchange")
                return
            if messageNum == conch_transport.MSG_KEXINIT:
                self.gotKexInit = True
            elif not (
                messageNum in PREKEX_GENERIC
                or messageNum == conch_transport.MSG_NEWKEYS
                or 30 <= messageNum < 50  # checked above
            ):
                self.protocolError(f"message {messageNum} before key exchange")
                return
        super().dispatchMessage(messageNum, payload)

    def _kexMessageAllowed(self, messageNum: int) -> bool:
        """A key-exchange method message is valid only inside an exchange the peer has
        started and we have not yet answered, and only as the message our methods use:
        otherwise each one would cost a key derivation and a host-key signature."""
        if not self._kexInitReceived or self._newKeysSent:
            self.protocolError(f"key exchange message {messageNum} outside a key exchange")
            return False
        if messageNum in GROUP_EXCHANGE_MESSAGES:
            self.protocolError(f"key exchange message {messageNum}: group exchange not offered")
            return False
        if messageNum != MSG_KEX_INIT:
            self.protocolError(f"unexpected key exchange message {messageNum}")
            return False
        return True

    def dispatchChannelData(self, packet: memoryview) -> None:
        """CHANNEL_DATA straight to the connection service once the connection is past
        its first key exchange and authenticated (the cases in which dispatchMessage
        would pass it on unchanged); anything else takes dispatchMessage's checks."""
        service = self.service
        if (
            self.firstKexDone
            and service is not None
            and self.isAuthenticated
            and not self._kexInitReceived
            and not getattr(self.transport, "disconnecting", False)
        ):
            fast = getattr(service, "channelData", None)
            if fast is not None:
                fast(packet)
                return
        self.dispatchMessage(MSG_CHANNEL_DATA, packet)  # type: ignore[arg-type]

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        self.bytesOut += len(payload)
        super().sendPacket(messageType, payload)
        # Sequence numbers are uint32 and wrap (RFC 4253 6.4); Conch would overflow struct.
        self.outgoingPacketSequence &= 0xFFFFFFFF

    def sendChannelData(self, remoteChannel: int, data: Any) -> None:
        """CHANNEL_DATA sealed from pieces (see ModernTransportMixin.sendChannelData)."""
        self.bytesOut += 8 + len(data)  # what sendPacket counts: the payload after its type
        super().sendChannelData(remoteChannel, data)

    def getPacket(self) -> bytes | None:
        packet: bytes | None = super().getPacket()
        self.incomingPacketSequence &= 0xFFFFFFFF
        return packet

    def _rekeyAllowed(self) -> bool:
        """A token bucket: rekeys that follow real traffic (RekeyLimit) are free, a storm is not."""
        now = self.clock.seconds()
        self._rekeyTokens = min(
            REKEY_BURST, self._rekeyTokens + (now - self._rekeyStamp) * REKEY_PER_SECOND
        )
        self._rekeyStamp = now
        traffic = self.bytesIn + self.bytesOut
        if traffic - self._bytesAtRekey >= REKEY_FREE_AFTER:
            self._bytesAtRekey = traffic
            return True
        self._bytesAtRekey = traffic
        if self._rekeyTokens < 1:
            return False
        self._rekeyTokens -= 1
        return True

    def ssh_NEWKEYS(self, packet: bytes) -> None:
        super().ssh_NEWKEYS(packet)
        self.firstKexDone = True

    # rekeys: congestion, a bounded queue, a deadline

    @property
    def keyExchanging(self) -> bool:
        """True from a KEXINIT (ours or the peer's) to the peer's NEWKEYS: outgoing
        non-transport messages are queued meanwhile, so circuits must not send."""
        return bool(self._keyExchangeState != self._KEY_EXCHANGE_NONE)

    def sendKexInit(self) -> None:
        """Every key exchange goes through here (a peer's KEXINIT makes us send ours).
        For a rekey, hold the circuits back and start the deadline."""
        super().sendKexInit()
        if self.sessionID is None:
            return  # the first exchange is under the login grace time
        self._cancelRekeyDeadline()
        if self.rekeyTimeout > 0:
            self._rekeyDeadline = self.clock.callLater(self.rekeyTimeout, self._rekeyTimedOut)
        congest = getattr(self.service, "pauseProducing", None)
        if congest is not None:
            congest()

    def _newKeys(self) -> None:
        """The exchange is over: Conch sends what was queued; then reading and the
        circuits resume (unless the socket itself is still backed up)."""
        super()._newKeys()
        self._cancelRekeyDeadline()
        self._kexQueued = 0
        tcp = self.transport
        # The connection service may hold its own read pause (replies left unread);
        # that one ends when the socket drains, not here.
        self.resumeReading("kex queue")
        resume = getattr(self.service, "resumeProducing", None)
        if resume is not None and not getattr(tcp, "producerPaused", False):
            resume()

    def kexQueueGrew(self, queued: int) -> None:
        """Called by the packet layer as messages queue behind a key exchange: past the
        limit, stop reading from the peer, whose requests are what can still add to it.
        The rekey deadline then ends a peer that does not finish the exchange."""
        if queued > self.kexQueueLimit:
            tcp = self.transport
            if tcp is not None and not getattr(tcp, "disconnecting", False):
                self.pauseReading("kex queue")

    def _cancelRekeyDeadline(self) -> None:
        if self._rekeyDeadline is not None and self._rekeyDeadline.active():
            self._rekeyDeadline.cancel()
        self._rekeyDeadline = None

    def _rekeyTimedOut(self) -> None:
        self._rekeyDeadline = None
        self.sendDisconnect(
            conch_transport.DISCONNECT_KEY_EXCHANGE_FAILED, b"key exchange timed out"
        )

    def closeTCP(self) -> None:
        """loseConnection, first dropping our producer: Twisted would otherwise resume a
        paused producer instead of closing once the write buffer drains."""
        tcp = self.transport
        if getattr(tcp, "producer", None) is not None:
            tcp.unregisterProducer()
        tcp.loseConnection()

    def protocolError(self, what: str) -> None:
        """Disconnect a peer that broke the protocol, logging it once."""
        if getattr(self.transport, "disconnecting", False):
            return
        # The one log line is the "closed" line, which carries this reason.
        self.sendDisconnect(conch_transport.DISCONNECT_PROTOCOL_ERROR, what.encode("ascii"))

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        """Send DISCONNECT once, without Conch's multi-line log entry."""
        if getattr(self.transport, "disconnecting", False):
            return
        self._closeReason = f"disconnected by server ({escape(desc[:200])})"
        if (
            reason
            in (
                conch_transport.DISCONNECT_PROTOCOL_ERROR,
                conch_transport.DISCONNECT_MAC_ERROR,
                conch_transport.DISCONNECT_KEY_EXCHANGE_FAILED,
            )
            and not self.isAuthenticated
        ):
            self.penaltyKind = "garbage"
        self.sendPacket(
            conch_transport.MSG_DISCONNECT,
            struct.pack(">L", reason) + conch_transport.NS(desc) + conch_transport.NS(b""),
        )
        self.closeTCP()
