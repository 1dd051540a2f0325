# -*- test-case-name: tests.test_e2e -*-
"""The SSH factory: builds transports, and keeps per-server accounting.

Everything a connection needs from the server as a whole (config,
registry, portal, counters, the list of live connections for a graceful
stop) is reached through this one object, as in Conch's own tap.  What it
is given rather than owns (the event bus, admission, metrics, webhooks) is
built by the composition in tap.py and passed in.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any

from twisted.conch.ssh import factory as conch_factory
from twisted.internet import defer, protocol, threads
from twisted.internet import reactor as default_reactor
from twisted.logger import Logger
from twisted.python import threadable

from . import authkeys, certs
from .access import authenticated
from .admission import Admission
from .auth import SwitchboardUserAuth, login_names
from .budget import ConnectionLimits, MemoryBudget
from .connection import SwitchboardConnection
from .events import EventBus
from .keyrules import admits
from .logs import conch_logger
from .names import InvalidName
from .policy import KeyPolicy, PolicyError
from .transport import SwitchboardTransport

log = Logger()


class SwitchboardFactory(conch_factory.SSHFactory):
    """Builds one SwitchboardTransport per TCP connection."""

    _log = conch_logger("nuttconch.server.SwitchboardFactory")

    protocol = SwitchboardTransport
    #: The AuthorizedKeysChecker (set by tap.build); the watcher needs its secret.
    checker: Any = None
    #: Set by the composition (tap.py) when it builds them; read by commands and pages.
    metrics: Any = None
    webhooks: Any = None

    def __init__(
        self,
        config: Any,
        registry: Any,
        portal: Any,
        hostKeys: dict[bytes, Any],
        clock: Any = None,
        events: EventBus | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.portal = portal
        self.privateKeys = dict(hostKeys)
        self.publicKeys = {name: key.public() for name, key in hostKeys.items()}
        self.primes = None
        self.clock = clock or default_reactor
        self.services = {
            b"ssh-userauth": SwitchboardUserAuth,
            b"ssh-connection": SwitchboardConnection,
        }
        self._ids = itertools.count(1)
        # Circuit ids, per server (not per process: two servers in one process, or the
        # nodes of a cluster, number their own).
        self.circuitIds = itertools.count(1)
        self.transports: set[SwitchboardTransport] = set()
        self.avatars: set[Any] = set()
        self.circuitsOpened = 0
        self.stopping = False
        self.events = events if events is not None else EventBus()
        self.admission = (
            admission if admission is not None else Admission(config, self.clock, self.events)
        )
        self.budget = MemoryBudget(
            config.memory_per_connection, config.memory_total, config.channel_window
        )
        self.connectionLimits = ConnectionLimits(
            config.max_connections_per_key, config.max_connections_per_source
        )
        self._lost: dict[SwitchboardTransport, defer.Deferred[None]] = {}
        registry.observers.append(self._registryEvent)

    def emit(self, event: str, **fields: Any) -> None:
        """Tell the event bus what happened."""
        self.events.emit(event, **fields)

    # What used to live here, for the callers that read it through the factory.

    @property
    def observers(self) -> list[Any]:
        return self.events.observers

    @property
    def penalties(self) -> Any:
        return self.admission.penalties

    @property
    def startups(self) -> Any:
        return self.admission.startups

    @property
    def dropped(self) -> int:
        return self.admission.dropped

    @property
    def preauth(self) -> dict[Any, None]:
        return self.admission.preauth

    @property
    def descriptors(self) -> Any:
        return self.admission.descriptors

    @descriptors.setter
    def descriptors(self, guard: Any) -> None:
        self.admission.descriptors = guard

    def _descriptorsFull(self) -> None:
        """The PROXY protocol wrapper refused a socket near the open-file limit."""
        self.admission._descriptorsFull(len(self.transports))

    def _registryEvent(self, event: str, listener: Any, port: int | None) -> None:
        if event in ("up", "down"):
            self.emit(
                f"initiator.{event}",
                name=listener.connect_name,
                aliases=list(listener.aliases),
                peer=listener.peer,
                fingerprint=listener.fingerprint,
            )
        elif port is not None:
            kind = "add" if event == "port-added" else "remove"
            self.emit(f"forward.{kind}", name=listener.connect_name, port=port)

    def buildProtocol(self, addr: Any) -> Any:
        """Refuse penalised sources and excess unauthenticated connections before any work."""
        if self.stopping:
            return None
        if not self.admission.admit(getattr(addr, "host", "?"), len(self.transports)):
            return None
        t = protocol.Factory.buildProtocol(self, addr)
        assert isinstance(t, SwitchboardTransport)
        # Host key signatures without ssh-rsa: SHA-1 is not offered, even with an RSA key.
        t.supportedPublicKeys = [
            alg
            for key in self.privateKeys.values()
            for alg in key.supportedSignatureAlgorithms()
            if alg != b"ssh-rsa"
        ]
        t.clock = self.clock
        t.loginGraceTime = self.config.login_grace_time
        t.supportedCiphers = list(self.config.ciphers)
        t.supportedMACs = list(self.config.macs)
        t.supportedKeyExchanges = list(self.config.kex_algorithms)
        t.connId = next(self._ids)
        self.admission.started(t)
        return t

    def watchKeys(self, keysFile: Any) -> None:
        """Follow authorized_keys: connections of removed, denied or changed keys are closed."""
        self.keysFile = keysFile
        self._reloading = False
        keysFile.add_listener(self._keysChangedAnyThread)

    def _keysChangedAnyThread(self) -> None:
        """Reloads run in worker threads too (logins, big files); the watcher runs here."""
        if threadable.isInIOThread():
            self._keysChanged()
        else:
            default_reactor.callFromThread(self._keysChanged)  # type: ignore[attr-defined]

    def checkKeys(self) -> None:
        """Re-read authorized_keys if it changed (called periodically and on SIGHUP).

        A small change (an appended line, a small file) is read at once; a
        big reload goes to a thread, so a 20,000-line file never stalls the
        reactor.
        """
        keysFile = getattr(self, "keysFile", None)
        if keysFile is None:
            return
        cost = keysFile.reload_cost()
        if cost == 0:
            return
        if cost <= authkeys.INLINE_RELOAD_BYTES:
            try:
                keysFile.entries()
            except authkeys.AuthorizedKeysUnavailable:
                pass  # logged by the file object; new logins fail closed, sessions stay
            return
        if self._reloading:
            return
        self._reloading = True
        d = threads.deferToThread(keysFile.entries)
        d.addErrback(lambda f: f.trap(authkeys.AuthorizedKeysUnavailable))
        d.addErrback(lambda f: log.failure("reloading authorized_keys failed", failure=f))
        d.addBoth(lambda _: setattr(self, "_reloading", False))

    def stopFactory(self) -> None:
        """The last listening port closed: stop the host name lookup threads too."""
        names = getattr(self.checker, "names", None)
        if names is not None:
            names.stop()

    def _keysChanged(self) -> None:
        if not self.config.enable_auth:
            return
        for avatar in list(self.avatars):
            self._recheck(avatar)

    def _recheck(self, avatar: Any) -> None:
        """Judge one live connection by the file as now loaded."""
        if avatar.loggedOut:
            return
        login = avatar.identity.certificate
        if login is not None:
            entry = self.keysFile.resolve(login.ca_blob, ca=True)
        else:
            entry = self.keysFile.resolve(avatar.identity.key_blob)
        names = getattr(self.checker, "names", None)
        info = avatar.info
        if (
            entry is not None
            and names is not None
            and not info.names_checked
            and authkeys.wants_hostname(entry)
        ):
            # A hostname pattern appeared since the login: look the name up first
            # (without it every hostname pattern would fail and drop the connection).
            def named(name: str | None) -> None:
                info.peer_name, info.names_checked = name, True
                avatar.identity = dataclasses.replace(avatar.identity, peer_name=name)
                self._recheck(avatar)

            names.lookup(info.peer).addCallback(named)
            return
        why = self._stillAuthorized(avatar, entry)
        if why is None:
            self._applyAccess(avatar, entry)
        else:
            log.info(
                "conn {conn_id}: closing {hostname} ({fingerprint}): {why}",
                conn_id=avatar.info.conn_id,
                hostname=avatar.identity.hostname,
                fingerprint=avatar.identity.fingerprint,
                why=why,
            )
            transport = avatar.conn.transport if avatar.conn else None
            if transport is not None:
                transport.sendDisconnect(11, f"access changed: {why}".encode("ascii"))

    def _applyAccess(self, avatar: Any, entry: authkeys.AuthorizedKey | None) -> None:
        """A changed access= or key option takes effect at once on the live connection."""
        access = entry.access.granted() if entry is not None else None
        if access is not None and access != avatar.identity.access:
            log.info(
                "conn {conn_id}: access of {fingerprint} is now {access}",
                conn_id=avatar.info.conn_id,
                fingerprint=avatar.identity.fingerprint,
                access=access.describe(),
            )
            avatar.identity = dataclasses.replace(avatar.identity, access=access)
        policy = _policyOf(avatar.identity, entry) if entry is not None else None
        if policy is not None and policy != avatar.identity.policy:
            log.info(
                "conn {conn_id}: options of {fingerprint} are now: {options}",
                conn_id=avatar.info.conn_id,
                fingerprint=avatar.identity.fingerprint,
                options="; ".join(policy.describe()) or "no restrictions",
            )
            avatar.identity = dataclasses.replace(avatar.identity, policy=policy)
            avatar.scheduleExpiry()

    def _stillAuthorized(self, avatar: Any, entry: authkeys.AuthorizedKey | None) -> str | None:
        """Why the connection must close, or None.

        The line's rules are `keyrules.admits`, the ones a login meets; what
        is left here is whether the login's own outcome (its certificate's
        policy, its names) would still come out the same.
        """
        identity = avatar.identity
        listener = avatar.listener
        decision = admits(
            entry,
            peer=identity.peer,
            peer_name=identity.peer_name,
            now=time.time(),
            ca=identity.certificate is not None,
            external=identity.external,
            holds_ports=avatar.holdsPorts(),
            ports=listener.ports.items() if listener is not None else (),
        )
        if not decision:
            return decision.live
        if entry is None:
            return None  # admitted by authorized_keys_command; the file never had it
        if identity.certificate is not None:
            try:
                _policyOf(identity, entry)
            except PolicyError as exc:
                return f"the certificate authority's line and the certificate conflict: {exc}"
            return None
        try:
            hostname, aliases = login_names(
                self.checker.secret, identity.username, identity.key_blob, entry
            )
        except InvalidName:
            return "key's hostname or alias is no longer valid"
        if hostname != identity.hostname:
            return "key's hostname changed"
        if aliases != identity.aliases:
            return "key's aliases changed"
        return None

    def preauthDone(self, transport: SwitchboardTransport) -> None:
        """The connection authenticated or closed: it leaves the MaxStartups count."""
        self.admission.done(transport)

    def penalise(self, host: str, kind: str) -> None:
        self.admission.penalise(host, kind)

    # accounting hooks called by transports, userauth, avatars and connections

    def transportStarted(self, transport: SwitchboardTransport) -> None:
        self.transports.add(transport)
        self.emit("connection.open", conn_id=transport.connId, peer=transport._peerHost)

    def transportLost(self, transport: SwitchboardTransport) -> None:
        self.transports.discard(transport)
        self.preauthDone(transport)
        if not authenticated(transport) and not self.stopping:
            self.penalise(transport._peerHost, transport.penaltyKind)
        self.emit(
            "connection.close",
            conn_id=transport.connId,
            peer=transport._peerHost,
            reason=transport._closeReason,
            authenticated=authenticated(transport),
        )
        waiter = self._lost.pop(transport, None)
        if waiter is not None:
            waiter.callback(None)

    def authFailed(self, peer: str, reason: str, fingerprint: str = "") -> None:
        self.emit("auth.fail", peer=peer, reason=reason, fingerprint=fingerprint)

    def loggedIn(self, avatar: Any) -> None:
        self.avatars.add(avatar)
        identity = avatar.identity
        self.emit(
            "auth.ok",
            conn_id=avatar.info.conn_id,
            peer=avatar.info.peer,
            fingerprint=identity.fingerprint,
            hostname=identity.hostname,
            new_key=identity.new_key,
        )
        if identity.new_key:
            self.emit("key.added", fingerprint=identity.fingerprint, hostname=identity.hostname)

    def loggedOut(self, avatar: Any) -> None:
        self.avatars.discard(avatar)

    def circuitOpened(self, circuit: Any, latency: float) -> None:
        self.circuitsOpened += 1
        self.emit(
            "circuit.open",
            circuit_id=circuit.id,
            target=circuit.target,
            client=circuit.client_peer,
            latency=latency,
            listener_id=circuit.listener_id,
        )
        circuit.onClose.append(self._circuitClosed)

    def _circuitClosed(self, circuit: Any) -> None:
        self.emit(
            "circuit.close",
            circuit_id=circuit.id,
            target=circuit.target,
            client=circuit.client_peer,
            bytes_up=circuit.bytes_up,
            bytes_down=circuit.bytes_down,
            duration=circuit.duration,
        )

    def circuitFailed(self, target: str, outcome: str, reason: str) -> None:
        """outcome: no_such_name, refused, initiator_refused, timeout."""
        self.emit("circuit.fail", target=target, outcome=outcome, reason=reason)

    def disconnectAll(self, reason: bytes = b"server is shutting down") -> defer.Deferred[Any]:
        """Send DISCONNECT to every connection and wait until they are gone."""
        self.stopping = True
        waits = []
        for transport in list(self.transports):
            d: defer.Deferred[None] = defer.Deferred()
            self._lost[transport] = d
            waits.append(d)
            transport.sendDisconnect(11, reason)  # DISCONNECT_BY_APPLICATION
        return defer.DeferredList(waits)


def _policyOf(identity: Any, entry: authkeys.AuthorizedKey) -> KeyPolicy:
    """The policy a login with ``entry`` has now: a certificate's narrows its CA line's."""
    login = identity.certificate
    return entry.policy if login is None else certs.login_policy(entry.policy, login)
