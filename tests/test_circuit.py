"""The splice driven in memory: two circuit ends on recording connections, no OpenSSH.

This is the middle layer between the unit tests and the end-to-end ones: each
test feeds an end what its connection would (data, EOF, CLOSE, window) and
checks what the ends send in return, so backpressure, half-close, close races
and far ends that refuse or never answer are checked exactly and quickly.
"""

from __future__ import annotations

from typing import Any

from twisted.conch.error import ConchError
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from nuttconch.avatar import SwitchboardAvatar
from nuttconch.circuit import (
    Circuit,
    ClientEnd,
    ICircuitEnd,
    InitiatorEnd,
    IOpener,
    IPendingEnd,
    OpenRefused,
)
from nuttconch.connection import PendingOpen

WINDOW = 64 * 1024
PACKET = 16 * 1024


class RecordingConnection:
    """The part of SSHConnection a circuit end uses, recording what is sent, with
    Conch's close bookkeeping (an end is closed once CLOSE went both ways)."""

    def __init__(self) -> None:
        self.congested = False
        self.transport = None
        self.channelsToRemoteChannel: dict[Any, int] = {}
        self.sent: list[tuple[str, Any, Any]] = []

    def sendData(self, chan: Any, data: Any) -> None:
        self.sent.append(("data", chan, bytes(data)))

    def adjustWindow(self, chan: Any, amount: int) -> None:
        chan.localWindowLeft += amount
        self.sent.append(("adjust", chan, amount))

    def sendEOF(self, chan: Any) -> None:
        self.sent.append(("eof", chan, None))

    def sendClose(self, chan: Any) -> None:
        if chan.localClosed:
            return
        self.sent.append(("close", chan, None))
        chan.localClosed = True
        if chan.remoteClosed:
            chan.closed()

    # what the far side does

    def receive(self, chan: Any, data: bytes) -> None:
        """CHANNEL_DATA arrives, as SwitchboardConnection.ssh_CHANNEL_DATA passes it on."""
        assert len(data) <= chan.localWindowLeft, "the sender overran its window"
        chan.localWindowLeft -= len(data)
        chan.dataReceived(data)

    def remoteClose(self, chan: Any) -> None:
        chan.closeReceived()
        chan.remoteClosed = True
        if chan.localClosed:
            chan.closed()

    # reading the record

    def data(self, chan: Any) -> bytes:
        return b"".join(p for kind, c, p in self.sent if kind == "data" and c is chan)

    def granted(self, chan: Any) -> int:
        return sum(p for kind, c, p in self.sent if kind == "adjust" and c is chan)

    def kinds(self, chan: Any) -> list[str]:
        return [kind for kind, c, _ in self.sent if c is chan]


def splice(
    clientWindow: int = WINDOW, initiatorWindow: int = WINDOW
) -> tuple[Circuit, ClientEnd, InitiatorEnd, RecordingConnection, RecordingConnection]:
    """A linked circuit; the window arguments are what each far side grants us."""
    cconn, iconn = RecordingConnection(), RecordingConnection()
    client = ClientEnd(
        localWindow=WINDOW,
        localMaxPacket=PACKET,
        remoteWindow=clientWindow,
        remoteMaxPacket=PACKET,
        conn=cconn,
    )
    initiator = InitiatorEnd(localWindow=WINDOW, localMaxPacket=PACKET, conn=iconn)
    initiator.remoteWindowLeft = initiatorWindow
    initiator.remoteMaxPacket = PACKET
    initiator.channelOpen(b"")
    circuit = Circuit(1, "host:22", "127.0.0.1")
    circuit.link(client, initiator)
    return circuit, client, initiator, cconn, iconn


@implementer(ICircuitEnd)
class MemoryEnd:
    """A circuit end that is not a Conch channel (as a hop to another node will be):
    it stores what it is given and consumes only when told to."""

    def __init__(self) -> None:
        self.peer: Any = None
        self.circuit: Any = None
        self.bytesIn = 0
        self.received = bytearray()
        self.pending = bytearray()
        self.eof = False
        self.closedFlag = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.pending += data

    def consume(self) -> None:
        self.received += self.pending
        self.pending.clear()
        if self.peer is not None:
            self.peer.passedOn()

    def writeEOF(self) -> None:
        self.eof = True

    def loseConnection(self) -> None:
        self.abort()

    def abort(self) -> None:
        if not self.closedFlag:
            self.closedFlag = True
            peer, self.peer = self.peer, None
            if peer is not None and not peer.isClosed():
                peer.loseConnection()
            if self.circuit is not None:
                self.circuit.endClosed(self)

    def queued(self) -> int:
        return len(self.pending)

    def passedOn(self) -> None:
        pass

    def isClosed(self) -> bool:
        return self.closedFlag

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False


class ContractTests(unittest.TestCase):
    def test_endsProvideTheContract(self) -> None:
        """Both channel ends provide ICircuitEnd, the initiator's end IPendingEnd too,
        and the avatar class implements IOpener."""
        _, client, initiator, _, _ = splice()
        verifyObject(ICircuitEnd, client)
        verifyObject(ICircuitEnd, initiator)
        verifyObject(IPendingEnd, initiator)
        verifyObject(ICircuitEnd, MemoryEnd())
        verifyClass(IOpener, SwitchboardAvatar)

    def test_openRefusedLivesWithTheContract(self) -> None:
        """OpenRefused carries the SSH reason code and the text the client is shown."""
        refused = OpenRefused(2, "initiator is gone")
        self.assertEqual(
            (refused.code, refused.message, str(refused)),
            (2, "initiator is gone", "initiator is gone"),
        )

    def test_spliceWithANonChannelEnd(self) -> None:
        """A Conch end spliced to a non-Conch end relays data and grants window only as
        the other end consumes, through the contract alone."""
        cconn = RecordingConnection()
        client = ClientEnd(
            localWindow=WINDOW,
            localMaxPacket=PACKET,
            remoteWindow=WINDOW,
            remoteMaxPacket=PACKET,
            conn=cconn,
        )
        far = MemoryEnd()
        circuit = Circuit(2, "hop:22", "127.0.0.1")
        circuit.link(client, far)
        cconn.receive(client, b"x" * PACKET * 3)
        self.assertEqual(cconn.granted(client), 0)
        far.consume()
        self.assertEqual(bytes(far.received), b"x" * PACKET * 3)
        self.assertEqual(cconn.granted(client), PACKET * 3)
        client.eofReceived()
        self.assertTrue(far.eof)
        far.abort()
        self.assertIn("close", cconn.kinds(client))


class DataTests(unittest.TestCase):
    def test_dataBothWays(self) -> None:
        """Bytes from the client reach the initiator and the reverse, counted per end."""
        circuit, client, initiator, cconn, iconn = splice()
        cconn.receive(client, b"ping")
        iconn.receive(initiator, b"pong!")
        self.assertEqual(iconn.data(initiator), b"ping")
        self.assertEqual(cconn.data(client), b"pong!")
        self.assertEqual((circuit.bytes_up, circuit.bytes_down), (4, 5))

    def test_packetsRespectPeerMaxPacket(self) -> None:
        """A large write is sent as packets no bigger than the peer's maximum."""
        _, client, initiator, cconn, iconn = splice()
        initiator.remoteMaxPacket = 1000
        cconn.receive(client, b"y" * 4500)
        sizes = [len(p) for kind, c, p in iconn.sent if kind == "data"]
        self.assertEqual(sizes, [1000, 1000, 1000, 1000, 500])


class BackpressureTests(unittest.TestCase):
    def test_noGrantWhileTheFarSideDoesNotRead(self) -> None:
        """An initiator that grants no window holds the client to one window: the client
        gets no window back, and the circuit queues no more than that window."""
        _, client, initiator, cconn, iconn = splice(initiatorWindow=0)
        sent = 0
        while client.localWindowLeft > 0:
            chunk = min(PACKET, client.localWindowLeft)
            cconn.receive(client, b"z" * chunk)
            sent += chunk
        self.assertEqual(sent, WINDOW)
        self.assertEqual(cconn.granted(client), 0)
        self.assertEqual(initiator.queued(), WINDOW)
        self.assertEqual(iconn.data(initiator), b"")

    def test_windowFromTheFarSideReopensTheSender(self) -> None:
        """When the initiator grants window the queue drains, and the client gets window
        back never ahead of the bytes passed on, all of it once the queue is empty."""
        _, client, initiator, cconn, iconn = splice(initiatorWindow=0)
        cconn.receive(client, b"a" * WINDOW)
        initiator.addWindowBytes(PACKET * 2)
        self.assertEqual(len(iconn.data(initiator)), PACKET * 2)
        self.assertLessEqual(cconn.granted(client), PACKET * 2)
        initiator.addWindowBytes(WINDOW)
        self.assertEqual(iconn.data(initiator), b"a" * WINDOW)
        self.assertEqual(cconn.granted(client), WINDOW)
        self.assertEqual(initiator.queued(), 0)

    def test_congestedSocketQueues(self) -> None:
        """While the initiator's socket is backed up nothing is sent and nothing granted;
        the flush after it drains sends the queue and grants the client."""
        _, client, initiator, cconn, iconn = splice()
        iconn.congested = True
        cconn.receive(client, b"b" * PACKET * 3)
        self.assertEqual((iconn.data(initiator), cconn.granted(client)), (b"", 0))
        iconn.congested = False
        initiator.flush()
        self.assertEqual(len(iconn.data(initiator)), PACKET * 3)
        self.assertEqual(cconn.granted(client), PACKET * 3)

    def test_pauseWithholdsWindow(self) -> None:
        """A paused end still relays what arrives but grants no window until resumed."""
        _, client, initiator, cconn, iconn = splice()
        client.pauseProducing()
        cconn.receive(client, b"c" * PACKET * 3)
        self.assertEqual(len(iconn.data(initiator)), PACKET * 3)
        self.assertEqual(cconn.granted(client), 0)
        client.resumeProducing()
        self.assertEqual(cconn.granted(client), PACKET * 3)


class HalfCloseTests(unittest.TestCase):
    def test_clientEOFReachesInitiatorAndDataStillFlowsBack(self) -> None:
        """EOF from the client is passed to the initiator; the initiator may still answer,
        and nothing closes until a CLOSE comes."""
        _, client, initiator, cconn, iconn = splice()
        cconn.receive(client, b"request")
        client.eofReceived()
        self.assertEqual(iconn.kinds(initiator), ["data", "eof"])
        iconn.receive(initiator, b"response")
        self.assertEqual(cconn.data(client), b"response")
        self.assertNotIn("close", cconn.kinds(client) + iconn.kinds(initiator))

    def test_initiatorEOFReachesClient(self) -> None:
        """EOF from the initiator is passed to the client, and the client may still send."""
        _, client, initiator, cconn, iconn = splice()
        initiator.eofReceived()
        self.assertEqual(cconn.kinds(client), ["eof"])
        cconn.receive(client, b"more")
        self.assertEqual(iconn.data(initiator), b"more")

    def test_eofWaitsForQueuedData(self) -> None:
        """EOF is sent after the data queued before it, never ahead of it."""
        _, client, initiator, cconn, iconn = splice(initiatorWindow=0)
        cconn.receive(client, b"d" * 100)
        client.eofReceived()
        self.assertEqual(iconn.kinds(initiator), [])
        initiator.addWindowBytes(WINDOW)
        self.assertEqual(iconn.kinds(initiator), ["data", "eof"])
        self.assertEqual(iconn.data(initiator), b"d" * 100)

    def test_eofAfterPeerClosedIsDropped(self) -> None:
        """An EOF that arrives after the other end has closed sends nothing."""
        _, client, initiator, cconn, iconn = splice()
        iconn.sendClose(initiator)
        client.eofReceived()
        self.assertEqual(iconn.kinds(initiator), ["close"])


class CloseTests(unittest.TestCase):
    def test_closeFromClientClosesBoth(self) -> None:
        """A CLOSE from the client closes the initiator's end, and the circuit is over
        (once) as soon as both ends have sent CLOSE."""
        circuit, client, initiator, cconn, iconn = splice()
        closed: list[Circuit] = []
        circuit.onClose.append(closed.append)
        cconn.remoteClose(client)
        self.assertEqual(cconn.kinds(client), ["close"])
        self.assertEqual(iconn.kinds(initiator), ["close"])
        self.assertEqual(closed, [circuit])
        iconn.remoteClose(initiator)
        self.assertEqual(closed, [circuit])

    def test_closesCrossing(self) -> None:
        """CLOSE arriving from both sides at once: each end sends one CLOSE, and the
        circuit's close callbacks run exactly once."""
        circuit, client, initiator, cconn, iconn = splice()
        closed: list[Circuit] = []
        circuit.onClose.append(closed.append)
        cconn.remoteClose(client)
        iconn.remoteClose(initiator)
        self.assertEqual(cconn.kinds(client).count("close"), 1)
        self.assertEqual(iconn.kinds(initiator).count("close"), 1)
        self.assertEqual(closed, [circuit])
        self.assertIsNone(client.peer)
        self.assertIsNone(initiator.peer)

    def test_closeWaitsForQueuedDataThenSendsEOFFirst(self) -> None:
        """The client closes with data still queued toward a slow initiator: the data is
        delivered, then EOF, then CLOSE."""
        _, client, initiator, cconn, iconn = splice(initiatorWindow=0)
        cconn.receive(client, b"e" * 500)
        client.eofReceived()
        cconn.remoteClose(client)
        self.assertEqual(iconn.kinds(initiator), [])
        initiator.addWindowBytes(WINDOW)
        self.assertEqual(iconn.kinds(initiator), ["data", "eof", "close"])

    def test_dataAfterCloseIsNotRelayed(self) -> None:
        """Data that arrives after the other end closed is dropped, not sent."""
        _, client, initiator, cconn, iconn = splice()
        iconn.sendClose(initiator)
        cconn.receive(client, b"late")
        self.assertEqual(iconn.data(initiator), b"")

    def test_failedWriteClosesBothEnds(self) -> None:
        """If passing data to the other end raises, both ends close and the error is
        logged, instead of unwinding into the sending connection."""
        _, client, initiator, cconn, iconn = splice()

        def broken(data: bytes) -> None:
            raise RuntimeError("boom")

        initiator.write = broken  # type: ignore[method-assign]
        cconn.receive(client, b"x")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIn("close", cconn.kinds(client))
        self.assertIn("close", iconn.kinds(initiator))


class RecordingOpenWaiter:
    """The part of SwitchboardConnection a PendingOpen reports to."""

    def __init__(self) -> None:
        self.stopped = False
        self.completed: list[Any] = []
        self.failed: list[tuple[str, str]] = []

    def completeOpen(self, pending: PendingOpen, end: Any) -> None:
        self.completed.append(end)

    def failOpen(self, pending: PendingOpen, message: str, outcome: str) -> None:
        self.failed.append((message, outcome))


class FarEndTests(unittest.TestCase):
    def pending(
        self, timeout: float = 10.0
    ) -> tuple[PendingOpen, InitiatorEnd, RecordingConnection, RecordingOpenWaiter, Clock]:
        iconn = RecordingConnection()
        end = InitiatorEnd(localWindow=WINDOW, localMaxPacket=PACKET, conn=iconn)
        waiter = RecordingOpenWaiter()
        clock = Clock()
        pending = PendingOpen(
            waiter,  # type: ignore[arg-type]
            7,
            WINDOW,
            PACKET,
            Circuit(3, "host:22", "127.0.0.1"),
            end,
        )
        pending.start(timeout, clock)
        return pending, end, iconn, waiter, clock

    def test_acceptedOpenCompletes(self) -> None:
        """A far end that confirms completes the client's open with that end."""
        _, end, _, waiter, clock = self.pending()
        end.channelOpen(b"")
        self.assertEqual(waiter.completed, [end])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_refusingFarEnd(self) -> None:
        """A far end that refuses fails the client's open with its reason, once."""
        _, end, _, waiter, clock = self.pending()
        end.openFailed(ConchError(b"connect failed: nothing listens", 2))
        self.assertEqual(
            waiter.failed,
            [("initiator refused: connect failed: nothing listens", "initiator_refused")],
        )
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_refusalOnOurTerms(self) -> None:
        """A far end refused on our terms (OpenRefused) shows the client our text."""
        _, end, _, waiter, _ = self.pending()
        end.refuse(OpenRefused(2, "initiator's maximum packet size 1 is too small"))
        self.assertEqual(
            waiter.failed, [("initiator's maximum packet size 1 is too small", "initiator_refused")]
        )

    def test_farEndNeverAnswers(self) -> None:
        """A far end that never answers fails the open at the deadline; if it confirms
        later, it is closed at once and the client is not told twice."""
        _, end, iconn, waiter, clock = self.pending(timeout=10.0)
        clock.advance(9.9)
        self.assertEqual(waiter.failed, [])
        clock.advance(0.2)
        self.assertEqual(waiter.failed, [("initiator did not answer in time", "timeout")])
        end.channelOpen(b"")
        self.assertEqual(iconn.kinds(end), ["close"])
        self.assertEqual(waiter.completed, [])
        end.openFailed(ConchError(b"late", 2))
        self.assertEqual(len(waiter.failed), 1)

    def test_clientGoneBeforeAnswer(self) -> None:
        """The client's connection went away while waiting: a late confirmation closes
        the far end and completes nothing."""
        pending, end, iconn, waiter, clock = self.pending()
        pending.cancel()
        self.assertEqual(clock.getDelayedCalls(), [])
        end.channelOpen(b"")
        self.assertEqual(iconn.kinds(end), ["close"])
        self.assertEqual((waiter.completed, waiter.failed), ([], []))

    def test_acceptedAfterClientConnectionStopped(self) -> None:
        """The far end confirms just as the client's connection stops: the end is closed."""
        _, end, iconn, waiter, _ = self.pending()
        waiter.stopped = True
        end.channelOpen(b"")
        self.assertEqual(iconn.kinds(end), ["close"])
        self.assertEqual(waiter.completed, [])

    def test_anyPendingEndWorks(self) -> None:
        """PendingOpen needs only IPendingEnd: a bare Deferred-backed end that never
        answers is abandoned at the deadline."""

        @implementer(IPendingEnd)
        class Silent:
            def __init__(self) -> None:
                self.opened: defer.Deferred[Any] = defer.Deferred()
                self.abandoned = False

            def abandon(self) -> None:
                self.abandoned = True

        silent = Silent()
        verifyObject(IPendingEnd, silent)
        waiter, clock = RecordingOpenWaiter(), Clock()
        pending = PendingOpen(
            waiter,  # type: ignore[arg-type]
            1,
            WINDOW,
            PACKET,
            Circuit(4, "h:1", "p"),
            silent,  # type: ignore[arg-type]
        )
        pending.start(3.0, clock)
        clock.advance(3.0)
        self.assertTrue(silent.abandoned)
        self.assertEqual(waiter.failed, [("initiator did not answer in time", "timeout")])
