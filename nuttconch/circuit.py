# -*- test-case-name: tests.test_circuit -*-
"""The splice: two SSH channels joined into one circuit with real backpressure.

Conch refills a channel's receive window as soon as data arrives, whether
or not anyone consumed it, so a naive splice buffers without limit when
one side is slower.  Here each end grants window back to its sender only
for bytes its peer has actually passed on (not those still queued in the
peer's write buffer), so a circuit holds at most about one window per
direction, whatever the speeds.  EOF waits for the peer's buffer to drain,
and a close from either side closes both ends.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.conch.ssh import channel
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from .budget import budget_of
from .logs import conch_logger

log = Logger()


class OpenRefused(Exception):
    """A channel open we refuse; ``code`` is the SSH reason code.

    It belongs to the opener contract below: an opener raises it (or fails a
    pending end's ``opened`` with it) and the client is told ``message``.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ICircuitEnd(Interface):
    """One end of a circuit, as the other end sees it.

    The splice only ever talks to its peer through these methods, so an end
    need not be a Conch channel: a hop to another node is a second kind of
    end.  Flow control is by consumption: an end grants its own sender more
    window only for bytes its peer has passed on (``queued`` tells how many
    it still holds), and the peer calls ``passedOn`` when that number falls.
    """

    peer = Attribute("The other ICircuitEnd once the circuit is linked, else None.")
    circuit = Attribute("The Circuit this end belongs to, once linked.")
    bytesIn = Attribute("Bytes this end has received from its own far side.")

    def write(data: bytes) -> None:
        """Pass ``data`` on toward this end's far side; queue what cannot go yet."""

    def writeEOF() -> None:
        """No more data will come: send EOF once everything queued has gone."""

    def loseConnection() -> None:
        """Close once everything queued has gone (a pending EOF first)."""

    def abort() -> None:
        """Close at once, dropping whatever is queued."""

    def queued() -> int:
        """Bytes accepted by ``write`` and not yet passed on."""

    def passedOn() -> None:
        """The peer's queue shrank: re-open window for the bytes it passed on."""

    def isClosed() -> bool:
        """Whether this end has closed (its writes are dropped from then on)."""

    def pauseProducing() -> None:
        """Stop granting this end's sender window (reading stops when it runs out)."""

    def resumeProducing() -> None:
        """Grant window again for what has been passed on meanwhile."""


class IPendingEnd(Interface):
    """A far end being opened: the answer may come late, or never."""

    opened = Attribute(
        "Deferred that fires with the open ICircuitEnd, or fails (OpenRefused, or the"
        " far side's own refusal) if it could not be opened."
    )

    def abandon() -> None:
        """Nobody waits any longer: close the end if it opens after all."""


class IOpener(Interface):
    """Whatever holds a listener's ports and opens circuit ends toward it.

    Today the initiator's avatar (a ``forwarded-tcpip`` channel on its own
    connection); in a cluster, a hop to the node that holds the listener.
    """

    def openForwarded(bindHost: str, port: int, origin: tuple[str, int]) -> IPendingEnd:
        """Start opening a far end for ``bindHost:port`` on behalf of ``origin``
        (the client's address and port), or raise OpenRefused at once."""

    def disconnect(reason: str) -> bool:
        """Drop the listener's connection; False if it was already leaving."""


@implementer(ICircuitEnd)
class CircuitEnd(channel.SSHChannel):
    """One side of a circuit; ``peer`` is the other side once both are open."""

    _log = conch_logger("nuttconch.circuit.CircuitEnd")

    manualWindow = True
    conn: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.peer: ICircuitEnd | None = None
        self.held = 0
        self.paused = False
        self.eofPending = False
        self.bytesIn = 0
        self.circuit: Circuit | None = None
        self.buf: bytearray = bytearray()  # type: ignore[assignment]
        # The memory budget decides the window this end may advertise (see budget.py).
        self.allotment = self.localWindowSize
        self.budget = budget_of(self.conn)
        if self.budget is not None:
            window = self.budget.open(self, self.conn)
            self.localWindowSize = self.localWindowLeft = window

    # receiving

    def dataReceived(self, data: bytes) -> None:
        self.bytesIn += len(data)
        peer = self.peer
        if peer is None or peer.isClosed():
            return
        self.held += len(data)
        try:
            peer.write(data)
        except Exception:
            # The peer end lives on another connection: whatever went wrong there must
            # not unwind into this connection's packet handling and drop all of it.
            log.failure(
                "circuit {circuit_id}: sending to the other end failed; circuit closed",
                circuit_id=self.circuit.id if self.circuit is not None else "?",
            )
            self.circuitFailed()
            return
        self.grant()

    def circuitFailed(self) -> None:
        """Close both ends at once, dropping whatever either still queues."""
        peer = self.peer
        if peer is not None:
            peer.abort()
        self.abort()

    # the ICircuitEnd contract, as the peer uses it

    def abort(self) -> None:
        if self.conn is not None and not self.localClosed:
            self.buf = bytearray()
            self.eofPending = False
            self.conn.sendClose(self)

    def queued(self) -> int:
        return len(self.buf)

    def passedOn(self) -> None:
        if not self.localClosed:
            self.grant()

    def isClosed(self) -> bool:
        return bool(self.localClosed)

    def writeEOF(self) -> None:
        if self.localClosed:
            return
        if self.buf:
            self.eofPending = True
        else:
            self.conn.sendEOF(self)

    def pauseProducing(self) -> None:
        """Withhold window: the sender stops once what it was granted is used up."""
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if not self.localClosed:
            self.grant()

    def extReceived(self, dataType: int, data: bytes) -> None:
        """Extended data has no meaning on a TCP circuit: it is dropped, and its window
        given back with the data's, exactly once (``held`` minus what the peer still
        queues is what has been consumed)."""
        if self.peer is None:
            return
        self.held += len(data)
        self.grant()

    def grant(self) -> None:
        """Re-open the window for bytes the peer has passed on."""
        if self.paused:
            return
        peer = self.peer
        queued = peer.queued() if peer is not None else 0
        grantable = self.held - queued
        # As OpenSSH does: adjust once three packets' worth (or half a small window) has
        # moved on, not only after half the window, so a long link's sender is not left
        # waiting on a half-empty window for a round trip.
        if grantable > 0 and (
            grantable >= min(self.localWindowSize // 2, 3 * self.localMaxPacket)
            or self.localWindowLeft < self.localMaxPacket
        ):
            self.held -= grantable
            if self.budget is not None:
                grantable = self.budget.regrant(self, grantable)
            if grantable > 0:
                self.conn.adjustWindow(self, grantable)

    # sending: our own write path, with a bytearray queue instead of Conch's bytes buffer

    def write(self, data: bytes) -> None:
        """Send what the peer's window allows and queue the rest.

        The queue is a bytearray (appending and consuming from the front are cheap, no
        2 MiB copies per packet), and while this connection's socket is backed up nothing
        is sent: a slow reader's bytes then wait here, where they hold back the sender's
        window, instead of piling up in Twisted's TCP write buffer as well.
        """
        if self.buf or self.conn.congested:
            self.buf += data
            return
        size = min(len(data), self.remoteWindowLeft)
        sent = self._sendPackets(data, size)
        if sent < len(data):
            self.buf += data[sent:]

    def _sendPackets(self, data: bytes | memoryview, size: int) -> int:
        """Send data[:size] as CHANNEL_DATA packets of at most the peer's packet size,
        as views: the transport seals them from pieces, without joining copies.

        Returns how much was sent: it stops early once the socket is congested, so one
        call never seals more than the socket's buffer takes (with a peer's 4 GiB
        window, that would hold the reactor for everyone); the caller queues the rest.
        """
        if size <= 0:
            return 0
        conn = self.conn
        sent = size
        if not self.localClosed:  # as SSHConnection.sendData: nothing after our close
            fast = getattr(conn.transport, "sendChannelData", None)
            if fast is not None:
                send, to = fast, conn.channelsToRemoteChannel[self]
            else:
                send, to = conn.sendData, self
            view = memoryview(data)
            if size != len(data):
                view = view[:size]
            rmp = self.remoteMaxPacket
            if size <= rmp:
                send(to, view)
            else:
                for offset in range(0, size, rmp):
                    send(to, view[offset : offset + rmp])
                    if conn.congested:
                        sent = min(size, offset + rmp)
                        break
        self.remoteWindowLeft -= sent
        return sent

    def flush(self) -> None:
        """Send queued bytes as far as the window allows; then a pending EOF or close."""
        buf = self.buf
        if buf and not self.conn.congested and not self.localClosed:
            size = min(len(buf), self.remoteWindowLeft)
            if size > 0:
                with memoryview(buf) as view:
                    sent = self._sendPackets(view, size)
                del buf[:sent]
        if buf:
            return
        if self.closing:
            self.loseConnection()
        elif self.eofPending and not self.localClosed:
            self.eofPending = False
            self.conn.sendEOF(self)
        peer = self.peer
        if peer is not None:
            peer.passedOn()

    def addWindowBytes(self, data: int) -> None:
        self.remoteWindowLeft += data
        self.flush()

    def eofReceived(self) -> None:
        peer = self.peer
        if peer is not None:
            peer.writeEOF()

    def closeReceived(self) -> None:
        """The remote end is gone: nothing more can be sent to it, so close at once."""
        self.buf = bytearray()
        self.eofPending = False
        if self.conn is not None:
            self.conn.sendClose(self)
        peer = self.peer
        if peer is not None and not peer.isClosed():
            peer.loseConnection()

    def loseConnection(self) -> None:
        """Close after the write buffer drains (pending EOF first, if any)."""
        self.closing = 1
        if not self.buf and self.conn is not None:
            if self.eofPending and not self.localClosed:
                self.eofPending = False
                self.conn.sendEOF(self)
            self.conn.sendClose(self)

    def openFailed(self, reason: Any) -> None:
        """Never opened: its allotment returns to the budget (no Conch log line)."""
        if self.budget is not None:
            self.budget.close(self)

    def closed(self) -> None:
        if self.budget is not None:
            self.budget.close(self)
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            if not peer.isClosed():
                peer.loseConnection()
        if self.circuit is not None:
            self.circuit.endClosed(self)


class ClientEnd(CircuitEnd):
    """The client's ``direct-tcpip`` channel (``ssh -L/-W/-J/-D``)."""

    name = b"direct-tcpip"


@implementer(IPendingEnd)
class InitiatorEnd(CircuitEnd):
    """The ``forwarded-tcpip`` channel the server opens toward the initiator."""

    name = b"forwarded-tcpip"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened: defer.Deferred[InitiatorEnd] = defer.Deferred()
        self.abandoned = False

    def channelOpen(self, specificData: bytes) -> None:
        if self.abandoned:
            # The client gave up (timeout, or its connection died) before the answer came.
            self.loseConnection()
        else:
            self.opened.callback(self)

    def openFailed(self, reason: Any) -> None:
        super().openFailed(reason)
        if not self.abandoned:
            self.opened.errback(reason)

    def abandon(self) -> None:
        self.abandoned = True

    def refuse(self, reason: Exception) -> None:
        """The initiator confirmed, but on terms we refuse: fail the waiting client's
        open as if the initiator had refused (the caller closes this channel)."""
        if not self.abandoned and not self.opened.called:
            self.opened.errback(reason)


class Circuit:
    """Bookkeeping for one spliced pair: ids, bytes and lifetime for logs and status."""

    def __init__(
        self, circuit_id: int, target: str, client_peer: str, listener_id: str = ""
    ) -> None:
        self.id = circuit_id
        self.target = target
        # The registry's id of the listener this circuit reaches (see registry.Route).
        self.listener_id = listener_id
        self.client_peer = client_peer
        self.started = time.monotonic()
        self.client: ICircuitEnd | None = None
        self.initiator: ICircuitEnd | None = None
        self.onClose: list[Any] = []
        self._done = False

    def link(self, client: ICircuitEnd, initiator: ICircuitEnd) -> None:
        self.client, self.initiator = client, initiator
        client.peer, initiator.peer = initiator, client
        client.circuit = initiator.circuit = self

    @property
    def bytes_up(self) -> int:
        """Client to initiator."""
        return self.client.bytesIn if self.client else 0

    @property
    def bytes_down(self) -> int:
        return self.initiator.bytesIn if self.initiator else 0

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started

    def endClosed(self, end: ICircuitEnd) -> None:
        if self._done:
            return
        if self.client is not None and self.initiator is not None:
            if not (self.client.isClosed() and self.initiator.isClosed()):
                return
        self._done = True
        log.info(
            "circuit {circuit_id} to {target} from {client} closed: {bytes_up} bytes up,"
            " {bytes_down} bytes down, {duration:.3f}s",
            circuit_id=self.id,
            target=self.target,
            client=self.client_peer,
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            duration=self.duration,
        )
        for callback in self.onClose:
            callback(self)
