# -*- test-case-name: tests.test_e2e -*-
"""The SSH factory: builds transports, and keeps per-server accounting.

Everything a connection needs from the server as a whole (config,
registry, portal, counters, the list of live connections for a graceful
stop) is reached through this one object, as in Conch's own tap.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from twisted.conch.ssh import factory as conch_factory
from twisted.internet import defer, protocol, threads
from twisted.internet import reactor as default_reactor
from twisted.logger import Logger
from twisted.python import threadable

from . import authkeys
from .auth import SwitchboardUserAuth, login_names
from .budget import ConnectionLimits, MemoryBudget
from .connection import SwitchboardConnection
from .limits import DescriptorGuard, Penalties, Startups, open_file_limit
from .logs import conch_logger
from .names import InvalidName
from .transport import SwitchboardTransport

log = Logger()
# An unauthenticated connection that has not finished key exchange after this many seconds
# may be dropped to admit a newcomer when MaxStartups is full.
STALLER_AGE = 2.0
NO_KEXINIT_AGE = 0.5


class SwitchboardFactory(conch_factory.SSHFactory):
    """Builds one SwitchboardTransport per TCP connection."""

    _log = conch_logger("nuttconch.server.SwitchboardFactory")

    protocol = SwitchboardTransport
    #: The AuthorizedKeysChecker (set by tap.build); the watcher needs its secret.
    checker: Any = None

    def __init__(
        self,
        config: Any,
        registry: Any,
        portal: Any,
        hostKeys: dict[bytes, Any],
        clock: Any = None,
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
        self.transports: set[SwitchboardTransport] = set()
        self.avatars: set[Any] = set()
        self.circuitsOpened = 0
        self.stopping = False
        start, rate, full = config.max_startups
        self.startups = Startups(start, rate, full, config.per_source_max_startups)
        self.descriptors = DescriptorGuard(*open_file_limit(), clock=self.clock.seconds)
        exempt = config.per_source_penalty_exempt_list
        self.penalties = Penalties(
            clock=self.clock.seconds,
            exempt=(lambda host: authkeys.match_from(exempt, host))
            if exempt
            else (lambda h: False),
            enabled=config.per_source_penalties,
        )
        self.budget = MemoryBudget(
            config.memory_per_connection, config.memory_total, config.channel_window
        )
        self.connectionLimits = ConnectionLimits(
            config.max_connections_per_key, config.max_connections_per_source
        )
        self.dropped = 0
        # Unauthenticated transports in arrival order (a dict used as an ordered set).
        self.preauth: dict[SwitchboardTransport, None] = {}
        self._dropLogged: dict[str, float] = {}
        self._lost: dict[SwitchboardTransport, defer.Deferred[None]] = {}
        # Observers of server events (metrics, webhooks, tests): f(event, fields).
        self.observers: list[Any] = []
        registry.observers.append(self._registryEvent)

    def emit(self, event: str, **fields: Any) -> None:
        """Tell observers what happened; an observer's failure never reaches the protocol."""
        for observer in list(self.observers):
            try:
                observer(event, fields)
            except Exception:
                log.failure("event observer failed on {event}", event=event)

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
        host = getattr(addr, "host", "?")
        if not self.descriptors.admit(len(self.transports)):
            self._descriptorsFull()
            return None
        if self.penalties.refused(host):
            self._drop(host, "source is penalised")
            return None
        reason = self.startups.admit(host)
        if reason is not None and reason != "per-source startups exceeded":
            # Full of unauthenticated connections: make room by dropping the oldest one that
            # has not even finished key exchange (a staller), so a real client still gets in.
            victim = self._oldestStaller()
            if victim is not None:
                self.preauthDone(victim)
                victim.penaltyKind = "grace-exceeded"
                victim.transport.abortConnection()
                reason = self.startups.admit(host, early_drop=False)
        if reason is not None:
            self._drop(host, reason)
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
        t.preauthCounted = True
        t.startedAt = self.clock.seconds()
        self.preauth[t] = None
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

    def _keysChanged(self) -> None:
        if not self.config.enable_auth:
            return
        for avatar in list(self.avatars):
            entry = self.keysFile.resolve(avatar.identity.key_blob)
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
        """A changed access= takes effect at once on the live connection."""
        access = frozenset(entry.access - {"denied"}) if entry is not None else None
        if access is not None and access != avatar.identity.access:
            log.info(
                "conn {conn_id}: access of {fingerprint} is now {access}",
                conn_id=avatar.info.conn_id,
                fingerprint=avatar.identity.fingerprint,
                access=",".join(sorted(access)) or "none",
            )
            avatar.identity = dataclasses.replace(avatar.identity, access=access)

    def _stillAuthorized(self, avatar: Any, entry: authkeys.AuthorizedKey | None) -> str | None:
        identity = avatar.identity
        if entry is None:
            return "key removed from authorized_keys"
        if entry.denied:
            return "key denied in authorized_keys"
        if not authkeys.from_allows(entry, identity.peer):
            return "key no longer allowed from this address"
        if avatar.holdsPorts() and "initiate" not in entry.access:
            return "key lost access=initiate while holding virtual ports"
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

    def _oldestStaller(self) -> SwitchboardTransport | None:
        """The oldest unauthenticated connection that looks stalled: no KEXINIT after
        NO_KEXINIT_AGE (real clients send it with their banner), or no finished key
        exchange after STALLER_AGE."""
        now = self.clock.seconds()
        for transport in self.preauth:  # insertion order: oldest first
            age = now - transport.startedAt
            if transport.firstKexDone:
                continue
            if age >= STALLER_AGE or (age >= NO_KEXINIT_AGE and not transport.gotKexInit):
                return transport
        return None

    def _descriptorsFull(self) -> None:
        """Near the open-file limit: one line an interval, not one per refused socket."""
        self.dropped += 1
        count = self.descriptors.report()
        if count is not None:
            log.warn(
                "near the open-file limit ({limit}): refused {count} new connection(s) since"
                " the last such line; still serving {n} connections",
                limit=self.descriptors.limit,
                count=count,
                n=len(self.transports),
            )

    def _drop(self, host: str, reason: str) -> None:
        """Count every drop; log at most one line per source and reason a minute."""
        self.dropped += 1
        now = self.clock.seconds()
        key = f"{host} {reason}"
        if now - self._dropLogged.get(key, -1e9) >= 60:
            if len(self._dropLogged) > 4096:
                self._dropLogged.clear()
            self._dropLogged[key] = now
            log.info("refused connection from {peer}: {reason}", peer=host, reason=reason)
        self.emit("connection.refused", peer=host, reason=reason)

    def preauthDone(self, transport: SwitchboardTransport) -> None:
        """The connection authenticated or closed: it leaves the MaxStartups count."""
        if transport.preauthCounted:
            transport.preauthCounted = False
            self.preauth.pop(transport, None)
            self.startups.done(transport._peerHost)

    def penalise(self, host: str, kind: str) -> None:
        seconds = self.penalties.add(host, kind)
        if seconds is not None:
            log.info(
                "penalising {peer} for {seconds:.0f}s ({kind})",
                peer=host,
                seconds=seconds,
                kind=kind,
            )
            self.emit("penalty", peer=host, seconds=seconds, kind=kind)

    # accounting hooks called by transports, userauth, avatars and connections

    def transportStarted(self, transport: SwitchboardTransport) -> None:
        self.transports.add(transport)
        self.emit("connection.open", conn_id=transport.connId, peer=transport._peerHost)

    def transportLost(self, transport: SwitchboardTransport) -> None:
        self.transports.discard(transport)
        self.preauthDone(transport)
        if not hasattr(transport, "avatar") and not self.stopping:
            self.penalise(transport._peerHost, transport.penaltyKind)
        self.emit(
            "connection.close",
            conn_id=transport.connId,
            peer=transport._peerHost,
            reason=transport._closeReason,
            authenticated=hasattr(transport, "avatar"),
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
