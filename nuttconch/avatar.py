# -*- test-case-name: tests.test_e2e -*-
"""The realm and the avatar: what one authenticated key may do on its connection.

The avatar owns everything its connection registered, so ``logout`` (which
Conch calls after every channel is closed) is the single place where an
initiator's names and ports leave the registry.
"""

from __future__ import annotations

import struct
import time
from typing import Any

from twisted.conch.avatar import ConchUser
from twisted.conch.interfaces import IConchUser, ISession
from twisted.conch.ssh import forwarding
from twisted.cred.portal import IRealm
from twisted.logger import Logger
from zope.interface import implementer

from .access import INITIATE
from .auth import ConnectionInfo, Identity
from .circuit import IOpener, IPendingEnd, OpenRefused
from .limits import TokenBucket
from .names import escape
from .registry import IRegistry, Listener, PortInUse

log = Logger()
# tcpip-forward and cancel-tcpip-forward per connection: a burst that covers every
# forward an ``ssh -R ... -R ...`` asks for at once, then a slow refill. Each request
# costs log lines, registry and webhook events, and a line to every greeting session.
FORWARD_BURST = 64
FORWARD_RATE = 1.0
# Refused forwards logged per connection; past this, one line says the rest are not.
MAX_REFUSALS_LOGGED = 10
# Circuit opens to an unknown name, port or index per connection: a few typos at once,
# then one every five seconds; past that the connection is closed. Each miss also adds
# to the source's penalty (limits.PENALTIES["miss"]), as a failed login does.
MISS_BURST = 10
MISS_RATE = 0.2


@implementer(IOpener)
class SwitchboardAvatar(ConchUser):
    """An authenticated key: global requests, sessions, and its registry entry."""

    def __init__(self, identity: Identity, info: ConnectionInfo, factory: Any) -> None:
        super().__init__()
        self.identity = identity
        self.info = info
        self.factory = factory
        self.registry: IRegistry = factory.registry
        self.listener: Listener | None = None
        self.sessions: list[Any] = []
        self.loggedOut = False
        self.forwardBudget = TokenBucket(
            FORWARD_RATE, max(FORWARD_BURST, factory.config.max_forwards), factory.clock.seconds
        )
        self.refusalsLogged = 0
        self.missBudget = TokenBucket(MISS_RATE, MISS_BURST, factory.clock.seconds)
        self.misses = 0
        self.expiryCall: Any = None
        from .session import SwitchboardSession

        self.channelLookup[b"session"] = SwitchboardSession

    def __conform__(self, interface: Any) -> Any:
        if interface is ISession:
            from .session import SessionHandler

            return SessionHandler(self)
        return None

    @property
    def config(self) -> Any:
        return self.factory.config

    def holdsPorts(self) -> bool:
        return bool(self.listener and self.listener.ports)

    # tcpip-forward

    def global_tcpip_forward(self, data: bytes) -> Any:
        if INITIATE not in self.identity.access:
            self._refuseForward("key lacks access=initiate")
            return 0
        if not self.forwardBudget.take():
            self._refuseForward("too many forward requests; slow down")
            return 0
        try:
            host, port = forwarding.unpackGlobal_tcpip_forward(data)
        except (struct.error, UnicodeDecodeError, ValueError, IndexError):
            self._refuseForward("malformed request")
            return 0
        if not 0 <= port <= 65535 or len(host) > 255:
            self._refuseForward(f"bad port {port}")
            return 0
        policy = self.identity.policy
        why = policy.listen_refusal(host, port)
        if why is not None:
            self._refuseForward(why)
            return 0
        listener = self._ensureListener()
        wanted = port
        if port == 0:
            # ``-R 0`` allocates only inside permitlisten: the first allowed port free here.
            choices = policy.listen_choices(host)
            if choices is not None:
                free = [p for p in choices if p not in listener.ports]
                if not free:
                    self._refuseForward("no port that permitlisten allows is free")
                    return 0
                wanted = free[0]
        try:
            allocated = self.registry.add_port(
                listener, host, wanted, limit=self.config.max_forwards
            )
        except PortInUse as exc:
            self._refuseForward(str(exc))
            return 0
        log.info(
            "conn {conn_id}: {name} forwards virtual port {port}",
            conn_id=self.info.conn_id,
            name=listener.connect_name,
            port=allocated,
        )
        for session in list(self.sessions):
            session.portAdded(allocated)
        self.conn.touch()
        if port == 0:
            return 1, struct.pack(">L", allocated)
        return 1

    def global_cancel_tcpip_forward(self, data: bytes) -> int:
        try:
            host, port = forwarding.unpackGlobal_tcpip_forward(data)
        except (struct.error, UnicodeDecodeError, ValueError, IndexError):
            return 0
        if not self.forwardBudget.take():
            self._refuseForward("too many forward requests; slow down")
            return 0
        if self.listener is None or not self.registry.remove_port(self.listener, port):
            return 0
        log.info(
            "conn {conn_id}: {name} cancelled virtual port {port}",
            conn_id=self.info.conn_id,
            name=self.listener.connect_name,
            port=port,
        )
        self.conn.touch()
        return 1

    def _refuseForward(self, why: str) -> None:
        """Log a refusal, but only the first few per connection: a peer that loops on
        refused requests must not turn each into a log line."""
        self.refusalsLogged += 1
        if self.refusalsLogged > MAX_REFUSALS_LOGGED:
            return
        if self.refusalsLogged == MAX_REFUSALS_LOGGED:
            why += " (further refusals on this connection are not logged)"
        log.info(
            "conn {conn_id}: forward refused for {hostname}: {why}",
            conn_id=self.info.conn_id,
            hostname=self.identity.hostname,
            why=escape(why),
        )

    def _ensureListener(self) -> Listener:
        if self.listener is None:
            self.listener = Listener(
                self.identity.hostname,
                self.identity.aliases,
                peer=self.info.peer,
                fingerprint=self.identity.fingerprint,
                opener=self,
            )
        return self.listener

    def openForwarded(self, bindHost: str, port: int, origin: tuple[str, int]) -> IPendingEnd:
        if self.loggedOut:
            raise OpenRefused(2, "initiator is gone")
        end: IPendingEnd = self.conn.openForwarded(bindHost, port, origin)
        return end

    def disconnect(self, reason: str) -> bool:
        """Drop this connection (an administrator's kick); False if it is already going."""
        conn = getattr(self, "conn", None)
        transport = conn.transport if conn is not None else None
        if transport is None or self.loggedOut:
            return False
        transport.sendDisconnect(11, reason.encode("ascii", "replace"))  # BY_APPLICATION
        return True

    def circuitMissed(self) -> None:
        """A circuit open named no listener: guessing generated aliases must cost time.

        The source is penalised per miss (new connections are refused once that adds
        up, as after failed logins), and a connection that keeps missing is closed.
        """
        self.misses += 1
        self.factory.penalise(self.info.peer, "miss")
        if self.missBudget.take():
            return
        log.info(
            "conn {conn_id}: closing {hostname} ({fingerprint}): {count} circuit opens"
            " to unknown names",
            conn_id=self.info.conn_id,
            hostname=self.identity.hostname,
            fingerprint=self.identity.fingerprint,
            count=self.misses,
        )
        self.disconnect("too many circuit opens to unknown names")

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> Any:
        """Dispatch like ConchUser, but never let a handler's bug drop the connection."""
        try:
            return super().gotGlobalRequest(requestType, data)
        except UnicodeDecodeError:
            return 0
        except Exception:
            log.failure("global request {name} failed", name=escape(requestType))
            return 0

    def scheduleExpiry(self) -> None:
        """Drop the connection when its key's expiry-time passes, file change or not."""
        if self.expiryCall is not None and self.expiryCall.active():
            self.expiryCall.cancel()
        self.expiryCall = None
        expires = self.identity.policy.expires
        if expires is None or self.loggedOut:
            return
        self.expiryCall = self.factory.clock.callLater(
            max(0.0, expires - time.time()), self._expired
        )

    def _expired(self) -> None:
        self.expiryCall = None
        log.info(
            "conn {conn_id}: closing {hostname} ({fingerprint}): key expired",
            conn_id=self.info.conn_id,
            hostname=self.identity.hostname,
            fingerprint=self.identity.fingerprint,
        )
        self.disconnect("key expired")

    def logout(self) -> None:
        """Unregister everything this connection held; called once, after channels close."""
        if self.loggedOut:
            return
        self.loggedOut = True
        if self.expiryCall is not None and self.expiryCall.active():
            self.expiryCall.cancel()
        self.expiryCall = None
        if self.listener is not None:
            self.registry.remove_listener(self.listener)
        self.factory.connectionLimits.release(self.identity.fingerprint, self.info.peer)
        self.factory.loggedOut(self)


@implementer(IRealm)
class SwitchboardRealm:
    """Builds avatars from the checker's Identity and the connection info."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.avatars = 0

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        if IConchUser not in interfaces:
            raise NotImplementedError("only SSH users are supported")
        self.avatars += 1
        info = mind if isinstance(mind, ConnectionInfo) else ConnectionInfo(peer="?")
        # Raises TooManyConnections (a refusal the client is shown) over a per-key or
        # per-source cap; counted from here until logout.
        self.factory.connectionLimits.admit(avatarId.fingerprint, info.peer)
        avatar = SwitchboardAvatar(avatarId, info, self.factory)
        avatar.scheduleExpiry()
        self.factory.loggedIn(avatar)
        return IConchUser, avatar, avatar.logout
