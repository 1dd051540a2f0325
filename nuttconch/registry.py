# -*- test-case-name: tests.test_registry -*-
"""Who holds which virtual ports under which names.

The registry is the only shared state between connections, so it sits
behind an interface: this in-memory service is the single-node
implementation, and a distributed one can replace it without touching
protocol code.  It knows nothing of SSH: a listener is an opaque handle
whose ``opener`` (an ``IOpener``) the connection code supplies.

What leaves the registry is a record: a listener's id, node and order are
the registry's to assign, and ``resolve`` returns a ``Route`` holding what
a circuit needs, so that a registry whose listeners live on other nodes can
hand out the same shapes.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from zope.interface import Attribute, Interface, implementer

from .names import escape, split_index

EPHEMERAL_PORTS = range(49152, 65536)


class NotFound(LookupError):
    """No listener matches; the message names what was missing."""


class PortInUse(ValueError):
    """The same initiator asked twice for one virtual port, or for more than it may hold."""


@dataclass(frozen=True)
class Route:
    """What a circuit needs from a resolved ``name[~index]:port``."""

    listener_id: str
    node: str
    name: str  # the listener's connect name, for logs and metrics
    opener: Any  # IOpener: opens the far end of the circuit
    bind_host: str


class Listener:
    """One initiator connection as the registry sees it."""

    def __init__(
        self,
        hostname: str,
        aliases: tuple[str, ...],
        *,
        peer: str = "",
        fingerprint: str = "",
        opener: Any = None,
    ) -> None:
        self.hostname = hostname
        self.aliases = aliases
        self.peer = peer
        self.fingerprint = fingerprint
        self.opener = opener
        self.ports: dict[int, str] = {}
        self.connected_since = time.time()
        # Assigned by the registry: a stable id and the node that holds the listener at its
        # first port, the order (higher is newer) each time it comes up.
        self.id = ""
        self.node = ""
        self.order = 0

    @property
    def connect_name(self) -> str:
        """The generated alias, which always comes first and always routes."""
        return self.aliases[0] if self.aliases else self.hostname

    def __repr__(self) -> str:
        return f"<Listener {self.connect_name} ports={sorted(self.ports)}>"


class IRegistry(Interface):
    """Routes ``name[~index]:port`` to the listener that holds it."""

    observers = Attribute("list of callables (event: str, listener, port: int | None)")
    node = Attribute("The name of the node this registry runs on (str).")

    def add_port(listener: Listener, bind_host: str, port: int, limit: int | None = None) -> int:
        """Give ``listener`` a virtual port (0 allocates one); return the port.

        Raises PortInUse if the listener holds ``port`` already or, with ``limit``,
        holds that many ports already. The first port gives the listener its id
        (kept for its lifetime), its node and a new order value.
        """

    def remove_port(listener: Listener, port: int) -> bool:
        """Drop one virtual port; False if the listener did not hold it."""

    def remove_listener(listener: Listener) -> None:
        """Drop every port and name of a listener that left."""

    def resolve(target: str, port: int) -> Route:
        """Return the route to ``target:port`` (``name[~index]``) or raise NotFound."""

    def find(target: str) -> Listener:
        """The listener ``name[~index]`` names, whatever its ports, or raise NotFound."""

    def listeners() -> list[Listener]:
        """Every registered listener, most recent first."""


def claim_port(
    listener: Listener, bind_host: str, port: int, limit: int | None, rng: random.Random
) -> int:
    """Check and record one more virtual port on ``listener`` (0: pick a free one).

    The part of ``add_port`` every registry shares; raises PortInUse.
    """
    if port != 0 and port in listener.ports:
        raise PortInUse(f"port {port} is already forwarded on this connection")
    if limit is not None and len(listener.ports) >= limit:
        raise PortInUse(f"more than {limit} forwards")
    if port == 0:
        free = [p for p in rng.sample(EPHEMERAL_PORTS, 64) if p not in listener.ports]
        if not free:
            free = [p for p in EPHEMERAL_PORTS if p not in listener.ports]
            if not free:
                raise PortInUse("no free virtual port is left on this connection")
        port = free[0]
    listener.ports[port] = bind_host
    return port


def pick_holder(
    names: dict[str, list[Listener]], target: str, why: str = ""
) -> tuple[Listener, str]:
    """The listener ``name[~index]`` names in ``names`` (newest first), and the name as shown.

    ``why`` is appended to the NotFound message.
    """
    name, index = split_index(target.lower())
    holders = names.get(name)
    # The name is the client's, unchecked: the message goes to logs and back to the
    # client, so it is escaped here, where it is built, not by each reader.
    shown = escape(name)
    if not holders:
        raise NotFound(f"no such listener: {shown}{why}")
    if index >= len(holders):
        raise NotFound(f"no such listener: {shown}~{index} ({len(holders)} hold {shown}){why}")
    return holders[index], shown


class RegistryBase:
    """What every registry shares: observers, remove_listener, resolve and find.

    A subclass provides ``_unlink(listener)`` and ``_holder(target)``.
    """

    observers: list[Callable[[str, Listener, int | None], None]]

    def _notify(self, event: str, listener: Listener, port: int | None) -> None:
        for observer in list(self.observers):
            observer(event, listener, port)

    def _unlink(self, listener: Listener) -> None:
        raise NotImplementedError

    def _holder(self, target: str) -> tuple[Listener, str]:
        raise NotImplementedError

    def remove_listener(self, listener: Listener) -> None:
        ports = list(listener.ports)
        listener.ports.clear()
        for port in ports:
            self._notify("port-removed", listener, port)
        self._unlink(listener)

    def resolve(self, target: str, port: int) -> Route:
        listener, shown = self._holder(target)
        bind_host = listener.ports.get(port)
        if bind_host is None:
            raise NotFound(f"no such port: {shown} has no port {port}")
        return Route(listener.id, listener.node, listener.connect_name, listener.opener, bind_host)

    def find(self, target: str) -> Listener:
        return self._holder(target)[0]


@implementer(IRegistry)
class InMemoryRegistry(RegistryBase, Service):
    """The embedded registry: plain dictionaries in the server process."""

    name = "registry"

    def __init__(self, rng: random.Random | None = None, node: str = "local") -> None:
        self.node = node
        self._names: dict[str, list[Listener]] = {}
        self._active: dict[int, Listener] = {}
        self._counter = itertools.count(1)
        self._ids = itertools.count(1)
        self._rng = rng or random.SystemRandom()
        self.observers: list[Callable[[str, Listener, int | None], None]] = []

    def add_port(
        self, listener: Listener, bind_host: str, port: int, limit: int | None = None
    ) -> int:
        port = claim_port(listener, bind_host, port, limit, self._rng)
        if len(listener.ports) == 1:
            if not listener.id:
                listener.id = f"{self.node}/{next(self._ids)}"
                listener.node = self.node
            listener.order = next(self._counter)
            self._active[id(listener)] = listener
            for name in dict.fromkeys(listener.aliases):
                holders = self._names.setdefault(name, [])
                holders.insert(0, listener)
            self._notify("up", listener, None)
        self._notify("port-added", listener, port)
        return port

    def remove_port(self, listener: Listener, port: int) -> bool:
        if listener.ports.pop(port, None) is None:
            return False
        self._notify("port-removed", listener, port)
        if not listener.ports:
            self._unlink(listener)
        return True

    def _unlink(self, listener: Listener) -> None:
        if self._active.pop(id(listener), None) is None:
            return
        for name in dict.fromkeys(listener.aliases):
            holders = self._names.get(name, [])
            if listener in holders:
                holders.remove(listener)
            if not holders:
                self._names.pop(name, None)
        self._notify("down", listener, None)

    def _holder(self, target: str) -> tuple[Listener, str]:
        return pick_holder(self._names, target)

    def listeners(self) -> list[Listener]:
        return sorted(self._active.values(), key=lambda entry: -entry.order)
