# -*- test-case-name: tests.test_e2e -*-
"""The SSH factory: builds transports, and keeps per-server accounting.

Everything a connection needs from the server as a whole (config,
registry, portal, counters, the list of live connections for a graceful
stop) is reached through this one object, as in Conch's own tap.
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.conch.ssh import factory as conch_factory
from twisted.internet import defer, protocol
from twisted.internet import reactor as default_reactor
from twisted.logger import Logger

from .auth import SwitchboardUserAuth
from .connection import SwitchboardConnection
from .transport import SwitchboardTransport

log = Logger()


class SwitchboardFactory(conch_factory.SSHFactory):
    """Builds one SwitchboardTransport per TCP connection."""

    protocol = SwitchboardTransport

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
        self._lost: dict[SwitchboardTransport, defer.Deferred[None]] = {}

    def buildProtocol(self, addr: Any) -> Any:
        if self.stopping:
            return None
        t = protocol.Factory.buildProtocol(self, addr)
        assert isinstance(t, SwitchboardTransport)
        t.supportedPublicKeys = [
            alg for key in self.privateKeys.values() for alg in key.supportedSignatureAlgorithms()
        ]
        t.clock = self.clock
        t.loginGraceTime = self.config.login_grace_time
        t.connId = next(self._ids)
        return t

    # accounting hooks called by transports, userauth, avatars and connections

    def transportStarted(self, transport: SwitchboardTransport) -> None:
        self.transports.add(transport)

    def transportLost(self, transport: SwitchboardTransport) -> None:
        self.transports.discard(transport)
        waiter = self._lost.pop(transport, None)
        if waiter is not None:
            waiter.callback(None)

    def authFailed(self, peer: str, reason: str) -> None:
        pass

    def authSucceeded(self, peer: str) -> None:
        pass

    def loggedIn(self, avatar: Any) -> None:
        self.avatars.add(avatar)

    def loggedOut(self, avatar: Any) -> None:
        self.avatars.discard(avatar)

    def circuitOpened(self, circuit: Any) -> None:
        self.circuitsOpened += 1

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
