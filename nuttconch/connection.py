# -*- test-case-name: tests.test_circuit,tests.test_channel_security -*-
"""The ssh-connection service: channel-open policy, circuits, flow control, keepalive.

Conch confirms a channel open synchronously and refills windows on its
own; a switchboard must instead confirm a client's ``direct-tcpip`` only
once the initiator has accepted the matching ``forwarded-tcpip`` (so a
refusal reaches the client as an open failure, not a silent close), and
must withhold window until data has really moved on.  Both live here, as
do the guards against channel ids and messages that a peer invents.
"""

from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING, Any

from twisted.conch.ssh import common, connection, forwarding
from twisted.conch.ssh import transport as conch_transport
from twisted.internet import defer, task
from twisted.logger import Logger

from .access import LISTEN
from .budget import budget_of
from .circuit import Circuit, ClientEnd, ICircuitEnd, InitiatorEnd, IPendingEnd, OpenRefused
from .logs import conch_logger
from .names import escape
from .registry import NotFound

log = Logger()

if TYPE_CHECKING:
    from .avatar import SwitchboardAvatar
    from .transport import SwitchboardTransport

OPEN_PROHIBITED = connection.OPEN_ADMINISTRATIVELY_PROHIBITED
OPEN_CONNECT_FAILED = connection.OPEN_CONNECT_FAILED
OPEN_UNKNOWN_TYPE = connection.OPEN_UNKNOWN_CHANNEL_TYPE
OPEN_RESOURCE_SHORTAGE = connection.OPEN_RESOURCE_SHORTAGE

_unpack_2L = struct.Struct(">2L").unpack_from
_unpack_L = struct.Struct(">L").unpack_from
_MAX_WINDOW = 0xFFFFFFFF
# The smallest maximum packet size we accept from a peer (OpenSSH's channels are 32 KiB;
# below this every relayed byte costs a packet of its own).
MIN_MAX_PACKET = 1024
# How much peer-supplied text (a channel type, a refusal reason) we echo or log.
PEER_TEXT_MAX = 200
# Stop reading from a peer that makes us reply while it leaves our replies unread.
READ_PAUSE_BUFFERED = 256 * 1024
# Messages that make us send the peer a reply whatever it reads (opens, requests).
_REPLYING_MESSAGES = frozenset(
    {connection.MSG_GLOBAL_REQUEST, connection.MSG_CHANNEL_OPEN, connection.MSG_CHANNEL_REQUEST}
)
# Channel messages whose first field is our channel id, and whether the channel must be open.
_CHANNEL_MESSAGES = {
    connection.MSG_CHANNEL_OPEN_CONFIRMATION: False,
    connection.MSG_CHANNEL_OPEN_FAILURE: False,
    connection.MSG_CHANNEL_WINDOW_ADJUST: True,
    connection.MSG_CHANNEL_DATA: True,
    connection.MSG_CHANNEL_EXTENDED_DATA: True,
    connection.MSG_CHANNEL_EOF: True,
    connection.MSG_CHANNEL_CLOSE: True,
    connection.MSG_CHANNEL_REQUEST: True,
    connection.MSG_CHANNEL_SUCCESS: True,
    connection.MSG_CHANNEL_FAILURE: True,
}
# Messages a peer may still send for a channel that has closed both ways: it built them
# before it saw our CLOSE (paramiko does so routinely); OpenSSH ignores them as we do.
# They are exactly the messages that need an open channel.
_LATE_MESSAGES = frozenset(m for m, mustBeOpen in _CHANNEL_MESSAGES.items() if mustBeOpen)
_unpack_3L = struct.Struct(">3L").unpack_from


def peer_text(value: bytes | str) -> str:
    """Peer-supplied text cut before it is escaped, so its size costs us nothing."""
    text = escape(value[:PEER_TEXT_MAX])
    if len(value) > PEER_TEXT_MAX or len(text) > PEER_TEXT_MAX:
        return text[:PEER_TEXT_MAX] + "..."
    return text


class SwitchboardConnection(connection.SSHConnection):
    """One authenticated SSH connection, as client, initiator, or both."""

    _log = conch_logger("nuttconch.connection.SwitchboardConnection")

    transport: SwitchboardTransport

    def __init__(self) -> None:
        super().__init__()
        self.pendingOpens: dict[int, Any] = {}
        self.circuits: set[Circuit] = set()
        self._keepalive: task.LoopingCall | None = None
        self._unanswered = 0
        self._idleCall: Any = None
        self.stopped = False
        self.lateMessages = 0
        self.badRequests = 0

    @property
    def avatar(self) -> SwitchboardAvatar:
        avatar: SwitchboardAvatar = self.transport.avatar  # type: ignore[assignment]
        return avatar

    @property
    def config(self) -> Any:
        return self.transport.factory.config

    def serviceStarted(self) -> None:
        super().serviceStarted()
        # Learn when our socket's write buffer is full, so circuits stop granting window;
        # whatever held that place before (a service this one replaces) gives it up.
        tcp = self.transport.transport
        if getattr(tcp, "registerProducer", None) is not None and tcp.producer is not self:
            if tcp.producer is not None:
                tcp.unregisterProducer()
            tcp.registerProducer(self, True)
        interval = self.config.client_alive_interval
        if interval > 0:
            self._keepalive = task.LoopingCall(self._sendKeepalive)
            self._keepalive.clock = self.transport.clock
            self._keepalive.start(interval, now=False)
        self.touch()

    def serviceStopped(self) -> None:
        self.stopped = True
        self.congested = False
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        if self._idleCall is not None and self._idleCall.active():
            self._idleCall.cancel()
        for pending in list(self.pendingOpens.values()):
            pending.cancel()
        self.pendingOpens.clear()
        super().serviceStopped()

    # IPushProducer, registered on our own TCP transport: only its congestion is used.

    congested = False
    _flushTurn = 0

    def pauseProducing(self) -> None:
        self.congested = True

    def resumeProducing(self) -> None:
        """The socket drained: let queued circuit ends send, starting after the one that
        went first last time, so that under sustained congestion none is starved.
        During a key exchange everything would only queue: the transport resumes us
        when it ends."""
        if getattr(self.transport, "keyExchanging", False):
            return
        self.congested = False
        resumeReading = getattr(self.transport, "resumeReading", None)
        if resumeReading is not None:
            resumeReading("replies unread")
        chans = list(self.channels.values())
        if not chans:
            return
        self._flushTurn = start = (self._flushTurn + 1) % len(chans)
        for chan in chans[start:] + chans[:start]:
            flush = getattr(chan, "flush", None)
            if flush is not None:
                flush()
                if self.congested:
                    break

    def stopProducing(self) -> None:
        self.congested = False

    # keepalive and idle timeout

    def _sendKeepalive(self) -> None:
        if self._unanswered >= self.config.client_alive_count_max:
            log.info(
                "conn {conn_id}: no answer to {count} keepalives, disconnecting",
                conn_id=self.transport.connId,
                count=self._unanswered,
            )
            self.transport.sendDisconnect(
                conch_transport.DISCONNECT_CONNECTION_LOST, b"keepalive timeout"
            )
            return
        self._unanswered += 1
        d = self.sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=1)
        d.addBoth(self._keepaliveAnswered)

    def _keepaliveAnswered(self, _: object) -> None:
        # OpenSSH answers FAILURE to unknown global requests: any answer means alive.
        self._unanswered = 0

    def touch(self) -> None:
        """Restart the unused-connection timer when the connection holds nothing."""
        timeout = self.config.unused_connection_timeout
        if timeout <= 0 or self.stopped:
            return
        busy = bool(self.channels or self.pendingOpens or self.avatar.holdsPorts())
        if self._idleCall is not None and self._idleCall.active():
            self._idleCall.cancel()
        self._idleCall = None
        if not busy:
            self._idleCall = self.transport.clock.callLater(timeout, self._idleTimeout)

    def _idleTimeout(self) -> None:
        self._idleCall = None
        log.info(
            "conn {conn_id}: unused for {timeout}s, disconnecting",
            conn_id=self.transport.connId,
            timeout=self.config.unused_connection_timeout,
        )
        self.transport.sendDisconnect(
            conch_transport.DISCONNECT_BY_APPLICATION, b"unused connection timeout"
        )

    # message guards

    def packetReceived(self, messageNum: int, packet: bytes) -> Any:
        """Refuse messages naming channels that never existed, instead of crashing; drop
        the late ones for channels that have closed (the peer sent them before it saw
        our CLOSE: a disconnect would cut every other circuit of the connection)."""
        mustBeOpen = _CHANNEL_MESSAGES.get(messageNum)
        if mustBeOpen is not None:
            (localChannel,) = struct.unpack(">L", packet[:4])
            chan = self.channels.get(localChannel)
            if chan is None:
                if messageNum in _LATE_MESSAGES and localChannel < self.localChannelID:
                    self.lateMessages += 1
                    return None
                self.transport.protocolError(f"message {messageNum} for unknown channel")
                return None
            isOpen = chan in self.channelsToRemoteChannel
            if mustBeOpen != isOpen:
                self.transport.protocolError(f"message {messageNum} in wrong channel state")
                return None
        result = super().packetReceived(messageNum, packet)
        if messageNum in _REPLYING_MESSAGES:
            self._pauseReadingIfUnread()
        return result

    def _pauseReadingIfUnread(self) -> None:
        """A peer that sends requests but leaves the replies unread would make our
        output buffer grow without end: stop reading from it until the buffer drains
        (Twisted then calls resumeProducing)."""
        tcp = self.transport.transport
        if getattr(tcp, "producer", None) is not self:
            return
        buffered = (
            len(getattr(tcp, "dataBuffer", b""))
            - getattr(tcp, "offset", 0)
            + getattr(tcp, "_tempDataLen", 0)
        )
        if buffered > READ_PAUSE_BUFFERED:
            self.transport.pauseReading("replies unread")

    def ssh_CHANNEL_WINDOW_ADJUST(self, packet: bytes) -> None:
        localChannel, bytesToAdd = struct.unpack(">2L", packet[:8])
        chan = self.channels[localChannel]
        if chan.remoteWindowLeft + bytesToAdd > _MAX_WINDOW:
            self.transport.protocolError("window adjust overflows 2^32-1")
            return
        chan.addWindowBytes(bytesToAdd)

    def channelData(self, packet: Any) -> None:
        """CHANNEL_DATA from the transport's short path: an open channel goes straight to
        ssh_CHANNEL_DATA; any other case through packetReceived, which refuses it."""
        chan = self.channels.get(_unpack_L(packet, 0)[0])
        if chan is None or chan not in self.channelsToRemoteChannel:
            self.packetReceived(connection.MSG_CHANNEL_DATA, packet)
            return
        self.ssh_CHANNEL_DATA(packet)

    def ssh_CHANNEL_EXTENDED_DATA(self, packet: bytes) -> None:
        """Extended data on a circuit end is checked and counted as CHANNEL_DATA is:
        Conch's handler would refill the whole window, which the splice then grants
        again, so a byte of it after each window let a client push without limit."""
        localChannel, typeCode, dataLength = _unpack_3L(packet, 0)
        chan = self.channels[localChannel]
        if not getattr(chan, "manualWindow", False):
            return super().ssh_CHANNEL_EXTENDED_DATA(packet)
        data = self._takeWindowed(chan, packet, 12, dataLength, "extended data")
        if data is not None:
            chan.extReceived(typeCode, data)
        return None

    def ssh_CHANNEL_DATA(self, packet: bytes) -> None:
        """Data for circuit ends does not auto-refill the window: the splice grants it.

        ``packet`` may be a memoryview of the decrypted packet (the transport's fast
        path): circuit ends get a view of the data, other channels bytes."""
        localChannel, dataLength = _unpack_2L(packet, 0)
        chan = self.channels[localChannel]
        if not getattr(chan, "manualWindow", False):
            return super().ssh_CHANNEL_DATA(bytes(packet))
        data = self._takeWindowed(chan, packet, 8, dataLength, "channel data")
        if data is not None:
            chan.dataReceived(data)
        return None

    def _takeWindowed(self, chan: Any, packet: Any, start: int, dataLength: int, what: str) -> Any:
        """The data of a (possibly extended) data message for a circuit end, charged to
        its window; None if the message breaks the window or packet size (the connection
        is then ended), is truncated, or the channel has closed on our side."""
        if dataLength > chan.localWindowLeft or dataLength > chan.localMaxPacket:
            self.transport.protocolError(f"{what} exceeds the window or packet size")
            return None
        data = packet[start : start + dataLength]
        if len(data) != dataLength:
            self.transport.protocolError(f"truncated {what}")
            return None
        chan.localWindowLeft -= dataLength
        if chan.localClosed:
            return None
        return data

    def ssh_CHANNEL_EOF(self, packet: bytes) -> None:
        localChannel = struct.unpack(">L", packet[:4])[0]
        chan = self.channels[localChannel]
        if not chan.localClosed:
            chan.eofReceived()

    def ssh_CHANNEL_REQUEST(self, packet: bytes) -> Any:
        """Conch's handler leaves an unhandled error in a Deferred when a request that
        wants no reply fails (a non-ASCII type, a short window-change): a failing
        request is consumed here, answered FAILURE if a reply is wanted, and noted."""
        localChannel = struct.unpack(">L", packet[:4])[0]
        chan = self.channels[localChannel]
        if chan.localClosed:
            return None
        requestType, rest = common.getNS(packet[4:])
        if not rest:
            self.transport.protocolError("truncated channel request")
            return None
        wantReply = rest[0]
        d = defer.maybeDeferred(chan.requestReceived, requestType, rest[1:])
        d.addErrback(self._requestFailed, requestType)
        if wantReply:
            d.addCallback(self._answerRequest, localChannel)
        return d

    def _requestFailed(self, failure: Any, requestType: bytes) -> int:
        self.noteBadRequest(
            f"channel request {peer_text(requestType)} failed"
            f" ({failure.type.__name__}: {peer_text(str(failure.value))})"
        )
        return 0

    def noteBadRequest(self, text: str) -> None:
        """Log the first refused or malformed request of a connection, at info; the
        rest are only counted, so that repeating one cannot fill the log."""
        self.badRequests += 1
        if self.badRequests == 1:
            log.info(
                "conn {conn_id}: {what}; further bad requests on this connection are not logged",
                conn_id=self.transport.connId,
                what=text,
            )

    def _answerRequest(self, result: Any, localChannel: int) -> None:
        remote = self.localToRemoteChannel.get(localChannel)
        if remote is None:  # the channel closed meanwhile
            return
        reply = connection.MSG_CHANNEL_SUCCESS if result else connection.MSG_CHANNEL_FAILURE
        self.transport.sendPacket(reply, struct.pack(">L", remote))

    def ssh_CHANNEL_CLOSE(self, packet: bytes) -> None:
        localChannel = struct.unpack(">L", packet[:4])[0]
        chan = self.channels[localChannel]
        if chan.remoteClosed:
            return
        super().ssh_CHANNEL_CLOSE(packet)
        self.touch()

    def ssh_CHANNEL_OPEN_CONFIRMATION(self, packet: bytes) -> None:
        """An initiator that confirms our ``forwarded-tcpip`` with a tiny maximum packet
        size would make every relayed byte a packet of its own (and 0 would fail inside
        the client's connection): the circuit is refused here, on the initiator's
        connection, and the client is told why."""
        localChannel, remoteChannel, windowSize, maxPacket = struct.unpack(">4L", packet[:16])
        chan = self.channels[localChannel]
        if maxPacket >= MIN_MAX_PACKET or not isinstance(chan, InitiatorEnd):
            super().ssh_CHANNEL_OPEN_CONFIRMATION(packet)
            return
        chan.conn = self
        self.localToRemoteChannel[localChannel] = remoteChannel
        self.channelsToRemoteChannel[chan] = remoteChannel
        chan.remoteWindowLeft = windowSize
        chan.remoteMaxPacket = maxPacket
        text = (
            f"initiator's maximum packet size {maxPacket} is too small (at least {MIN_MAX_PACKET})"
        )
        log.info(
            "conn {conn_id}: circuit refused: {reason}", conn_id=self.transport.connId, reason=text
        )
        chan.refuse(OpenRefused(OPEN_CONNECT_FAILED, text))
        self.sendClose(chan)

    def channelClosed(self, channel: Any) -> None:
        super().channelClosed(channel)
        self.touch()

    # channel opens

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        channelType, rest = common.getNS(packet)
        senderChannel, windowSize, maxPacket = struct.unpack(">3L", rest[:12])
        extra = rest[12:]
        try:
            if (
                senderChannel in self.pendingOpens
                or senderChannel in self.localToRemoteChannel.values()
            ):
                raise OpenRefused(OPEN_PROHIBITED, "channel id already in use")
            if len(self.channels) + len(self.pendingOpens) >= self.config.max_channels:
                raise OpenRefused(OPEN_RESOURCE_SHORTAGE, "too many open channels")
            if maxPacket < MIN_MAX_PACKET:
                raise OpenRefused(
                    OPEN_PROHIBITED,
                    f"maximum packet size {maxPacket} is too small (at least {MIN_MAX_PACKET})",
                )
            if channelType == b"direct-tcpip":
                self._openCircuit(senderChannel, windowSize, maxPacket, extra)
                return
            if channelType not in self.avatar.channelLookup:
                raise OpenRefused(
                    OPEN_UNKNOWN_TYPE, f"unknown channel type {peer_text(channelType)}"
                )
        except OpenRefused as refused:
            self.refuseOpen(senderChannel, refused.code, refused.message)
            return
        super().ssh_CHANNEL_OPEN(packet)
        self.touch()

    def refuseOpen(self, senderChannel: int, code: int, message: str) -> None:
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN_FAILURE,
            struct.pack(">2L", senderChannel, code)
            + common.NS(message.encode("ascii", "replace"))
            + common.NS(b""),
        )

    def _openCircuit(
        self, senderChannel: int, windowSize: int, maxPacket: int, extra: bytes
    ) -> None:
        avatar = self.avatar
        peer = self.transport._peerHost
        if LISTEN not in avatar.identity.access:
            log.info(
                "conn {conn_id}: circuit refused, key {fingerprint} lacks access=listen",
                conn_id=self.transport.connId,
                fingerprint=avatar.identity.fingerprint,
            )
            self.transport.factory.circuitFailed("", "refused", "lacks access=listen")
            raise OpenRefused(OPEN_PROHIBITED, "permission denied: this key may not open circuits")
        try:
            (host, port), (origHost, origPort) = forwarding.unpackOpen_direct_tcpip(extra)
        except (struct.error, UnicodeDecodeError, ValueError, IndexError):
            raise OpenRefused(OPEN_CONNECT_FAILED, "malformed direct-tcpip request") from None
        if len(host) > 255 or not 0 < port <= 65535:
            raise OpenRefused(OPEN_CONNECT_FAILED, "no such listener: bad name or port")
        why = avatar.identity.policy.open_refusal(host, port)
        if why is not None:
            # Before the registry is asked, so a restricted key learns nothing of other names.
            log.info(
                "conn {conn_id}: circuit to {target}:{port} refused: {why}",
                conn_id=self.transport.connId,
                target=escape(host),
                port=port,
                why=escape(why),
            )
            self.transport.factory.circuitFailed(f"{escape(host)}:{port}", "refused", "key options")
            avatar.circuitMissed()  # bounded like guesses: a loop of them is disconnected
            raise OpenRefused(OPEN_PROHIBITED, escape(why))
        registry = self.transport.factory.registry
        try:
            route = registry.resolve(host, port)
        except NotFound as exc:
            log.info(
                "conn {conn_id}: circuit to {target}:{port} refused: {reason}",
                conn_id=self.transport.connId,
                target=escape(host),
                port=port,
                reason=str(exc),
            )
            self.transport.factory.circuitFailed(f"{escape(host)}:{port}", "no_such_name", str(exc))
            avatar.circuitMissed()
            raise OpenRefused(OPEN_CONNECT_FAILED, str(exc)) from None
        origin = (peer, self.transport.transport.getPeer().port)
        # A listener held by another node of a cluster is reached through the hop to it.
        hops = getattr(self.transport.factory, "hops", None)
        opener = hops.openerFor(route) if hops is not None else route.opener
        self.startCircuit(
            senderChannel, windowSize, maxPacket, opener, route.name, route.bind_host, port,
            origin, peer, route.listener_id,
        )  # fmt: skip

    def startCircuit(
        self,
        senderChannel: int,
        windowSize: int,
        maxPacket: int,
        opener: Any,
        name: str,
        bindHost: str,
        port: int,
        origin: tuple[str, int],
        clientPeer: str,
        listenerId: str,
    ) -> None:
        """Ask ``opener`` for the far end and confirm the client's channel once it answers
        (shared by the public port's direct-tcpip and the relay port's hop channels)."""
        target = f"{name}:{port}"
        budget = budget_of(self)
        short = budget.refusal() if budget is not None else None
        if short is not None:
            self.transport.factory.circuitFailed(target, "refused", short)
            raise OpenRefused(OPEN_RESOURCE_SHORTAGE, short)
        circuit = Circuit(next(self.transport.factory.circuitIds), target, clientPeer, listenerId)
        # Raises OpenRefused when the far end cannot even be asked.
        initiatorEnd = opener.openForwarded(bindHost, port, origin)
        pending = PendingOpen(self, senderChannel, windowSize, maxPacket, circuit, initiatorEnd)
        self.pendingOpens[senderChannel] = pending
        pending.start(self.config.channel_open_timeout, self.transport.clock)

    def openForwarded(self, bindHost: str, port: int, origin: tuple[str, int]) -> InitiatorEnd:
        """Open the ``forwarded-tcpip`` channel toward this (initiator) connection."""
        if self.stopped:
            raise OpenRefused(OPEN_CONNECT_FAILED, "initiator is gone")
        if len(self.channels) >= self.config.max_channels:
            raise OpenRefused(OPEN_RESOURCE_SHORTAGE, "initiator has too many open channels")
        end = InitiatorEnd(
            localWindow=self.config.channel_window,
            localMaxPacket=32768,
            conn=self,
            avatar=self.avatar,
        )
        self.openChannel(end, forwarding.packOpen_forwarded_tcpip((bindHost, port), origin))
        self.touch()
        return end

    def completeOpen(self, pending: PendingOpen, initiatorEnd: ICircuitEnd) -> None:
        """The initiator accepted: register and confirm the client's channel, then splice."""
        del self.pendingOpens[pending.senderChannel]
        client = ClientEnd(
            localWindow=self.config.channel_window,
            localMaxPacket=32768,
            remoteWindow=pending.windowSize,
            remoteMaxPacket=pending.maxPacket,
            conn=self,
            avatar=self.avatar,
        )
        localChannel: int = self.localChannelID
        self.localChannelID += 1
        client.id = localChannel  # type: ignore[assignment]
        self.channels[localChannel] = client
        self.channelsToRemoteChannel[client] = pending.senderChannel
        self.localToRemoteChannel[localChannel] = pending.senderChannel
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN_CONFIRMATION,
            struct.pack(
                ">4L",
                pending.senderChannel,
                localChannel,
                client.localWindowSize,
                client.localMaxPacket,
            ),
        )
        circuit = pending.circuit
        circuit.link(client, initiatorEnd)
        self.circuits.add(circuit)
        circuit.onClose.append(self.circuits.discard)
        circuit.started = time.monotonic()
        self.transport.factory.circuitOpened(circuit, circuit.started - pending.started)
        log.info(
            "circuit {circuit_id} to {target} from {client} opened",
            circuit_id=circuit.id,
            target=circuit.target,
            client=circuit.client_peer,
        )

    def failOpen(self, pending: PendingOpen, message: str, outcome: str) -> None:
        self.pendingOpens.pop(pending.senderChannel, None)
        self.transport.factory.circuitFailed(pending.circuit.target, outcome, message)
        if not self.stopped:
            self.refuseOpen(pending.senderChannel, OPEN_CONNECT_FAILED, message)
            log.info(
                "circuit to {target} from {client} failed: {reason}",
                target=pending.circuit.target,
                client=pending.circuit.client_peer,
                reason=message,
            )
            self.touch()


class PendingOpen:
    """A client's direct-tcpip waiting for the initiator's answer, with a deadline."""

    def __init__(
        self,
        conn: SwitchboardConnection,
        senderChannel: int,
        windowSize: int,
        maxPacket: int,
        circuit: Circuit,
        initiatorEnd: IPendingEnd,
    ) -> None:
        self.conn = conn
        self.senderChannel = senderChannel
        self.windowSize = windowSize
        self.maxPacket = maxPacket
        self.circuit = circuit
        self.initiatorEnd = initiatorEnd
        self.timer: Any = None
        self.started = time.monotonic()

    def start(self, timeout: float, clock: Any) -> None:
        if timeout > 0:
            self.timer = clock.callLater(timeout, self._timedOut)
        self.initiatorEnd.opened.addCallbacks(self._accepted, self._refused)

    def _stopTimer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _accepted(self, end: ICircuitEnd) -> None:
        self._stopTimer()
        if self.conn.stopped:
            end.loseConnection()
            return
        self.conn.completeOpen(self, end)

    def _refused(self, reason: Any) -> None:
        self._stopTimer()
        detail = getattr(reason.value, "value", None)
        if isinstance(reason.value, OpenRefused):
            text = reason.value.message
        elif isinstance(detail, bytes) and detail:
            text = f"initiator refused: {peer_text(detail)}"
        else:
            text = "initiator refused: connection to the initiator was lost"
        self.conn.failOpen(self, text, "initiator_refused")

    def _timedOut(self) -> None:
        self.timer = None
        self.initiatorEnd.abandon()
        self.conn.failOpen(self, "initiator did not answer in time", "timeout")

    def cancel(self) -> None:
        """The client connection is going away: drop the initiator side when it answers."""
        self._stopTimer()
        self.initiatorEnd.abandon()
