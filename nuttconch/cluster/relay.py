# -*- test-case-name: tests.test_cluster_hop -*-
"""The hop between nodes: a client on node A reaches an initiator held by node B.

Node A is an SSH client of node B, on B's separate relay listener, with
nuttconch's own packet layer (strict KEX, the fast AEAD sealers), the
cluster key as its user key, and B's host key checked against the
cluster's own host keys (never against anything read from the registry).
One hop connection per peer node carries every circuit from A to B as a
channel of type ``hop@nuttconch``, which names B's *listener id* and port,
never a name: B re-checks that the id is one of its own live listeners, so
a stale replica entry cannot loop or pick another holder of ``name~N``.

Both nodes splice with the same code as a local circuit (circuit.py): on
A the client's ``direct-tcpip`` is joined to the hop channel, on B the hop
channel to the initiator's ``forwarded-tcpip``.  Window granting,
half-close, the memory budget and ``PendingOpen`` (refusals and the open
timeout reaching the client as an open failure) therefore hold across
nodes exactly as on one node.  A hop connection that drops takes down
only the circuits it carried.
"""

from __future__ import annotations

import dataclasses
import hmac
import itertools
import struct
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application import service, strports
from twisted.conch import error as conch_error
from twisted.conch.avatar import ConchUser
from twisted.conch.checkers import ISSHPrivateKey
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import common, keys, userauth
from twisted.conch.ssh import transport as conch_transport
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, endpoints, protocol
from twisted.internet import reactor as default_reactor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..access import HOP, Access
from ..auth import ConnectionInfo, Identity, Refused, fingerprint
from ..circuit import InitiatorEnd, IOpener, IPendingEnd, OpenRefused
from ..connection import (
    MIN_MAX_PACKET,
    OPEN_CONNECT_FAILED,
    OPEN_PROHIBITED,
    OPEN_RESOURCE_SHORTAGE,
    OPEN_UNKNOWN_TYPE,
    SwitchboardConnection,
    peer_text,
)
from ..crypto import MSG_CHANNEL_DATA
from ..names import escape
from ..registry import InMemoryRegistry, IRegistry, Listener, Route
from .client_transport import ClientTransportMixin

log = Logger()

#: The channel type of a circuit crossing nodes; refused on the public SSH port.
HOP_CHANNEL = b"hop@nuttconch"
#: Seconds to set up a hop connection (TCP, key exchange, login) before the opens
#: waiting on it fail; the client's own open timeout usually fires first.
HOP_CONNECT_TIMEOUT = 10.0
_hop_ids = itertools.count(1)


class IClusterRegistry(IRegistry):
    """What the hop needs from a registry shared by several nodes.

    ``resolve``'s Route names the owning node and the listener id (unique in the
    cluster); a route whose node is not this registry's ``node`` goes through a hop.
    """

    def relay_address(node: str) -> str | None | defer.Deferred[str | None]:
        """Where ``node``'s relay listener is dialled (``host:port`` or a client
        endpoint string), or None when the node is unknown or gone; a Deferred of
        either where the answer takes a round trip to the registry's store."""

    def local_listener(listener_id: str) -> Listener | None:
        """This node's own live listener with that id, or None."""


def local_listener(registry: Any, listenerId: str) -> Listener | None:
    """This node's live listener with that id: ``local_listener`` where the registry has
    it, else a scan of its ``local_listeners()``."""
    find = getattr(registry, "local_listener", None)
    if find is not None:
        found: Listener | None = find(listenerId)
        return found
    for listener in registry.local_listeners():
        if listener.id == listenerId and listener.ports:
            return listener
    return None


def pack_hop(listener_id: str, port: int, origin: tuple[str, int]) -> bytes:
    """The hop channel's type-specific data: listener id, port, the client's origin."""
    return (
        common.NS(listener_id.encode("utf-8"))
        + struct.pack(">L", port)
        + common.NS(origin[0].encode("utf-8"))
        + struct.pack(">L", origin[1])
    )


def unpack_hop(data: bytes) -> tuple[str, int, tuple[str, int]]:
    """Raises ValueError (or struct.error) on anything malformed."""
    listener_id, rest = common.getNS(data)
    (port,) = struct.unpack(">L", rest[:4])
    host, rest = common.getNS(rest[4:])
    (origPort,) = struct.unpack(">L", rest[:4])
    if rest[4:] or not listener_id or len(listener_id) > 255 or len(host) > 255:
        raise ValueError("bad hop request")
    if not 0 < port <= 65535:
        raise ValueError("bad port")
    return listener_id.decode("utf-8"), port, (host.decode("utf-8"), origPort & 0xFFFF)


# -- node B: the relay listener ------------------------------------------------------------


@implementer(ICredentialsChecker)
class ClusterKeyChecker:
    """Only the cluster key logs in on the relay port; anything else is refused by name."""

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, clusterKeys: Iterable[keys.Key]) -> None:
        self.blobs = [key.public().blob() for key in clusterKeys]

    def requestAvatarId(self, credentials: Any) -> Any:
        return defer.maybeDeferred(self._check, credentials)

    def _check(self, credentials: Any) -> Identity:
        blob = credentials.blob
        if not any(hmac.compare_digest(blob, known) for known in self.blobs):
            raise Refused("the relay port accepts only the cluster key", reason="not cluster key")
        if credentials.signature is None:
            raise conch_error.ValidPublicKey()
        key = keys.Key.fromString(blob)
        if not key.verify(credentials.signature, credentials.sigData):
            raise Refused("bad signature", reason="bad signature")
        node = escape(credentials.username[:64])
        info: ConnectionInfo = getattr(credentials, "connection", None) or ConnectionInfo("?")
        return Identity(
            username=node,
            hostname=f"node {node}",
            aliases=(),
            access=Access({HOP}),
            fingerprint=fingerprint(blob),
            key_blob=blob,
            peer=info.peer,
        )


class HopAvatar(ConchUser):
    """A peer node logged in with the cluster key: it may open hop channels, nothing else."""

    def __init__(self, identity: Identity, factory: Any) -> None:
        super().__init__()
        self.identity = identity
        self.factory = factory
        self.channelLookup = {}

    def holdsPorts(self) -> bool:
        return False

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> int:
        return 0  # keepalives get FAILURE, which is an answer; nothing else is served

    def logout(self) -> None:
        pass


@implementer(IRealm)
class HopRealm:
    def __init__(self, factory: Any) -> None:
        self.factory = factory

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        if IConchUser not in interfaces:
            raise NotImplementedError("only SSH users are supported")
        avatar = HopAvatar(avatarId, self.factory)
        return IConchUser, avatar, avatar.logout


class HopServerConnection(SwitchboardConnection):
    """The relay port's connection service: hop channels only, each naming a listener id."""

    def touch(self) -> None:
        """A pooled hop connection is kept while idle: the peer node decides when to drop it."""

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        channelType, rest = common.getNS(packet)
        senderChannel, windowSize, maxPacket = struct.unpack(">3L", rest[:12])
        try:
            if (
                senderChannel in self.pendingOpens
                or senderChannel in self.localToRemoteChannel.values()
            ):
                raise OpenRefused(OPEN_PROHIBITED, "channel id already in use")
            if len(self.channels) + len(self.pendingOpens) >= self.config.max_channels:
                raise OpenRefused(OPEN_RESOURCE_SHORTAGE, "too many open channels")
            if maxPacket < MIN_MAX_PACKET:
                raise OpenRefused(OPEN_PROHIBITED, f"maximum packet size {maxPacket} is too small")
            if channelType != HOP_CHANNEL:
                raise OpenRefused(
                    OPEN_UNKNOWN_TYPE,
                    f"the relay port carries only hop channels, not {peer_text(channelType)}",
                )
            self._openHop(senderChannel, windowSize, maxPacket, rest[12:])
        except OpenRefused as refused:
            self.refuseOpen(senderChannel, refused.code, refused.message)

    def _openHop(self, senderChannel: int, windowSize: int, maxPacket: int, extra: bytes) -> None:
        try:
            listenerId, port, origin = unpack_hop(extra)
        except (struct.error, ValueError, UnicodeDecodeError, IndexError):
            raise OpenRefused(OPEN_CONNECT_FAILED, "malformed hop request") from None
        registry = self.transport.factory.registry
        node = registry.node
        listener = local_listener(registry, listenerId)
        bindHost = listener.ports.get(port) if listener is not None else None
        if listener is None or bindHost is None:
            why = f"no such listener: {escape(listenerId)} port {port} is not held on node {node}"
            log.info("conn {conn_id}: hop refused: {why}", conn_id=self.transport.connId, why=why)
            raise OpenRefused(OPEN_CONNECT_FAILED, why)
        peerNode = self.avatar.identity.username
        self.startCircuit(
            senderChannel, windowSize, maxPacket, listener.opener, listener.connect_name,
            bindHost, port, origin, f"{origin[0]} via node {peerNode}", listener.id,
        )  # fmt: skip


def make_relay_factory(main: Any, clusterKeys: Iterable[keys.Key]) -> Any:
    """The relay listener's factory: the public factory's host keys, config, registry and
    memory budget, but its own portal (the cluster key only) and connection service."""
    from ..server import SwitchboardFactory

    relay = SwitchboardFactory(main.config, main.registry, None, main.privateKeys, main.clock)
    relay.registry.observers.remove(relay._registryEvent)  # events are the public factory's
    relay.portal = Portal(HopRealm(relay), [ClusterKeyChecker(clusterKeys)])
    relay.services = dict(relay.services)
    relay.services[b"ssh-connection"] = HopServerConnection
    relay.budget = main.budget
    relay.circuitIds = main.circuitIds  # one numbering in this node's logs
    return relay


# -- node A: the pool of hop connections ------------------------------------------------------


class HopEnd(InitiatorEnd):
    """The hop channel on node A's client connection to node B: the far end of a circuit."""

    name = HOP_CHANNEL

    def openFailed(self, reason: Any) -> None:
        """B's refusal text reaches the client as it is (B already says what failed)."""
        value = reason.value if isinstance(reason, Failure) else reason
        if isinstance(value, conch_error.ConchError) and isinstance(value.value, bytes):
            code = value.data if isinstance(value.data, int) else OPEN_CONNECT_FAILED
            reason = Failure(OpenRefused(code, peer_text(value.value)))
        elif not isinstance(value, OpenRefused):
            node = getattr(self.conn.transport, "node", "?") if self.conn else "?"
            reason = Failure(OpenRefused(OPEN_CONNECT_FAILED, f"hop to node {node} was lost"))
        super().openFailed(reason)


@implementer(IPendingEnd)
class PendingHop:
    """What ``openForwarded`` returns for a remote listener: the open's answer may have to
    wait for the hop connection, so the channel comes later; ``abandoned`` (set by the
    client's timeout or departure) reaches it whenever it exists."""

    def __init__(self) -> None:
        self.opened: defer.Deferred[Any] = defer.Deferred()
        self.end: HopEnd | None = None
        self._abandoned = False

    @property
    def abandoned(self) -> bool:
        return self._abandoned

    @abandoned.setter
    def abandoned(self, value: bool) -> None:
        self._abandoned = value
        if self.end is not None:
            self.end.abandoned = value

    def abandon(self) -> None:
        self.abandoned = True

    def fail(self, code: int, message: str) -> None:
        if not self._abandoned and not self.opened.called:
            self.opened.errback(OpenRefused(code, message))


@implementer(IOpener)
class RemoteOpener:
    """Stands in for a remote listener's opener: circuits go through the hop to its node;
    a kick goes through ``kick`` (the shared registry's log) where there is one."""

    def __init__(
        self, pool: HopPool, node: str, listenerId: str, kick: Callable[..., bool] | None = None
    ) -> None:
        self.pool = pool
        self.node = node
        self.listenerId = listenerId
        self.kick = kick

    def openForwarded(self, bindHost: str, port: int, origin: tuple[str, int]) -> PendingHop:
        return self.pool.open(self.node, self.listenerId, port, origin)

    def disconnect(self, reason: str) -> bool:
        """Dropping an initiator on another node is that node's to do: the registry tells
        it (kick from any node); the hop carries circuits only."""
        if self.kick is None:
            return False
        return bool(self.kick(self.node, self.listenerId, reason))


class HopClientConnection(SwitchboardConnection):
    """Node A's side of a hop connection: it opens hop channels and accepts none."""

    def touch(self) -> None:
        """Pooled: an idle hop connection stays up for the next circuit."""

    transport: Any

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self.transport.hopReady(self)

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        channelType, rest = common.getNS(packet)
        (senderChannel,) = struct.unpack(">L", rest[:4])
        self.refuseOpen(senderChannel, OPEN_PROHIBITED, "a hop client accepts no channels")

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> int:
        return 0  # the far node's keepalives: FAILURE is an answer


class HopUserAuthClient(userauth.SSHUserAuthClient):
    """Logs in with the cluster key, as the node's own name."""

    def __init__(self, node: str, key: keys.Key, instance: Any) -> None:
        super().__init__(node.encode("utf-8"), instance)
        self.key = key
        self._offered = False

    def getPublicKey(self) -> keys.Key | None:
        if self._offered:
            return None
        self._offered = True
        return self.key.public()

    def getPrivateKey(self) -> defer.Deferred[keys.Key]:
        return defer.succeed(self.key)

    def getPassword(self, prompt: bytes | None = None) -> None:
        return None

    transport: Any

    def ssh_USERAUTH_BANNER(self, packet: bytes) -> None:
        text = common.getNS(packet)[0]
        self.transport.refusal = peer_text(text.strip())


class HopClientTransport(ClientTransportMixin, conch_transport.SSHClientTransport):
    """Node A's SSH client transport toward node B."""

    factory: Any
    transport: Any
    ourVersionString = b"SSH-2.0-nuttconch_0.1"
    supportedCompressions = [b"none"]
    _closeReason = "connection lost"
    refusal = ""

    def connectionMade(self) -> None:
        self.connId = f"hop{next(_hop_ids)}"
        self.node = self.factory.node
        self.clock = self.factory.clock
        # AES-GCM first among the configured ciphers: with AES instructions it costs
        # about half of ChaCha20-Poly1305 per byte, and every crossing byte pays it twice.
        self.supportedCiphers = sorted(
            self.factory.config.ciphers, key=lambda name: not name.endswith(b"-gcm@openssh.com")
        )
        self.supportedMACs = list(self.factory.config.macs)
        tcp = self.transport
        for option in ("setTcpNoDelay", "setTcpKeepAlive"):
            setter = getattr(tcp, option, None)
            if setter is not None:
                try:
                    setter(True)
                except OSError:
                    pass
        super().connectionMade()

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> defer.Deferred[bool]:
        """B must present one of the cluster's own host keys (every node has the same)."""
        if any(hmac.compare_digest(hostKey, known) for known in self.factory.hostKeyBlobs):
            return defer.succeed(True)
        self._closeReason = "its host key is not one of the cluster's host keys"
        return defer.fail(conch_error.ConchError("host key is not one of the cluster's"))

    def connectionSecure(self) -> None:
        conn = HopClientConnection()
        self.requestService(HopUserAuthClient(self.factory.localNode, self.factory.key, conn))

    def hopReady(self, conn: HopClientConnection) -> None:
        self.factory.ready(conn)

    @property
    def keyExchanging(self) -> bool:
        return bool(self._keyExchangeState != self._KEY_EXCHANGE_NONE)

    def sendKexInit(self) -> None:
        super().sendKexInit()
        if self.sessionID is not None:
            congest = getattr(self.service, "pauseProducing", None)
            if congest is not None:
                congest()

    def _newKeys(self) -> None:
        super()._newKeys()
        resume = getattr(self.service, "resumeProducing", None)
        if resume is not None and not getattr(self.transport, "producerPaused", False):
            resume()

    def dispatchChannelData(self, packet: memoryview) -> None:
        if isinstance(self.service, HopClientConnection) and not self._kexInitReceived:
            self.service.channelData(packet)
            return
        self.dispatchMessage(MSG_CHANNEL_DATA, bytes(packet))

    def protocolError(self, what: str) -> None:
        self.sendDisconnect(conch_transport.DISCONNECT_PROTOCOL_ERROR, what.encode("ascii"))

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        if self.transport is None or getattr(self.transport, "disconnecting", False):
            return
        if self._closeReason == "connection lost":
            self._closeReason = f"disconnected by this node ({escape(desc[:200])})"
        self.sendPacket(
            conch_transport.MSG_DISCONNECT,
            struct.pack(">L", reason) + common.NS(desc) + common.NS(b""),
        )
        tcp = self.transport
        if getattr(tcp, "producer", None) is not None:
            tcp.unregisterProducer()
        tcp.loseConnection()

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        self._closeReason = f"node disconnected ({escape(description[:200])})"
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.factory.lost(self, self._closeReason)


class HopPeer(protocol.ClientFactory):
    """One peer node: its hop connection (at most one) and the opens waiting for it."""

    protocol = HopClientTransport

    def __init__(self, pool: HopPool, node: str, address: str) -> None:
        self.pool = pool
        self.node = node
        self.address = address
        self.localNode = pool.node
        self.config = pool.config
        self.clock = pool.clock
        self.key = pool.key
        self.hostKeyBlobs = pool.hostKeyBlobs
        self.budget = pool.budget
        self.conn: HopClientConnection | None = None
        self.transport: HopClientTransport | None = None
        self.waiting: list[tuple[PendingHop, str, int, tuple[str, int]]] = []
        self.connecting: Any = None
        self.timer: Any = None
        self.gone = False

    def addressFound(self, address: str | None, failure: Failure | None = None) -> None:
        """The registry answered where ``node`` takes hops (None: it does not know)."""
        if self.gone:
            return
        if not address:
            why = f" ({failure.getErrorMessage()})" if failure is not None else ""
            self._giveUp(f"node {self.node} has no relay address{why}")
            return
        self.address = address
        try:
            self.connect()
        except ValueError as exc:  # a relay address the endpoint parser refuses
            self._giveUp(f"node {self.node}'s relay address {address!r} is unusable: {exc}")

    def connect(self) -> None:
        endpoint = client_endpoint(self.pool.reactor, self.address)
        self.connecting = endpoint.connect(self)
        self.connecting.addCallback(self._connected)
        self.connecting.addErrback(self._failed)
        self.timer = self.clock.callLater(HOP_CONNECT_TIMEOUT, self._timedOut)

    def _connected(self, transport: HopClientTransport) -> None:
        self.connecting = None
        self.transport = transport

    def _failed(self, reason: Failure) -> None:
        self.connecting = None
        self._giveUp(f"cannot reach node {self.node} at {self.address}: {reason.getErrorMessage()}")

    def _timedOut(self) -> None:
        self.timer = None
        if self.conn is None:
            if self.connecting is not None:
                self.connecting.cancel()
            if self.transport is not None and self.transport.transport is not None:
                self.transport.transport.abortConnection()
            self._giveUp(f"hop to node {self.node} not ready after {HOP_CONNECT_TIMEOUT:.0f}s")

    def ready(self, conn: HopClientConnection) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.conn = conn
        log.info(
            "{conn_id}: hop to node {node} at {address} is up",
            conn_id=conn.transport.connId,
            node=self.node,
            address=self.address,
        )
        waiting, self.waiting = self.waiting, []
        for pending, listenerId, port, origin in waiting:
            self.openChannel(pending, listenerId, port, origin)

    def lost(self, transport: HopClientTransport, why: str) -> None:
        was = self.conn is not None
        self.conn = None
        self.transport = None
        if was:
            log.info(
                "{conn_id}: hop to node {node} closed: {why}",
                conn_id=transport.connId,
                node=self.node,
                why=why,
            )
        if transport.refusal and transport.refusal not in why:
            why += f": {transport.refusal}"
        self._giveUp(f"hop to node {self.node} failed: {why}")

    def _giveUp(self, why: str) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if not self.gone:
            self.gone = True
            self.pool.forget(self)
            if self.conn is None and self.waiting:
                log.info("hop to node {node}: {why}", node=self.node, why=why)
        waiting, self.waiting = self.waiting, []
        for pending, _, _, _ in waiting:
            pending.fail(OPEN_CONNECT_FAILED, why)

    def open(self, listenerId: str, port: int, origin: tuple[str, int]) -> PendingHop:
        pending = PendingHop()
        if self.conn is not None:
            self.openChannel(pending, listenerId, port, origin)
        else:
            self.waiting.append((pending, listenerId, port, origin))
        return pending

    def openChannel(
        self, pending: PendingHop, listenerId: str, port: int, origin: tuple[str, int]
    ) -> None:
        conn = self.conn
        if pending.abandoned:
            return
        if conn is None or conn.stopped:
            pending.fail(OPEN_CONNECT_FAILED, f"hop to node {self.node} is gone")
            return
        end = HopEnd(
            localWindow=self.config.channel_window,
            localMaxPacket=32768,
            conn=conn,
        )
        end.opened = pending.opened
        pending.end = end
        conn.openChannel(end, pack_hop(listenerId, port, origin))

    def close(self) -> None:
        """Drop the hop connection (a graceful stop of this node)."""
        self.gone = True
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.sendDisconnect(11, b"node is stopping")


def client_endpoint(reactor: Any, address: str) -> Any:
    """``host:port`` (or ``[v6]:port``), or a Twisted client endpoint string."""
    if "=" in address or address.startswith(("unix:", "tcp:", "tls:")):
        return endpoints.clientFromString(reactor, address)
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    return endpoints.HostnameEndpoint(reactor, host, int(port), timeout=HOP_CONNECT_TIMEOUT)


class HopPool:
    """Node A's hop connections, one per peer node, made on first use and reused."""

    def __init__(
        self,
        node: str,
        registry: Any,
        key: keys.Key,
        hostKeys: Iterable[keys.Key],
        config: Any,
        budget: Any = None,
        reactor: Any = None,
    ) -> None:
        self.node = node
        self.registry = registry
        self.key = key
        self.hostKeyBlobs = [k.public().blob() for k in hostKeys]
        self.config = config
        self.budget = budget
        self.reactor = reactor or default_reactor
        self.clock = self.reactor
        self.peers: dict[str, HopPeer] = {}

    def isRemote(self, route: Route) -> bool:
        return bool(route.node) and route.node != self.node

    def openerFor(self, route: Route) -> Any:
        """The route's own opener on its node; a hop to its node otherwise."""
        if not self.isRemote(route):
            return route.opener
        return RemoteOpener(self, route.node, route.listener_id)

    def open(self, node: str, listenerId: str, port: int, origin: tuple[str, int]) -> PendingHop:
        """Open a hop channel to ``listenerId`` on ``node``, dialling the node first if
        this node has no hop to it yet (its address may take a registry round trip)."""
        peer = self.peers.get(node)
        if peer is not None:
            return peer.open(listenerId, port, origin)
        peer = self.peers[node] = HopPeer(self, node, "")
        pending = peer.open(listenerId, port, origin)  # queued before the address is known
        address = self.registry.relay_address(node)
        if isinstance(address, defer.Deferred):
            address.addCallbacks(
                peer.addressFound, lambda failure: peer.addressFound(None, failure)
            )
        else:
            peer.addressFound(address)
        return pending

    def forget(self, peer: HopPeer) -> None:
        if self.peers.get(peer.node) is peer:
            del self.peers[peer.node]

    def closeAll(self) -> None:
        for peer in list(self.peers.values()):
            peer.close()


# -- a cluster in one process: the embedded registry shared by several nodes -----------------


class MemoryCluster:
    """One InMemoryRegistry shared by several nodes of one process (tests, demos): a real
    shared name space with global order, where each node sees its own events only."""

    def __init__(self) -> None:
        self.core = InMemoryRegistry()
        self.relays: dict[str, str] = {}
        #: Answer relay_address with a Deferred, as a registry that asks its store would.
        self.asyncAddresses = False
        self.views: dict[str, NodeRegistry] = {}
        self._ids = itertools.count(1)
        self.core.observers.append(self._event)

    def node(self, name: str) -> NodeRegistry:
        view = self.views[name] = NodeRegistry(self, name)
        return view

    def _event(self, event: str, listener: Listener, port: int | None) -> None:
        view = self.views.get(listener.node)
        if view is not None:
            for observer in list(view.observers):
                observer(event, listener, port)


@implementer(IOpener)
class ElsewhereOpener:
    """A remote listener's opener as a node without a hop pool sees it: it refuses."""

    def __init__(self, node: str) -> None:
        self.node = node

    def openForwarded(self, bindHost: str, port: int, origin: tuple[str, int]) -> Any:
        raise OpenRefused(OPEN_CONNECT_FAILED, f"listener is on node {self.node}: no hop to it")

    def disconnect(self, reason: str) -> bool:
        return False


@implementer(IClusterRegistry)
class NodeRegistry(service.Service):
    """One node's view of a MemoryCluster."""

    name = "registry"

    def __init__(self, cluster: MemoryCluster, node: str) -> None:
        self.cluster = cluster
        self.node = node
        self.observers: list[Any] = []

    def add_port(
        self, listener: Listener, bind_host: str, port: int, limit: int | None = None
    ) -> int:
        if not listener.id:
            listener.node = self.node
            listener.id = f"{self.node}/{next(self.cluster._ids)}"
        return self.cluster.core.add_port(listener, bind_host, port, limit)

    def remove_port(self, listener: Listener, port: int) -> bool:
        return self.cluster.core.remove_port(listener, port)

    def remove_listener(self, listener: Listener) -> None:
        self.cluster.core.remove_listener(listener)

    def resolve(self, target: str, port: int) -> Route:
        """Another node's listener comes without a usable opener, as from a registry
        shared between processes: the only way to it is the hop."""
        route = self.cluster.core.resolve(target, port)
        if route.node != self.node:
            route = dataclasses.replace(route, opener=ElsewhereOpener(route.node))
        return route

    def find(self, target: str) -> Listener:
        return self.cluster.core.find(target)

    def listeners(self) -> list[Listener]:
        return self.cluster.core.listeners()

    def relay_address(self, node: str) -> str | None | defer.Deferred[str | None]:
        address = self.cluster.relays.get(node)
        if self.cluster.asyncAddresses:
            d: defer.Deferred[str | None] = defer.Deferred()
            default_reactor.callLater(0.01, d.callback, address)
            return d
        return address

    def local_listener(self, listener_id: str) -> Listener | None:
        for listener in self.cluster.core.listeners():
            if listener.id == listener_id and listener.node == self.node:
                return listener
        return None


# -- wiring ----------------------------------------------------------------------------------


def load_cluster_key(path: str) -> keys.Key:
    """The cluster's private key (OpenSSH format); a clear error naming the file."""
    try:
        key = keys.Key.fromFile(path)
    except (OSError, keys.BadKeyError, ValueError) as exc:
        raise ValueError(f"cluster key {path}: {exc}") from None
    if not key.isPublic() and key.type() == "Ed25519":
        return key
    raise ValueError(f"cluster key {path}: expected an unencrypted ed25519 private key")


class HopService(service.Service):
    """Stops the hops with the node: peers' hop connections are told, then dropped."""

    name = "hops"

    def __init__(self, pool: HopPool, relay: Any) -> None:
        self.pool = pool
        self.relay = relay

    def stopService(self) -> Any:
        super().stopService()
        self.pool.closeAll()
        return self.relay.disconnectAll(b"node is stopping")


def install(factory: Any, cfg: Any, parent: Any, reactor: Any = None) -> HopPool | None:
    """With ``[cluster] relay_listen`` set and a registry that knows other nodes, listen
    for hops and give the factory its pool; otherwise nothing changes.

    Raises ValueError (one line for the operator) when the cluster key is missing or bad.
    """
    if not cfg.relay_listen:
        return None
    registry = factory.registry
    if not IClusterRegistry.providedBy(registry) and not (
        hasattr(registry, "relay_address") and hasattr(registry, "local_listeners")
    ):
        log.warn("[cluster] relay_listen is set but this node has no cluster registry: no hops")
        return None
    if not cfg.cluster_key_file:
        raise ValueError("[cluster] relay_listen needs cluster_key_file (the cluster's key)")
    key = load_cluster_key(cfg.cluster_key_file)
    hostKeys = list(factory.privateKeys.values())
    relay = make_relay_factory(factory, [key])
    reactor = reactor if reactor is not None else default_reactor
    listening = strports.service(cfg.relay_listen, relay, reactor=reactor)
    listening.setName("relay")
    listening.setServiceParent(parent)
    pool = HopPool(
        factory.registry.node,
        factory.registry,
        key,
        hostKeys,
        cfg,
        budget=factory.budget,
        reactor=reactor,
    )
    factory.hops = pool
    factory.relay = relay
    kick = getattr(registry, "kick_remote", None)
    if hasattr(registry, "remote_opener"):
        # Other nodes' listeners in the replica open through the hop (and kick through
        # the registry), so every path that takes a listener's opener crosses nodes.
        registry.remote_opener = lambda _registry, listener: RemoteOpener(
            pool, listener.node, listener.id, kick
        )
    HopService(pool, relay).setServiceParent(parent)
    log.info("relay for hops from other nodes on {endpoint}", endpoint=cfg.relay_listen)
    return pool
